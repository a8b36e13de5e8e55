"""The scale benchmark's helpers: resampled rows (benchmarks/resampling.py) and the 10^8 capacity model
(benchmarks/capacity_model.py)."""

from __future__ import annotations

import numpy as np
import pytest

from attrimeter.runtime.gallery import Gallery
from tests.scripts import load_script


@pytest.fixture
def source(tmp_path):
    rng = np.random.default_rng(0)
    n, m, c = 50, 3, 8
    g = Gallery.create(tmp_path / "source", dim=c, attributes=["a", "b", "c"], aam_shape=(2, 2), model="m")
    g.append(rng.standard_normal((n, c), dtype=np.float32), rng.standard_normal((n, m, c), dtype=np.float32),
             rng.random((n, m), dtype=np.float32), [{"key": f"k{i}"} for i in range(n)],
             aam=rng.random((n, m, 2, 2), dtype=np.float32))
    yield g
    g.close()


def test_resampled_chunks_cover_the_entries_alike_with_and_without_maps(source):
    with load_script("resampling") as resampling:
        plain = list(resampling.resampled_chunks(source, 23, chunk=10, workers=1))
        mapped = list(resampling.resampled_chunks(source, 23, chunk=10, workers=3, maps=True))
        assert [c.first for c in plain] == [0, 10, 20] and sum(len(c.embedding) for c in plain) == 23
        for a, b in zip(plain, mapped, strict=True):
            assert a.aam is None and b.aam.shape == (len(b.embedding), 3, 2, 2)
            np.testing.assert_array_equal(a.embedding, b.embedding)
            np.testing.assert_array_equal(a.attr_embeddings, b.attr_embeddings)
        # Maps are copied source rows.
        real = source.aam(np.arange(len(source)))
        assert all(any(np.array_equal(row, r) for r in real) for row in mapped[0].aam)
        with pytest.raises(ValueError, match="entries must be positive"):
            next(resampling.resampled_chunks(source, 0))


def test_fill_gallery_writes_entries_without_maps_and_they_cannot_be_resampled_with_maps(tmp_path, source):
    with load_script("resampling") as resampling:
        resampling.fill_gallery(tmp_path / "big", source, 30, chunk=16, workers=2)
        with Gallery.open(tmp_path / "big", progress=False) as big:
            assert len(big) == 30 and big.aam_shape is None and big.meta([29])[0]["key"] == "synthetic-29"
            with pytest.raises(ValueError, match="no attention maps"):
                next(resampling.resampled_chunks(big, 5, maps=True))


def _measured(**changes: float) -> dict[str, float]:
    m = {"entries": 1e6, "ann_entries": 1e6, "runtime_p50_ms": 100.0, "runtime_p99_ms": 200.0, "ivf_p50_ms": 1.0,
         "ivf_p99_ms": 2.0, "explain_p50_ms": 2.0, "explain_p99_ms": 5.0, "flat_index_b": 1024.0,
         "exact_index_b": 512.0, "ivf_index_b": 40.0,
         "actor_base_b": 100 * 2**20, "actor_per_entry_b": 1200.0, "disk_per_entry_b": 16400.0,
         "payload_today_b": 16100.0, "payload_compact_b": 5300.0, "fanout_p50_a": 2.0, "fanout_p50_b": 1.5,
         "fanout_p99_a": 3.0, "fanout_p99_b": 0.5, "weighted_p50_ms": 2000.0}
    return {**m, **changes}


def test_capacity_model_sums_the_parts_and_takes_the_tightest_resource():
    with load_script("capacity_model") as model:
        d = model.design(_measured(), 100, "flat", "today")
        assert d["per_shard"] == 1e6 and d["search_p50"] == pytest.approx(100.0)
        assert d["disk_tb"] == pytest.approx(model.ENTRIES * (16400 + model.SCAN_COPY_B) / 1e12)  # + format 4's copy
        ram = 100 * 100 * 2**20 + model.ENTRIES * 1200
        assert d["ram_gib"] == pytest.approx(ram / 2**30)
        assert d["nodes"] == max(-(-100 // model.NODE_CORES),
                                 -(-ram // int(model.NODE_RAM_GIB * 2**30 * model.NODE_RAM_USABLE)))
        assert d["fan_p99"] >= d["fan_p50"] == pytest.approx(2.0 + 1.5 * 100)  # the p99 fit is kept above the p50
        assert d["p50"] == pytest.approx(d["search_p50"] + d["fan_p50"] + d["net"])
        assert d["net"] > model.RTT_MS  # several nodes: a round trip and the rows of remote shards
        c = model.design(_measured(), 16, "ivf", "compact")
        assert c["search_p50"] == pytest.approx(1.0 * 100 / 16 + 2.0)
        assert c["disk_tb"] == pytest.approx(model.ENTRIES * (5300 + 300) / 1e12)
        assert c["ram_gib"] < d["ram_gib"]
