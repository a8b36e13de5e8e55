import numpy as np
import pytest

from attrimeter.engine.evaluation import ReIDEvaluator, euclidean_distances, evaluate_rank


def brute_force(qf, gf, q_pids, g_pids, q_cams, g_cams, max_rank):
    """Market-1501 protocol, one query at a time, in float64 with plain loops (the reference)."""
    aps, cmcs = [], []
    for i in range(len(qf)):
        d = np.sqrt(((gf.astype(np.float64) - qf[i].astype(np.float64)) ** 2).sum(axis=1))
        order = sorted(range(len(gf)), key=lambda j: (d[j], j))
        kept = [j for j in order if g_pids[j] != -1 and not (g_pids[j] == q_pids[i] and g_cams[j] == q_cams[i])]
        hits = [g_pids[j] == q_pids[i] for j in kept]
        if not any(hits):
            continue
        precisions, found = [], 0
        for r, h in enumerate(hits, start=1):
            if h:
                found += 1
                precisions.append(found / r)
        aps.append(sum(precisions) / found)
        first = hits.index(True) + 1
        cmcs.append([1.0 if first <= r else 0.0 for r in range(1, max_rank + 1)])
    return float(np.mean(aps)), np.mean(cmcs, axis=0), len(aps)


def random_split(rng, nq, ng, ids, cams, dim):
    # Embeddings clustered by identity so that the metrics are neither 0 nor 1.
    centres = rng.normal(size=(ids, dim))
    q_pids = rng.integers(1, ids, nq)
    g_pids = rng.integers(-1, ids, ng)  # includes junk (-1) and distractors (0)
    qf = centres[q_pids] + rng.normal(scale=1.2, size=(nq, dim))
    gf = centres[np.maximum(g_pids, 0)] + rng.normal(scale=1.2, size=(ng, dim))
    # On a grid of 1/8: every float32 product and sum of the GEMM is exact, so the evaluator's float32 distances order
    # entries exactly like the float64 reference, ties included (near-ties within float32 rounding made the ranks of
    # unseeded random inputs differ now and then).
    qf, gf = np.round(qf * 8) / 8, np.round(gf * 8) / 8
    return (qf.astype(np.float32), gf.astype(np.float32), q_pids, g_pids,
            rng.integers(0, cams, nq), rng.integers(0, cams, ng))


@pytest.mark.parametrize("chunk_size", [None, 1, 7])
def test_matches_brute_force(rng, chunk_size):
    qf, gf, qp, gp, qc, gc = random_split(rng, nq=40, ng=300, ids=25, cams=4, dim=16)
    m = evaluate_rank(qf, gf, qp, gp, qc, gc, max_rank=10, chunk_size=chunk_size)
    ref_map, ref_cmc, ref_n = brute_force(qf, gf, qp, gp, qc, gc, 10)
    assert m.num_queries == ref_n
    assert abs(m.mAP - ref_map) < 1e-6
    np.testing.assert_allclose(m.cmc, ref_cmc, atol=1e-6)
    assert 0.0 < m.mAP < 1.0


def test_perfect_and_skipped_queries():
    # Two identities on two cameras, identical embeddings per identity: perfect retrieval; a query whose only match
    # shares its camera is skipped, as the protocol says.
    gf = np.array([[0.0, 0.0], [0.0, 0.1], [5.0, 5.0], [5.0, 5.1]], dtype=np.float32)
    gp = np.array([1, 1, 2, 2])
    gc = np.array([0, 1, 0, 1])
    qf = np.array([[0.0, 0.0], [5.0, 5.0], [9.0, 9.0]], dtype=np.float32)
    qp = np.array([1, 2, 3])
    qc = np.array([0, 0, 0])
    m = evaluate_rank(qf, gf, qp, gp, qc, gc, max_rank=3)
    assert m.mAP == pytest.approx(1.0)
    assert m.rank(1) == pytest.approx(1.0)
    assert (m.num_queries, m.num_skipped) == (2, 1)


def test_evaluator_accumulates_batches(rng):
    qf, gf, qp, gp, qc, gc = random_split(rng, nq=20, ng=90, ids=12, cams=3, dim=8)
    ev = ReIDEvaluator(max_rank=5)
    for s in range(0, 20, 6):
        ev.process(qf[s:s + 6], qp[s:s + 6], qc[s:s + 6], is_query=True)
    for s in range(0, 90, 25):
        ev.process(gf[s:s + 25], gp[s:s + 25], gc[s:s + 25], is_query=False)
    a = ev.evaluate()
    b = evaluate_rank(qf, gf, qp, gp, qc, gc, max_rank=5)
    assert a.mAP == pytest.approx(b.mAP) and np.allclose(a.cmc, b.cmc)
    ev.reset()
    with pytest.raises(ValueError, match="query and gallery"):
        ev.evaluate()


def test_euclidean_is_exact_enough(rng):
    q = rng.normal(size=(5, 33)).astype(np.float32)
    g = np.concatenate([q[:2], rng.normal(size=(7, 33)).astype(np.float32)])
    d = euclidean_distances(q, g)
    ref = np.sqrt(((q[:, None, :].astype(np.float64) - g[None].astype(np.float64)) ** 2).sum(-1))
    # ‖a‖² + ‖b‖² − 2ab in float32: d² is exact to ~eps32·(‖a‖² + ‖b‖²); at the duplicates (d = 0) that leaves d
    # itself off by up to the square root of it, which is why the bound is on d² and not d.
    norms = (q.astype(np.float64) ** 2).sum(1)[:, None] + (g.astype(np.float64) ** 2).sum(1)[None]
    assert (np.abs(d.astype(np.float64) ** 2 - ref**2) <= 8 * 2.0**-23 * norms).all()
    assert np.abs(d - ref)[ref > 1].max() < 1e-4
    assert np.all(d >= 0) and np.isfinite(d).all()  # identical vectors: clamp, no NaN


def test_bad_input_is_named():
    qf = np.zeros((2, 3), np.float32)
    gf = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="g_pids has 3 entries"):
        evaluate_rank(qf, gf, [1, 2], [1, 2, 3], [0, 0], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="non-finite"):
        evaluate_rank(qf * np.nan, gf, [1, 2], [1, 1, 2, 2], [0, 0], [1, 1, 1, 1])
    with pytest.raises(ValueError, match="no query has a true match"):
        evaluate_rank(qf, gf, [7, 8], [1, 1, 2, 2], [0, 0], [1, 1, 1, 1])


def test_large_gallery_is_chunked():
    # 4000 x 20000 would be 640 MB in float64 at once; the chunked path must bound the working set.
    import tracemalloc

    rng = np.random.default_rng()
    qf, gf, qp, gp, qc, gc = random_split(rng, nq=4000, ng=20000, ids=500, cams=6, dim=8)
    tracemalloc.start()
    m = evaluate_rank(qf, gf, qp, gp, qc, gc)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 400 * 2**20, f"peak {peak / 2**20:.0f} MiB"
    assert 0.0 < m.mAP <= 1.0
