"""``Runtime``: indexing, explained search against PyTorch, weighted search, concurrency, bad input, the CLI."""

import json
import os
import threading

import numpy as np
import pytest

from attrimeter.cli import main
from attrimeter.runtime import GalleryError, InputError, Runtime, RuntimeConfig, UnknownIdError
from attrimeter.runtime.backends import BackendError


@pytest.fixture(scope="module")
def indexed(tiny_export, tiny_data, tmp_path_factory):
    """A gallery of the tiny data set's test images, indexed through the runtime."""
    path = tmp_path_factory.mktemp("gallery") / "g"
    with Runtime(tiny_export, path, RuntimeConfig(create_gallery=True)) as rt:
        report = rt.index_folder(tiny_data / "bounding_box_test", segment=7, progress=False)
    assert report.skipped == [] and report.added == len(list((tiny_data / "bounding_box_test").glob("*.jpg")))
    return path


@pytest.fixture(scope="module")
def rt(tiny_export, indexed):
    with Runtime(tiny_export, indexed, RuntimeConfig(max_wait_ms=5)) as runtime:
        yield runtime


def _queries(tiny_data, n=3):
    return sorted((tiny_data / "query").glob("*.jpg"))[:n]


def test_search_agrees_with_pytorch(rt, tiny_data, tiny_interpreter):
    from attrimeter.explain import Interpreter

    explainer = Interpreter(tiny_interpreter)
    gallery_files = sorted((tiny_data / "bounding_box_test").glob("*.jpg"))
    for query in _queries(tiny_data):
        result = rt.search(query, k=5)[0]
        torch_all = explainer.explain_many(query, gallery_files)
        order = np.argsort([e.d for e in torch_all], kind="stable")[:5]
        assert [m.key for m in result.matches] == [gallery_files[i].name for i in order]
        for m, i in zip(result.matches, order, strict=True):
            e = torch_all[i]
            assert m.d == pytest.approx(e.d, rel=1e-4)
            assert m.d_hat == pytest.approx(e.d_hat, rel=2e-3)  # attribute rows are stored in float16
            np.testing.assert_allclose(m.shares, e.shares, atol=2e-3)
            assert m.contributions.sum() == pytest.approx(m.d, rel=1e-5)
            assert m.differing() == e.differing()
            assert m.camera == int(gallery_files[i].name.split("_")[1][1])
        assert [m.rank for m in result.matches] == [1, 2, 3, 4, 5]


def test_weighted_search_ranks_by_the_weighted_score(rt, tiny_data):
    names = rt.attributes
    ignore = {a: 0.0 for a in names if a.startswith("up")}
    query = _queries(tiny_data, 1)[0]
    result = rt.search(query, k=len(rt.gallery), weights=ignore)[0]
    w = np.array([0.0 if a in ignore else 1.0 for a in names])
    scores = [m.score for m in result.matches]
    assert scores == sorted(scores)
    for m in result.matches:
        assert m.score == pytest.approx(float(m.d_k @ w), rel=1e-5)
    plain = rt.search(query, k=len(rt.gallery))[0]
    assert {m.id for m in plain.matches} == {m.id for m in result.matches}  # everything, in another order
    with pytest.raises(InputError, match="unknown attributes"):
        rt.search(query, weights={"wings": 0})
    with pytest.raises(InputError, match="all zero"):
        rt.search(query, weights=dict.fromkeys(names, 0.0))


def test_explain_chosen_ids_and_overlays(rt, tiny_data):
    query = _queries(tiny_data, 1)[0]
    result = rt.explain(query, [3, 0, 3], overlays=2)
    assert [m.id for m in result.matches] == [3, 0, 3]
    assert result.matches[0].d == result.matches[2].d
    h, w = rt.image_size
    for m in result.matches:
        overlays = m.overlays(2)
        for _, q_img, g_img in overlays:
            assert q_img.shape == (h, w, 3) and g_img is not None and g_img.shape == (h, w, 3)
        assert [o.attribute for o in overlays] == [s.name for s in m.top(2)]
        assert m.gallery_image.shape == (h, w, 3) and m.gallery_aam.shape == m.query_aam.shape
    assert len(result.matches[0].figure(top=2).axes) == 4  # the crops, two overlay pairs, the bars
    without = rt.explain(query, [3])
    assert without.matches[0].gallery_image is None and without.matches[0].overlays(1)[0].gallery is None
    with pytest.raises(ValueError, match="gallery_image, .*gallery_aam"):
        without.matches[0].figure()
    with pytest.raises(UnknownIdError, match="not in the gallery"):
        rt.explain(query, [len(rt.gallery)])
    with pytest.raises(InputError, match="integers"):
        rt.explain(query, ["a"])
    doc = json.loads(json.dumps(result.to_dict()))
    assert len(doc["matches"]) == 3 and len(doc["matches"][0]["attributes"]) == len(rt.attributes)


def test_concurrent_searches_get_their_own_answers(rt, tiny_data):
    queries = _queries(tiny_data, 6)
    expected = {q: [(m.id, round(m.d, 4)) for m in rt.search(q, k=4)[0].matches] for q in queries}
    got, errors = {}, []

    def worker(qs):
        try:
            for q in qs:
                got.setdefault(q, []).append([(m.id, round(m.d, 4)) for m in rt.search(q, k=4)[0].matches])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(queries[i % 6:] + queries[:i % 6],)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for q in queries:
        assert all(answer == expected[q] for answer in got[q])


def test_bad_input_is_refused_and_the_gallery_untouched(tiny_export, indexed, tiny_data, tmp_path, rng):
    manifest_before = (indexed / "gallery.json").read_bytes()
    with Runtime(tiny_export, indexed, RuntimeConfig(writable=True)) as rt:
        n = len(rt.gallery)
        good = _queries(tiny_data, 1)[0]
        bad_inputs = [b"garbage", np.full((8, 8, 3), np.nan, np.float32), np.zeros((4, 4), np.uint8),
                      tmp_path / "missing.jpg"]
        for bad in bad_inputs:
            with pytest.raises(InputError):
                rt.add([good, bad])
            with pytest.raises(InputError):
                rt.search(bad)
        with pytest.raises(InputError, match="keys has 1 entries for 2 images"):
            rt.add([good, good], keys=["only one"])
        with pytest.raises(InputError, match="k must be"):
            rt.search(good, k=0)
        assert len(rt.gallery) == n
    assert (indexed / "gallery.json").read_bytes() == manifest_before


def test_add_then_find_itself(tiny_export, tiny_data, tmp_path, rng):
    pixels = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
    with Runtime(tiny_export, tmp_path / "g", RuntimeConfig(create_gallery=True)) as rt:
        ids = rt.add([pixels, _queries(tiny_data, 1)[0]], keys=["random", "a query"], cameras=[3, None])
        assert ids.tolist() == [0, 1]
        best = rt.search(pixels, k=2)[0].matches[0]
        assert best.key == "random" and best.camera == 3 and best.d < 1e-3
        emb = rt.embed([pixels, pixels.astype(np.float32) / 255.0])
        np.testing.assert_array_equal(emb.embedding[0], emb.embedding[1])
        assert emb.probs.shape == (2, len(rt.attributes)) and ((emb.probs > 0) & (emb.probs < 1)).all()


def test_gallery_of_another_model_is_refused(tiny_export, indexed, tmp_path):
    from attrimeter.runtime.gallery import Gallery

    with Gallery.open(indexed) as g:
        other = Gallery.create(tmp_path / "other", dim=g.dim, attributes=g.attributes, aam_shape=g.aam_shape,
                               model="0" * 64)
        other.close()
    with pytest.raises(GalleryError, match="indexed with another model"):
        Runtime(tiny_export, tmp_path / "other")
    with Runtime(tiny_export) as rt, pytest.raises(GalleryError, match="no gallery"):
        rt.search(np.zeros((64, 32, 3), np.uint8))


def test_cli_index_and_search(tiny_export, tiny_data, tmp_path, capsys):
    gallery = tmp_path / "g"
    args = ["--export", str(tiny_export), "-q"]
    assert main(["index", *args, "--images", str(tiny_data / "bounding_box_test"), "--out", str(gallery)]) == 0
    assert "added" in capsys.readouterr().out
    query = str(_queries(tiny_data, 1)[0])
    assert main(["search", *args, "--gallery", str(gallery), query, "--k", "3"]) == 0
    text = capsys.readouterr().out
    assert text.count("d = ") == 3 and "largest shares" in text
    assert main(["search", *args, "--gallery", str(gallery), query, "--k", "3", "--json",
                 "--ignore", "upper-body colour", "--weight", "hat=2"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc[0]["image"] == query and len(doc[0]["matches"]) == 3
    scores = [m["score"] for m in doc[0]["matches"]]
    assert scores == sorted(scores) and scores != [m["d"] for m in doc[0]["matches"]]
    with pytest.raises(SystemExit) as e:
        main(["search", *args, "--gallery", str(gallery), query, "--weight", "hat"])
    assert e.value.code == 2
    assert "name=number" in capsys.readouterr().err


def test_fused_triton_search_agrees_with_the_cpu_path(tiny_export, indexed, tiny_data):
    """The torch backend's fused kernels (compiled on a GPU, interpreted on the CPU) against FAISS + numpy."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"  # compiled kernels take device tensors only
    query = _queries(tiny_data, 1)[0]
    w = {"hat": 3.0, "upblack": 0.0}
    with Runtime(tiny_export, indexed) as cpu:
        plain, weighted = cpu.search(query, k=4)[0], cpu.search(query, k=4, weights=w)[0]
        picked = cpu.explain(query, [2, 5])
    with Runtime(tiny_export, indexed, RuntimeConfig(backend="torch", device=device, fused=True)) as fused:
        assert fused.backend.name == "torch" and fused.stats()["device"].startswith(device)
        for want, got in ((plain, fused.search(query, k=4)[0]), (weighted, fused.search(query, k=4, weights=w)[0]),
                          (picked, fused.explain(query, [2, 5]))):
            assert [m.id for m in got.matches] == [m.id for m in want.matches]
            for a, b in zip(got.matches, want.matches, strict=True):
                assert a.d == pytest.approx(b.d, rel=3e-3)  # the device copy holds float16 global rows
                assert a.score == pytest.approx(b.score, rel=3e-3)
                np.testing.assert_allclose(a.shares, b.shares, atol=3e-3)
    with pytest.raises(BackendError, match="backend='torch'"):
        Runtime(tiny_export, indexed, RuntimeConfig(fused=True))


def test_index_folder_skips_bad_files_and_resumes_by_path(tiny_export, tiny_data, tmp_path):
    import shutil

    images = tmp_path / "images"
    shutil.copytree(tiny_data / "bounding_box_test", images)
    files = sorted(images.glob("*.jpg"))
    files[1].write_bytes(b"not a jpeg")
    with Runtime(tiny_export, tmp_path / "g", RuntimeConfig(create_gallery=True)) as rt:
        report = rt.index_folder(images, segment=4, progress=False)
        assert report.added == len(files) - 1 and [p for p, _ in report.skipped] == [str(files[1])]
        assert rt.index_folder(images, progress=False).added == 0  # resumes: nothing new
        other = tmp_path / "other"  # same names, other folder: new entries
        shutil.copytree(tiny_data / "bounding_box_test", other)
        assert rt.index_folder(other, progress=False).added == len(files)
        with pytest.raises(InputError, match="overlays"):
            rt.search(files[0], k=50, overlays=26)
        with pytest.raises(InputError, match="overlays must be"):
            rt.explain(files[0], [0], overlays=-1)
        with pytest.raises(InputError, match="pictures"):  # repeated ids count too
            rt.explain(files[0], [0] * 300, overlays=1)
    with pytest.raises(RuntimeError, match="closed"):
        rt.stats()


def test_a_reader_sees_what_a_writer_appends(tiny_export, tiny_data, tmp_path, rng):
    pixels = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
    with Runtime(tiny_export, tmp_path / "g", RuntimeConfig(create_gallery=True)) as writer:
        writer.add(_queries(tiny_data, 2), keys=["a", "b"])
        with Runtime(tiny_export, tmp_path / "g", RuntimeConfig(refresh_s=0.0)) as reader, \
                Runtime(tiny_export, tmp_path / "g", RuntimeConfig(refresh_s=None)) as frozen:
            assert reader.search(pixels, k=5)[0].matches[0].key in ("a", "b")
            writer.add(pixels, keys=["new"])
            assert reader.search(pixels, k=5)[0].matches[0].key == "new"  # picked up before the search
            assert len(frozen.search(pixels, k=5)[0].matches) == 2  # refresh_s=None: only on refresh()
            assert frozen.refresh() == 3 and frozen.search(pixels, k=1)[0].matches[0].key == "new"



def test_a_corrupt_new_segment_does_not_stop_a_reader(tiny_export, tiny_data, tmp_path, rng):
    pixels = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
    with Runtime(tiny_export, tmp_path / "g", RuntimeConfig(create_gallery=True)) as writer:
        writer.add(_queries(tiny_data, 2), keys=["a", "b"])
        with Runtime(tiny_export, tmp_path / "g", RuntimeConfig(refresh_s=0.0)) as reader:
            writer.add(pixels, keys=["new"])
            newest = max(os.listdir(tmp_path / "g" / "segments"))  # names start with their first id, zero-padded
            target = tmp_path / "g" / "segments" / newest / "embedding.npy"
            data = bytearray(target.read_bytes())
            data[-1] ^= 0xFF
            target.write_bytes(bytes(data))
            result = reader.search(pixels, k=5)[0]  # serves what it had; the bad segment stays invisible
            assert [m.key for m in result.matches] in (["a", "b"], ["b", "a"])
            assert "sha256" in reader.stats()["gallery_refresh_error"]
    with pytest.raises(RuntimeError, match="closed"):
        reader.search(pixels)


def test_cosine_gallery_ranks_by_cosine(tiny_export, tiny_data, tmp_path):
    with Runtime(tiny_export, tmp_path / "g", RuntimeConfig(create_gallery=True, metric="ip")) as rt:
        rt.index_folder(tiny_data / "bounding_box_test", progress=False)
        assert rt.gallery.metric == "ip"
        query = _queries(tiny_data, 1)[0]
        emb = rt.embed(query).embedding[0].astype(np.float64)
        g = rt.gallery.embeddings(np.arange(len(rt.gallery))).astype(np.float64)
        cos = g @ emb / (np.linalg.norm(g, axis=1) * np.linalg.norm(emb))
        result = rt.search(query, k=5)[0]
        assert [m.id for m in result.matches] == np.argsort(-cos, kind="stable")[:5].tolist()
        for m in result.matches:
            assert m.score == pytest.approx(1 - cos[m.id], abs=1e-5)
            assert m.d == pytest.approx(float(np.linalg.norm(g[m.id] - emb)), rel=1e-4)


def test_empty_gallery_and_the_hit_cap(tiny_export, tmp_path):
    from attrimeter.runtime.runtime import MAX_HITS

    crop = np.zeros((64, 32, 3), np.uint8)
    with Runtime(tiny_export, tmp_path / "g", RuntimeConfig(create_gallery=True)) as rt:
        assert [len(r.matches) for r in rt.search([crop, crop], k=5)] == [0, 0]
        assert rt.search(crop, k=5, weights={"hat": 0})[0].matches == []
        rt.add(crop)
        with pytest.raises(InputError, match="explained hits"):
            rt.explain(crop, [0] * (MAX_HITS + 1))


def test_cli_compact(tiny_export, tiny_data, tmp_path, capsys):
    gallery = tmp_path / "g"
    assert main(["index", "--export", str(tiny_export), "-q", "--images", str(tiny_data / "bounding_box_test"),
                 "--out", str(gallery), "--segment", "5"]) == 0
    capsys.readouterr()
    assert main(["compact", "--gallery", str(gallery), "-q"]) == 0
    assert "merged into 1" in capsys.readouterr().out
    with Runtime(tiny_export, gallery) as rt:
        assert rt.gallery.segments == 1 and len(rt.gallery) == len(list((tiny_data / "bounding_box_test").glob("*")))


@pytest.mark.parametrize(("field", "value"), [("max_batch", 0), ("threads", 0), ("search_threads", 0),
                                              ("queue_size", 1.5),
                                              ("metric", "cos"), ("backend", "tflite"), ("queue_timeout_s", -1.0),
                                              ("refresh_s", float("nan")), ("max_wait_ms", True)])
def test_config_names_a_bad_value(field, value):
    with pytest.raises(ValueError, match=rf"RuntimeConfig\.{field} must be"):
        RuntimeConfig(**{field: value})
    assert RuntimeConfig(refresh_s=None, threads=None).refresh_s is None  # None: "only on refresh()", "its choice"


def test_search_threads_apply_in_the_searching_thread():
    faiss = pytest.importorskip("faiss")
    from attrimeter.runtime.gallery_index import ExactIndex, set_search_threads

    index = ExactIndex(8, "l2")
    index.add(np.eye(8, dtype=np.float32))
    seen = []

    def search() -> None:  # OpenMP keeps the thread count per thread: a server thread must get the setting too
        faiss.omp_set_num_threads(2)
        index.search(np.ones((1, 8), np.float32), 1)
        seen.append(faiss.omp_get_max_threads())

    try:
        set_search_threads(1)
        worker = threading.Thread(target=search)
        worker.start()
        worker.join()
        assert seen == [1]
        with pytest.raises(ValueError, match="search threads"):
            set_search_threads(0)
    finally:
        set_search_threads(RuntimeConfig().search_threads)


def test_device_index_follows_the_backend_and_the_export(tiny_export, indexed):
    """No isinstance dispatch: open_device_index picks the copy, the runtime only asks it what it can do."""
    from types import SimpleNamespace

    from attrimeter.artefact.manifest import load_manifest
    from attrimeter.runtime.device_index import open_device_index
    from attrimeter.runtime.gallery import Gallery

    manifest = load_manifest(tiny_export)
    assert manifest.kernels is None  # exported with targets=()
    with Gallery.open(indexed) as gallery:
        cpu = SimpleNamespace(name="onnxruntime", device="cpu")
        assert open_device_index(cpu, gallery, tiny_export, manifest, None) is None  # FAISS + numpy
        engine = SimpleNamespace(name="tensorrt", device="cuda:0")
        assert open_device_index(engine, gallery, tiny_export, manifest, None) is None  # no AOT kernels to explain
        with pytest.raises(BackendError, match="backend='torch'"):
            open_device_index(engine, gallery, tiny_export, manifest, True)
