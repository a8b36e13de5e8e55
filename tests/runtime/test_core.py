"""Runtime building blocks: image loading, the numpy explain twin, the weighted scan, the dynamic batcher, backends."""

import io
import threading
import time

import numpy as np
import pytest

from attrimeter.runtime.batching import DynamicBatcher
from attrimeter.runtime.decompose import check_weights, explain_rows, weighted_scan
from attrimeter.runtime.errors import InputError, OverloadedError
from attrimeter.runtime.images import as_sources, load_image, to_input
from attrimeter.runtime.scan_kernel import expanded_scores

# ------------------------------------------------------------------------------------------------ images ----------


def _png(pixels: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_load_image_accepts_paths_bytes_and_arrays(rng, tmp_path):
    pixels = rng.integers(0, 256, (32, 16, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    path.write_bytes(_png(pixels))
    for source in (path, str(path), _png(pixels), pixels, pixels.astype(np.float32) / 255.0):
        np.testing.assert_array_equal(load_image(source, (32, 16)), pixels)
    resized = load_image(pixels, (64, 32))
    assert resized.shape == (64, 32, 3) and resized.dtype == np.uint8
    batch = to_input([pixels, pixels])
    assert batch.shape == (2, 3, 32, 16) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[1, :, 3, 5], pixels[3, 5] / 255.0, rtol=1e-6)
    assert len(as_sources(np.stack([pixels] * 3))) == 3 and len(as_sources(path)) == 1


@pytest.mark.parametrize(("source", "message"), [
    (b"not an image", "not a JPEG/PNG/BMP image"),
    (b"", "empty image"),
    (np.zeros((8, 8), np.uint8), "expected an RGB image"),
    (np.zeros((8, 8, 4), np.uint8), "expected an RGB image"),
    (np.full((8, 8, 3), np.nan, np.float32), "NaN"),
    (np.full((8, 8, 3), 2.0, np.float32), "must lie in [0, 1]"),
    (np.zeros((8, 8, 3), np.int64), "uint8 or float"),
    (12, "expected a path"),
])
def test_bad_images_are_named(source, message):
    with pytest.raises(InputError, match="images\\[4\\]") as e:
        load_image(source, (16, 8), "images[4]")
    assert message in str(e.value)


def test_missing_and_truncated_files(tmp_path, rng):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "missing.jpg", (16, 8))
    data = _png(rng.integers(0, 256, (32, 16, 3), dtype=np.uint8))
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="cut.png"):
        load_image(tmp_path / "cut.png", (16, 8))
    with pytest.raises(InputError, match="no images"):
        as_sources([])
    # A tiny PNG whose header claims 20000 x 20000 pixels (a decompression bomb): refused by path and by bytes alike.
    import struct
    import zlib

    png = _png(np.zeros((1, 1, 3), np.uint8))
    ihdr = b"IHDR" + struct.pack(">II", 20000, 20000) + png[24:29]
    bomb = png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]
    (tmp_path / "bomb.png").write_bytes(bomb)
    for source in (tmp_path / "bomb.png", bomb):
        with pytest.raises(InputError, match="pixels"):
            load_image(source, (16, 8))


# ------------------------------------------------------------------------------------------------ explain ---------


def _reference(q, g, weights=None):
    """float64 direct differences, the definition (docs/architecture.md §3)."""
    diff = q[:, None].astype(np.float64) - g.astype(np.float64)
    dist = np.sqrt((diff**2).sum(-1))
    d, d_k = dist[..., 0], dist[..., 1:]
    shares = d_k / d_k.sum(-1, keepdims=True)
    scores = d if weights is None else d_k @ weights
    return d, d_k, shares, d_k.mean(-1), scores


@pytest.mark.parametrize(("m", "c"), [(1, 5), (26, 33)])
def test_explain_rows_matches_the_definition(rng, m, c):
    q = rng.standard_normal((3, m + 1, c)).astype(np.float32)
    g = rng.standard_normal((3, 4, m + 1, c)).astype(np.float16)
    w = rng.uniform(0, 1, m).astype(np.float32)
    got = explain_rows(q, g, w)
    for a, b in zip(got, _reference(q, g, w), strict=True):
        assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-5
    np.testing.assert_allclose(got.shares.sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose((got.shares * got.d[..., None]).sum(-1), got.d, rtol=1e-5)


def test_identical_embeddings_give_uniform_shares():
    q = np.ones((1, 5, 8), np.float32)
    got = explain_rows(q, q[:, None])
    assert got.d[0, 0] == 0 and np.allclose(got.shares, 0.25) and np.isfinite(got.shares).all()


def test_weighted_scan_is_exact(rng):
    m, c, n = 6, 16, 1000
    q = rng.standard_normal((2, m, c)).astype(np.float32)
    g = rng.standard_normal((n, m, c)).astype(np.float16)
    w = np.array([1, 0, 2, 0, 0.5, 1], np.float32)
    chunks = [(s, g[s:s + 128], None) for s in range(0, n, 128)]
    scores, ids = weighted_scan(q, chunks, w, 7)
    ref = np.sqrt(((q[:, None].astype(np.float64) - g.astype(np.float64)) ** 2).sum(-1)) @ w
    want = np.argsort(ref, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(ref, want, 1), rtol=1e-4)
    scores, ids = weighted_scan(q, [(0, g[:3], None)], w, 10)  # fewer entries than k
    assert ids.shape == (2, 3)


def test_weighted_scan_keeps_the_lower_ids_of_entries_tied_at_the_kth_place(rng):
    m, c = 4, 8
    g = rng.standard_normal((60, m, c)).astype(np.float16)
    g[[7, 19, 40, 41, 55]] = g[3]  # six equal entries, in several chunks
    q = rng.standard_normal((3, m, c)).astype(np.float32)
    q[0] = g[3]  # tied at score 0 for query 0
    w = np.ones(m, np.float32)
    chunks = [(s, g[s:s + 16], None) for s in range(0, 60, 16)]
    for k in (1, 2, 4):  # the cut falls inside the tie: the lower ids stay, whatever the chunking
        scores, ids = weighted_scan(q, chunks, w, k)
        assert ids[0].tolist() == [3, 7, 19, 40][:k] and (scores[0] == 0).all()


def test_weighted_scan_ranks_near_duplicates_by_direct_differences(rng):
    # near-duplicates of the query: the norm expansion alone loses their distances to cancellation
    m, c, n = 5, 64, 3000
    base = rng.standard_normal((m, c)).astype(np.float32) * 8
    g = (base + rng.standard_normal((n, m, c)) * np.geomspace(1e-3, 1.0, n)[:, None, None]).astype(np.float16)
    g = g[rng.permutation(n)]
    q = base[None] + np.float32(1e-4)
    w = np.array([1, 0, 3, 0.25, 0], np.float32)
    norms = np.einsum("nac,nac->na", g.astype(np.float32), g.astype(np.float32))
    diff = q[:, None].astype(np.float64) - g.astype(np.float32).astype(np.float64)
    ref = np.sqrt((diff ** 2).sum(-1)) @ w
    want = np.argsort(ref, axis=1, kind="stable")[:, :20]
    for stored in (None, norms):
        chunks = [(s, g[s:s + 500], None if stored is None else stored[s:s + 500]) for s in range(0, n, 500)]
        scores, ids = weighted_scan(q, chunks, w, 20)
        np.testing.assert_array_equal(ids, want)
        np.testing.assert_allclose(scores, np.take_along_axis(ref, want, 1), rtol=1e-5)


@pytest.mark.parametrize(("weights", "message"), [
    ([1, 2], "one value per attribute"), ([1, -1, 0], ">= 0"), ([0, 0, 0], "all zero"),
    ([1, float("nan"), 1], "finite"), (["a", 1, 1], "numbers"), ([1e39, 1, 1], "<= 1e"),
    ([1e-46, 0, 0], "zero in float32"), ([10**400, 1, 1], "numbers"),
])
def test_bad_weights(weights, message):
    with pytest.raises(InputError, match=message):
        check_weights(weights, 3)


# ------------------------------------------------------------------------------------------------ batching --------


def _echo(calls):
    def run(x):
        calls.append(len(x))
        return {"twice": 2 * x, "sum": x.reshape(len(x), -1).sum(1)}
    return run


def test_concurrent_requests_get_their_own_rows(rng):
    calls = []
    batcher = DynamicBatcher(_echo(calls), max_batch=16, max_wait_s=0.01)
    results, errors = {}, []
    inputs = {i: rng.standard_normal((int(rng.integers(1, 6)), 3)).astype(np.float32) for i in range(48)}

    def worker(ids):
        try:
            for i in ids:
                results[i] = batcher(inputs[i])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(range(t, 48, 8),)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    batcher.close()
    assert not errors
    for i, x in inputs.items():
        np.testing.assert_array_equal(results[i]["twice"], 2 * x)
        np.testing.assert_allclose(results[i]["sum"], x.sum(1), rtol=1e-6)
    assert max(calls) <= 16 and sum(calls) == sum(len(x) for x in inputs.values())
    assert len(calls) < 48  # requests were coalesced
    assert batcher.stats.rows == sum(calls) and batcher.stats.batches == len(calls)


def test_large_requests_are_split_and_reassembled(rng):
    calls = []
    batcher = DynamicBatcher(_echo(calls), max_batch=4, max_wait_s=0.0)
    x = rng.standard_normal((11, 2)).astype(np.float32)
    np.testing.assert_array_equal(batcher(x)["twice"], 2 * x)
    batcher.close()
    assert max(calls) <= 4


def test_engine_errors_reach_every_caller_and_the_batcher_survives():
    state = {"fail": True}

    def run(x):
        if state["fail"]:
            raise RuntimeError("engine exploded")
        return {"y": x}

    batcher = DynamicBatcher(run, max_batch=8, max_wait_s=0.0)
    with pytest.raises(RuntimeError, match="engine exploded"):
        batcher(np.zeros((2, 1), np.float32))
    state["fail"] = False
    np.testing.assert_array_equal(batcher(np.ones((2, 1), np.float32))["y"], 1)
    assert batcher.stats.failed_batches == 1
    batcher.close()


def test_full_queue_means_overloaded():
    release = threading.Event()

    def slow(x):
        release.wait(5)
        return {"y": x}

    batcher = DynamicBatcher(slow, max_batch=1, max_wait_s=0.0, queue_size=2)
    first = batcher.submit(np.zeros((1, 1), np.float32))
    time.sleep(0.05)  # the engine holds the first request; two more fill the queue
    batcher.submit(np.zeros((1, 1), np.float32))
    batcher.submit(np.zeros((1, 1), np.float32))
    with pytest.raises(OverloadedError, match="queue is full"):
        batcher.submit(np.zeros((1, 1), np.float32), timeout=0.05)
    assert batcher.stats.rejected == 1
    release.set()
    assert first[0].result(5)["y"].shape == (1, 1)
    batcher.close()
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(np.zeros((1, 1), np.float32))


def test_batches_wait_for_company_but_not_forever():
    calls = []
    batcher = DynamicBatcher(_echo(calls), max_batch=64, max_wait_s=0.05)
    futures = [batcher.submit(np.zeros((1, 1), np.float32))[0] for _ in range(5)]
    for f in futures:
        f.result(5)
    batcher.close()
    assert calls == [5]  # submitted within the wait: one engine call


def test_weighted_scores_of_a_row_do_not_depend_on_its_batch(rng):
    """Equal entries scored in batches of different sizes (chunks, shards) tie exactly: no BLAS product's order."""
    q = rng.standard_normal((1, 14, 8)).astype(np.float32)
    g = rng.standard_normal((1, 40, 14, 8)).astype(np.float16)
    w = rng.random(13).astype(np.float32)
    full = explain_rows(q, g, w).scores[0]
    for p in range(1, 40):
        np.testing.assert_array_equal(explain_rows(q, g[:, :p], w).scores[0], full[:p])


@pytest.mark.parametrize("c", [1, 7, 16, 33, 256])
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("with_norms", [True, False])
@pytest.mark.parametrize("by_attribute", [False, True])
def test_expanded_scores_match_numpy(rng, c, dtype, with_norms, by_attribute):
    """The compiled scan against the expansion in float64, on odd widths, a strided view and a block-crossing n, with
    rows stored entry by entry or attribute by attribute (format 4: a transposed view of [M, n, C] planes)."""
    m, n = 5, 300  # n > the kernel's block of 256 rows
    base = rng.standard_normal((n + 3, m + 2, c)) * 3
    base[1, :, 0] = 6.0e-8  # float16 subnormals widen exactly
    if by_attribute:  # a chunk of a segment's planes, as Gallery.scan_chunks gives them: planes stay contiguous
        rows = np.ascontiguousarray(base.astype(dtype).transpose(1, 0, 2)).transpose(1, 0, 2)[1:-2, 1:-1]
        assert all(rows[:, a].flags.c_contiguous for a in range(m)) and not rows.flags.c_contiguous
    else:
        rows = base.astype(dtype)[1:-2, 1:-1]  # a strided view, as a memory map's slice would be
    active = np.array([4, 0, 2])
    q = rng.standard_normal((2, len(active), c)).astype(np.float32)
    g = rows.astype(np.float64)[:, active]
    g_sq = (g ** 2).sum(-1)
    norms = np.einsum("nmc,nmc->nm", rows.astype(np.float32), rows.astype(np.float32)) if with_norms else None
    q_sq = np.einsum("qac,qac->qa", q, q)
    w = np.array([1.0, 0.5, 2.0], np.float32)
    scores, g_max = expanded_scores(rows, norms, active, q, q_sq, w)
    sq = q_sq[:, None].astype(np.float64) + g_sq[None] - 2 * np.einsum("nac,qac->qna", g, q.astype(np.float64))
    want = np.sqrt(np.maximum(sq, 0)) @ w
    assert scores.shape == (2, n) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, want, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(g_max, g_sq.max(0), rtol=1e-5)
    with pytest.raises(TypeError, match="float16 or float32"):
        expanded_scores(rows.astype(np.float64), norms, active, q, q_sq, w)
    with pytest.raises(ValueError, match="active must be attribute indices"):  # the kernels do not check indices
        expanded_scores(rows, norms, np.array([4, 0, m]), q, q_sq, w)


def test_expanded_scores_run_concurrently_and_agree(rng):
    """nogil: threads scanning at once get what one thread gets."""
    from concurrent.futures import ThreadPoolExecutor

    rows = rng.standard_normal((2000, 4, 32)).astype(np.float16)
    q = rng.standard_normal((1, 4, 32)).astype(np.float32)
    args = (rows, None, np.arange(4), q, np.einsum("qac,qac->qa", q, q), np.ones(4, np.float32))
    want = expanded_scores(*args)[0]
    with ThreadPoolExecutor(4) as pool:
        for got in pool.map(lambda _: expanded_scores(*args)[0], range(8)):
            np.testing.assert_array_equal(got, want)


def test_a_failing_batch_does_not_kill_the_inference_thread():
    batcher = DynamicBatcher(lambda x: {"y": x}, max_batch=8, max_wait_s=0.05)
    a = batcher.submit(np.zeros((1, 2), np.float32))[0]
    b = batcher.submit(np.zeros((1, 3), np.float32))[0]  # cannot be stacked with a: the whole batch fails
    for f in (a, b):
        with pytest.raises(ValueError):
            f.result(5)
    np.testing.assert_array_equal(batcher(np.ones((2, 2), np.float32), timeout=5)["y"], 1)
    batcher.close()


def test_close_runs_what_was_queued_and_refuses_the_rest():
    calls = []
    batcher = DynamicBatcher(_echo(calls), max_batch=2, max_wait_s=0.0)
    futures = [f for _ in range(5) for f in batcher.submit(np.ones((1, 1), np.float32))]
    closer = threading.Thread(target=batcher.close)
    closer.start()
    late = []
    for _ in range(200):
        try:
            late += batcher.submit(np.ones((1, 1), np.float32))
        except RuntimeError:
            break
    closer.join(10)
    assert not closer.is_alive()
    for f in futures + late:  # everything accepted is answered; nothing hangs
        assert f.result(5)["twice"][0, 0] == 2
    with pytest.raises(RuntimeError, match="closed"):
        batcher.submit(np.ones((1, 1), np.float32))


def test_waiting_callers_each_keep_their_own_timeout():
    release = threading.Event()
    batcher = DynamicBatcher(lambda x: (release.wait(10), {"y": x})[1], max_batch=1, max_wait_s=0.0, queue_size=1)
    batcher.submit(np.zeros((1, 1), np.float32))
    time.sleep(0.05)
    batcher.submit(np.zeros((1, 1), np.float32))  # the queue is now full
    waited = {}

    def caller(i):
        t0 = time.monotonic()
        with pytest.raises(OverloadedError):
            batcher.submit(np.zeros((1, 1), np.float32), timeout=0.3)
        waited[i] = time.monotonic() - t0

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(waited) == 4 and max(waited.values()) < 1.0  # 4 x 0.3 s if they queued behind each other
    t0 = time.monotonic()
    with pytest.raises(OverloadedError):
        batcher.submit(np.zeros((1, 1), np.float32), timeout=0)
    assert time.monotonic() - t0 < 0.2
    release.set()
    batcher.close()


def test_the_queue_is_bounded_by_time_not_by_requests():
    per_row = 0.02

    def engine(x):
        time.sleep(per_row * len(x))
        return {"y": x}

    batcher = DynamicBatcher(engine, max_batch=4, max_wait_s=0.0, queue_size=1024)
    batcher(np.zeros((4, 1), np.float32), timeout=None)  # the engine's rate is measured from here on
    assert batcher.backlog_s(10) >= 10 * per_row * 0.9  # sleeps never end early; a busy machine makes them longer
    with pytest.raises(OverloadedError, match="queued work"):  # refused at once from the estimate, not after waiting
        batcher.submit(np.zeros((40, 1), np.float32), timeout=0.3)
    assert batcher.stats.rejected == 1 and batcher.stats.batches == 1  # and none of it ran
    np.testing.assert_array_equal(batcher(np.ones((4, 1), np.float32), timeout=0.3)["y"], 1)  # fits: served
    batcher.close()


def test_requests_whose_time_ran_out_are_not_run():
    release, calls = threading.Event(), []

    def engine(x):
        calls.append(len(x))
        release.wait(10)
        return {"y": x}

    batcher = DynamicBatcher(engine, max_batch=1, max_wait_s=0.0)
    running = batcher.submit(np.zeros((1, 1), np.float32), timeout=None)[0]
    time.sleep(0.05)  # the engine holds it
    late = batcher.submit(np.ones((1, 1), np.float32), timeout=0.1)[0]
    patient = batcher.submit(np.ones((1, 1), np.float32), timeout=None)[0]
    assert batcher.queued_rows == 2
    time.sleep(0.3)
    release.set()
    running.result(5)
    with pytest.raises(OverloadedError, match="waited more than 0.1 s"):
        late.result(5)
    patient.result(5)
    assert calls == [1, 1] and batcher.stats.rejected == 1 and batcher.queued_rows == 0  # the late one never ran
    batcher.close()
