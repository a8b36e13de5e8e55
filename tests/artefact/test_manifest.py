"""The typed export manifest (attrimeter/artefact/manifest.py): old exports load, what is written reads back the same,
and a bad field is refused with its name. Torch-free and fast: no model is exported here."""

import copy
import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest

from attrimeter.artefact.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest, write_manifest

# Written by the exporter before the manifest was typed (a tiny model's fp16 plugin export, main at f4db7f6), with
# the kernels and tensorrt records added in the layout export/build.py wrote them then (no GPU made a real one here).
V1 = Path(__file__).parent / "data" / "manifest_v1.json"


@pytest.fixture
def doc() -> dict:
    return json.loads(V1.read_text())


def test_an_export_written_before_the_typed_manifest_still_loads(doc):
    m = Manifest.from_json(doc)
    assert (m.flavor, m.dtype, m.opset, m.model) == ("plugin", "float16", 18, "model.onnx")
    assert m.image_size == (64, 32) and m.feature_map == (128, 4, 2) and m.aam_shape == (4, 2) and m.channels == 128
    assert len(m.attributes) == 26 and m.attribute_names[:2] == ("backpack", "bag")
    assert m.attributes[0].meanings == ("no backpack", "carries a backpack") and m.attributes[0].group
    assert m.inputs["images"].value_range == (0.0, 1.0) and m.outputs["aam"].shape == ("batch", 26, 4, 2)
    assert m.plugin is not None and m.plugin.op == "attrimeter::MaskedGemPool"
    assert m.model_id == doc["source"]["sha256"]
    retrieval = m.verification.retrieval
    assert retrieval is not None and retrieval.graph == "portable twin" and set(retrieval.export) >= {"d_mAP"}
    assert m.verification.runner == "onnx.reference" and [c.batch for c in m.verification.parity] == [1, 7]
    assert m.kernels is not None and m.kernels.targets == ("sm_80", "sm_90") and m.kernels.pool_max_shared == 49152
    engine = m.tensorrt
    assert engine is not None and engine.profile.max_shape == (16, 3, 64, 32) and engine.compute_capability == 90
    assert engine.plugin is not None and engine.plugin.ptx_target == "sm_90a"
    assert engine.verification.retrieval is None and engine.verification.runner is None
    assert engine.verification.worst_error == pytest.approx(0.0022)
    # Written back, it is the same JSON; the one difference: an engine checked without data now says retrieval: null,
    # as the graph's own checks always did.
    expected = copy.deepcopy(doc)
    expected["tensorrt"]["verification"]["retrieval"] = None
    assert m.to_json() == expected
    assert Manifest.from_json(m.to_json()) == m


def test_write_then_load_gives_the_same_manifest(doc, tmp_path):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"an onnx graph")
    described = replace(Manifest.from_json(doc), kernels=None, tensorrt=None, files={})
    written = write_manifest(tmp_path, described)
    assert written.files == {"model.onnx": hashlib.sha256(b"an onnx graph").hexdigest()}
    assert replace(written, files={}) == described
    assert load_manifest(tmp_path) == written
    assert json.loads((tmp_path / MANIFEST_NAME).read_text()) == written.to_json()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []


def test_a_manifest_that_would_not_read_back_is_not_written(doc, tmp_path):
    (tmp_path / "model.onnx").write_bytes(b"graph")
    engine_less = replace(Manifest.from_json(doc), kernels=None, files={})  # its engine file is not in the folder
    with pytest.raises(ManifestError, match="'tensorrt.engine' names 'model.engine', which 'files' does not list"):
        write_manifest(tmp_path, engine_less)
    assert not (tmp_path / MANIFEST_NAME).exists()


def _set(doc: dict, path: str, value: object) -> None:
    *parents, last = path.split(".")
    node = doc
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    if value is KeyError:
        del node[last]
    else:
        node[int(last) if last.isdigit() else last] = value


@pytest.mark.parametrize(("path", "value", "message"), [
    ("attributes.3.meanings", ["a"], r"field 'attributes\[3\]\.meanings' must be an array of 2, got \['a'\]"),
    ("attributes.0.name", "bag", r"field 'attributes' must be a non-empty array of attributes with distinct names"),
    ("image_size", [64], r"field 'image_size' must be an array of 2"),
    ("feature_map.1", 0, r"field 'feature_map\[1\]' must be an integer >= 1, got 0"),
    ("flavor", "fast", r"field 'flavor' must be one of \['portable', 'plugin'\], got 'fast'"),
    ("max_batch", True, r"field 'max_batch' must be an integer >= 1, got True"),
    ("source.sha256", "abc", r"field 'source\.sha256' must be a sha256 hex digest"),
    ("feature_map", KeyError, r"field 'feature_map' is missing"),
    ("outputs.aam", KeyError, r"field 'outputs' must be an object with the outputs"),
    ("pooling.p", "3", r"field 'pooling\.p' must be a finite number, got '3'"),
    ("verification.parity.1.relative_error.aam", "x",
     r"field 'verification\.parity\[1\]\.relative_error\.aam' must be a finite number"),
    ("tensorrt.profile.max", [16, 3], r"field 'tensorrt\.profile\.max' must be an array of 4"),
    ("kernels.targets", "sm_90", r"field 'kernels\.targets' must be an array, got 'sm_90'"),
    ("model", "graph.onnx", r"field 'model' names 'graph\.onnx', which 'files' does not list"),
    ("files", {}, r"lists no files"),
    ("version", 2, r"unsupported manifest version 2"),
])
def test_a_bad_field_is_refused_by_name(doc, path, value, message):
    _set(doc, path, value)
    with pytest.raises(ManifestError, match=message):
        Manifest.from_json(doc, "export/manifest.json")


def test_the_file_is_named_and_the_hashes_are_checked(doc, tmp_path):
    doc["files"] = {"model.onnx": hashlib.sha256(b"graph").hexdigest()}
    doc["kernels"] = doc["tensorrt"] = None
    (tmp_path / MANIFEST_NAME).write_text(json.dumps({**doc, "opset": "18"}))
    with pytest.raises(ManifestError, match=rf"{tmp_path / MANIFEST_NAME}: field 'opset' must be an integer"):
        load_manifest(tmp_path)
    (tmp_path / MANIFEST_NAME).write_text(json.dumps(doc))
    with pytest.raises(ManifestError, match="model.onnx is listed in the manifest but missing"):
        load_manifest(tmp_path)
    (tmp_path / "model.onnx").write_bytes(b"graph")
    assert load_manifest(tmp_path).files == doc["files"]
    (tmp_path / "model.onnx").write_bytes(b"other")
    with pytest.raises(ManifestError, match="does not match its sha256"):
        load_manifest(tmp_path)
