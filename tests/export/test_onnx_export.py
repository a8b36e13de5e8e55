"""ONNX export: both flavours, dynamic batch, fp16 on retrieval, manifest hashes, safe publishing, the CLI."""

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from attrimeter.artefact.contract import FLAVORS, OUTPUT_NAMES
from attrimeter.artefact.manifest import ManifestError, load_manifest
from attrimeter.export import onnx_export as ox
from attrimeter.export.onnx_graph import ExportGraph
from attrimeter.kernels import integer_exponent


@pytest.fixture(scope="module")
def exports(tiny_interpreter, tmp_path_factory):
    """A portable and a plugin export of the tiny interpreter (no AOT kernels: they have their own tests)."""
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for flavor in FLAVORS:
        ox.export_onnx(tiny_interpreter, root / flavor, flavor=flavor, progress=False)
        out[flavor] = root / flavor
    return out


def _eager(checkpoint):
    from attrimeter.engine.interpreter_checkpoint import load_interpreter

    ck = load_interpreter(checkpoint)
    return ExportGraph(ck.model), ck.image_size


def _rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_portable_graph_names_and_dynamic_batch(exports, tiny_interpreter):
    model = onnx.load(str(exports["portable"] / "model.onnx"))
    assert [i.name for i in model.graph.input] == ["images"]
    assert [o.name for o in model.graph.output] == list(OUTPUT_NAMES)
    batch_dim = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node), "portable graphs use standard ops only"
    assert "MatMul" in {n.op_type for n in model.graph.node}  # the factorised pooling
    eager, size = _eager(tiny_interpreter)
    session = ort.InferenceSession(str(exports["portable"] / "model.onnx"), providers=["CPUExecutionProvider"])
    for b in (1, 3, 17):  # one session: the batch really is dynamic
        x = torch.rand(b, 3, *size)
        with torch.no_grad():
            ref = eager(x)
        outs = session.run(None, {"images": x.numpy()})
        for name, out, r in zip(OUTPUT_NAMES, outs, ref, strict=True):
            assert out.shape == tuple(r.shape), name
            assert _rel(out, r.numpy()) < 1e-4, (name, b)


def test_manifest_describes_the_export(exports, tiny_interpreter):
    m = load_manifest(exports["portable"])
    from attrimeter.engine.interpreter_checkpoint import load_interpreter

    ck = load_interpreter(tiny_interpreter)
    M, C = ck.model.num_attributes, ck.model.num_features
    assert m.flavor == "portable" and m.dtype == "float32" and m.opset == 18
    assert m.inputs["images"].shape == ("batch", 3, *ck.image_size)
    assert m.outputs["attr_embeddings"].shape == ("batch", M, C)
    assert list(m.attribute_names) == ck.attribute_names
    assert all(a.title and len(a.meanings) == 2 for a in m.attributes)
    assert (m.pooling.p, m.pooling.eps, m.pooling.p_int) == (ck.model.p, ck.model.eps, integer_exponent(ck.model.p))
    assert m.normalization.mean is not None and len(m.normalization.mean) == 3 and m.normalization.inside_graph
    assert set(m.files) == {"model.onnx"}
    assert [r.batch for r in m.verification.parity] == [1, 7]
    assert m.verification.worst_error < 1e-4
    assert m.versions["torch"] == torch.__version__


def test_plugin_graph_has_exactly_one_custom_node(exports, tiny_interpreter):
    model = onnx.load(str(exports["plugin"] / "model.onnx"))
    custom = [n for n in model.graph.node if n.domain not in ("", "ai.onnx")]
    assert len(custom) == 1
    node = custom[0]
    assert (node.domain, node.op_type) == ("attrimeter", "MaskedGemPool")
    assert ("attrimeter", 1) in {(o.domain, o.version) for o in model.opset_import}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    eager, size = _eager(tiny_interpreter)
    m = eager.model
    assert attrs["p"] == pytest.approx(m.p, rel=1e-6) and attrs["eps"] == pytest.approx(m.eps, rel=1e-6)
    assert attrs["p_int"] == integer_exponent(m.p)
    assert (attrs["num_attributes"], attrs["channels"]) == (m.num_attributes, m.num_features)
    assert (attrs["plugin_namespace"], attrs["aot"]) == (b"attrimeter", 1)  # what TensorRT's parser looks for
    assert len(node.input) == 4 and list(node.output[:2])
    assert "MatMul" not in {n.op_type for n in model.graph.node}  # the pooling is inside the node
    onnx.checker.check_model(model, full_check=True)
    # The graph around the node computes the same model: run it with the numpy twin of the node.
    session = ox.onnx_session(exports["plugin"] / "model.onnx", "plugin")
    for b in (1, 3):
        x = torch.rand(b, 3, *size)
        with torch.no_grad():
            ref = eager(x)
        for out, r in zip(session.run(None, {"images": x.numpy()}), ref, strict=True):
            assert _rel(out, r.numpy()) < 1e-4


def test_numpy_twin_matches_the_torch_reference():
    from attrimeter.kernels.masked_gem_pool import masked_gem_pool_reference

    g = torch.Generator().manual_seed(1)
    F = torch.relu(torch.randn(3, 7, 5, 3, generator=g, dtype=torch.float64))
    F[:, 0] = 0.0  # a channel entirely below eps
    Z = torch.randn(3, 4, 5, 3, generator=g, dtype=torch.float64) * 4
    scale, shift = torch.rand(7, dtype=torch.float64) + 0.5, torch.randn(7, dtype=torch.float64)
    for p in (1.0, 3.0, 2.7):
        ref = masked_gem_pool_reference(F, Z, p, 1e-6, scale, shift)
        out = ox.masked_gem_pool_numpy(F.float().numpy(), Z.float().numpy(), scale.numpy(), shift.numpy(), p, 1e-6)
        for o, r in zip(out, ref, strict=True):
            assert o.dtype == np.float32
            assert _rel(o, r.numpy()) < 1e-5


@pytest.mark.parametrize("flavor", FLAVORS)
def test_fp16_export_keeps_retrieval(tiny_interpreter, tiny_data, tmp_path, flavor):
    m = ox.export_onnx(tiny_interpreter, tmp_path / "fp16", flavor=flavor, fp16=True, data=tiny_data, progress=False)
    model = onnx.load(str(tmp_path / "fp16" / "model.onnx"))
    dtypes = {init.data_type for init in model.graph.initializer if len(init.dims) == 4}
    assert dtypes == {onnx.TensorProto.FLOAT16}, "convolution weights are fp16 in an fp16 graph"
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert all(o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT for o in model.graph.output)
    r = m.verification.retrieval
    assert r is not None
    assert m.dtype == "float16" and m.verification.tolerance == ox.FP16_TOLERANCE
    # The reference evaluator would take minutes: a plugin graph's retrieval runs on its portable twin.
    assert r.graph == ("portable twin" if flavor == "plugin" else None)
    assert [p.name for p in (tmp_path / "fp16").iterdir()] == ["manifest.json", "model.onnx"]
    for key in ("d_mAP", "d_hat_mAP"):
        assert abs(r.export[key] - r.eager_fp32[key]) <= ox.FP16_MAP_TOLERANCE
    # fp16 really rounds: not bit-identical to fp32, but close.
    assert 1e-6 < m.verification.worst_error < 5e-2
    assert load_manifest(tmp_path / "fp16") == m  # the retrieval record reads back as written


def test_tampered_or_missing_files_are_refused(exports, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exports["portable"], folder)
    load_manifest(folder)
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ManifestError, match=r"model\.onnx does not match its sha256"):
        load_manifest(folder)
    load_manifest(folder, verify=False)  # a quick look at the metadata still works
    (folder / "model.onnx").unlink()
    with pytest.raises(ManifestError, match=r"model\.onnx is listed in the manifest but missing"):
        load_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ManifestError, match="not an AttriMeter export"):
        load_manifest(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not readable JSON"):
        load_manifest(folder)
    (folder / "manifest.json").unlink()
    with pytest.raises(ManifestError, match="no manifest.json"):
        load_manifest(folder)
    with pytest.raises(ManifestError, match="does not exist"):
        load_manifest(tmp_path / "nowhere")


def test_failed_export_leaves_the_old_folder_intact(exports, tiny_interpreter, tmp_path, monkeypatch):
    folder = tmp_path / "export"
    shutil.copytree(exports["portable"], folder)
    before = load_manifest(folder)
    monkeypatch.setattr(ox, "FP32_TOLERANCE", 0.0)  # no export can pass: verification must block publishing
    with pytest.raises(ox.ExportError, match="differs from eager PyTorch at batch 1"):
        ox.export_onnx(tiny_interpreter, folder, progress=False)
    assert load_manifest(folder) == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"], "no staging folder is left behind"


def test_a_new_export_replaces_the_old_one(exports, tiny_interpreter, tmp_path):
    folder = tmp_path / "export"
    shutil.copytree(exports["plugin"], folder)
    ox.export_onnx(tiny_interpreter, folder, flavor="portable", progress=False)
    assert load_manifest(folder).flavor == "portable"
    assert [p.name for p in tmp_path.iterdir()] == ["export"], "neither staging nor backup is left behind"


def test_opset(tiny_interpreter, tmp_path):
    m = ox.export_onnx(tiny_interpreter, tmp_path / "o20", opset=20, progress=False)
    model = onnx.load(str(tmp_path / "o20" / "model.onnx"))
    assert m.opset == 20 == next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    with pytest.raises(ValueError, match=">= 18"):
        ox.export_onnx(tiny_interpreter, tmp_path / "o17", opset=17)


def test_manifest_paths_stay_inside_the_folder(exports, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(exports["portable"], folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["../outside.bin"] = "0" * 64
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ManifestError, match="outside the export folder"):
        load_manifest(folder, verify=False)


def test_export_refuses_to_overwrite_a_foreign_folder(tiny_interpreter, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    with pytest.raises(ox.ExportError, match="not an export folder"):
        ox.export_onnx(tiny_interpreter, folder, progress=False)
    assert (folder / "notes.txt").read_text() == "keep me"


def test_bad_arguments(tiny_interpreter, tmp_path):
    with pytest.raises(ValueError, match="flavor"):
        ox.export_onnx(tiny_interpreter, tmp_path / "x", flavor="fast")
    with pytest.raises(FileNotFoundError):
        ox.export_onnx(tmp_path / "missing.pt", tmp_path / "x")
    from attrimeter.export.build import export

    with pytest.raises(ValueError, match="judged on retrieval"):
        export(tiny_interpreter, tmp_path / "x", fp16=True)
    with pytest.raises(ValueError, match="unknown GPU targets"):
        export(tiny_interpreter, tmp_path / "x", targets=["sm_75"])
    assert not (tmp_path / "x").exists()


def test_cli_export_and_tensorrt_message(tiny_interpreter, tmp_path, capsys):
    from attrimeter.cli import main

    out = tmp_path / "cli"
    assert main(["export", "--checkpoint", str(tiny_interpreter), "--out", str(out), "--targets", "none", "-q"]) == 0
    assert "worst relative error" in capsys.readouterr().out
    assert load_manifest(out).flavor == "portable"
    from attrimeter.artefact.device import tensorrt_available

    if tensorrt_available() is not None:
        rc = main(["export", "--checkpoint", str(tiny_interpreter), "--out", str(tmp_path / "trt"),
                   "--format", "tensorrt", "-q"])
        assert rc == 1
        assert "TensorRT" in capsys.readouterr().err
        assert not (tmp_path / "trt").exists()


def test_no_triton_means_no_kernels_by_default(tiny_interpreter, tmp_path, monkeypatch):
    import importlib.util

    from attrimeter.export import build

    real = importlib.util.find_spec
    monkeypatch.setattr(build.importlib.util, "find_spec", lambda name: None if name == "triton" else real(name))
    manifest = build.export(tiny_interpreter, tmp_path / "x", progress=False)
    assert manifest.kernels is not None and "Triton is not installed" in (manifest.kernels.note or "")
    assert manifest.kernels.index is None and load_manifest(tmp_path / "x") == manifest
    assert not (tmp_path / "x" / "kernels").exists()


def test_map_classifier_exports(tiny_target, tmp_path):
    from attrimeter.engine.interpreter_checkpoint import save_interpreter
    from attrimeter.engine.target import load_target
    from attrimeter.models.interpreter import AttriMeter

    target = load_target(tiny_target)
    model = AttriMeter(target.model, 26, shared="layer3", classifier="map")
    torch.nn.init.normal_(model.head[2].weight, std=0.1)  # maps that are not all 1
    ck = tmp_path / "map.pt"
    save_interpreter(model, target, ck, {"schema": "market1501", "attributes": list(_market_names()),
                                         "image_size": [64, 32]})
    m = ox.export_onnx(ck, tmp_path / "map", progress=False)
    assert m.classifier == "map"
    assert m.verification.worst_error < 1e-4


def _market_names():
    from attrimeter.data.schema import get_schema

    return get_schema("market1501").names
