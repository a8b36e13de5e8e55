"""Smoke test of benchmarks/bench_kernels.py: setup factories and torch providers run and produce rows and reports.

Tiny shapes only; timings are not asserted (they mean nothing on a shared CI CPU).
"""

import csv
from pathlib import Path

import pytest
import torch
from scripts import load_script

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_kernels.py"
TINY = {
    "masked_gem_pool": {"B": (2,), "C": (24,), "HW": (16,), "M": (3,)},
    "attr_distance": {"Q": (2,), "N": (30,), "C": (16,), "M": (3,)},
    "attr_topk": {"Q": (2,), "N": (30,), "C": (16,), "M": (3,), "k": (4,), "order": ("d", "weighted")},
    "explain_topk": {"Q": (2,), "N": (30,), "C": (16,), "M": (3,), "k": (4,)},
}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="module")
def bench():
    with load_script("bench_kernels") as module:
        yield module


def _env(bench):
    return bench.Env(
        device=DEVICE,
        device_name="test device",
        tag="test",
        torch_version=torch.__version__,
        triton_version="x",
        date="2026-01-01T00:00:00Z",
        copy_gb_s=10.0,
        matmul_tflop_s={"float32": 0.05},
    )


def test_sweep_runs_every_op_and_writes_reports(bench, tmp_path):
    env = _env(bench)
    providers = ["naive_eager", "factorised_eager"] + (["triton"] if DEVICE.type == "cuda" else [])
    rows, notes = bench.sweep(list(bench.OPS), TINY, [torch.float32], env, providers, budget_s=0.0, progress=False)
    assert notes == []
    cases = {(r["op"], r["order"]) for r in rows}
    assert cases == {("masked_gem_pool", ""), ("attr_distance", ""), ("attr_topk", "d"), ("attr_topk", "weighted"),
                     ("explain_topk", "")}  # fmt: skip
    assert len(rows) == len(cases) * len(providers)
    for r in rows:
        assert r["status"] == "ok", r
        assert 0 < r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["gb_s"] > 0 and r["tflop_s"] > 0 and r["roofline_frac"] > 0 and r["ideal_mem_mb"] > 0
        assert r["device"] == "test device" and r["date"] == env.date and r["torch"] == torch.__version__
    for case in cases:
        speedups = {r["provider"]: r["speedup_vs_best_torch"] for r in rows if (r["op"], r["order"]) == case}
        torch_speedups = [v for p, v in speedups.items() if p != "triton"]
        assert max(torch_speedups) == pytest.approx(1.0) and min(torch_speedups) <= 1.0

    bench.write_csv(rows, tmp_path / "k.csv")
    bench.write_markdown(rows, ["a note"], env, tmp_path / "k.md")
    bench.write_plot(rows, env, tmp_path / "k.png")
    with (tmp_path / "k.csv").open() as fh:
        reader = csv.DictReader(fh)
        assert tuple(reader.fieldnames) == bench.COLUMNS
        back = list(reader)
    assert len(back) == len(rows) and float(back[0]["median_ms"]) == pytest.approx(rows[0]["median_ms"], rel=1e-5)
    md = (tmp_path / "k.md").read_text()
    assert "## attr_topk" in md and "- a note" in md and "test device" in md
    assert (tmp_path / "k.png").stat().st_size > 1000


def test_failing_provider_gives_an_error_row(bench):
    def broken():
        raise RuntimeError("boom")

    case = bench.Case(
        op="attr_distance", dtype=torch.float32, shape={"Q": 1, "N": 2, "C": 3, "M": 1},
        providers={"naive_eager": lambda: torch.zeros(3), "triton": broken}, ideal_bytes=100, flops=10, output_bytes=8,
    )  # fmt: skip
    rows = bench.run_case(case, _env(bench), ["naive_eager", "triton"], budget_s=0.0)
    assert rows[0]["status"] == "ok" and rows[0]["speedup_vs_best_torch"] == 1.0
    assert rows[1]["status"] == "error: RuntimeError: boom" and "median_ms" not in rows[1]


def test_filters_select_shapes(bench):
    shapes = list(bench.iter_shapes(bench.FULL_SHAPES["attr_distance"], {"Q": {"64"}, "N": {"1000", "100000"}}))
    assert len(shapes) == 2 * 2 * 2  # N x C x M
    assert all(s["Q"] == 64 and s["N"] in (1000, 100000) for s in shapes)
    with pytest.raises(Exception, match="--filter wants KEY=V1,V2"):
        bench._parse_filters(["X=1"])


def test_cli_quick_writes_device_named_files(bench, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "QUICK_SHAPES", TINY)
    assert (
        bench.main(["--quick", "--op", "attr_distance", "--out", str(tmp_path), "--budget", "0", "--no-progress"]) == 0
    )
    tag = "cpu" if DEVICE.type == "cpu" else None
    files = sorted(p.name for p in tmp_path.iterdir())
    assert len(files) == 3 and all(f.startswith("kernels_") for f in files)
    if tag:
        assert files == ["kernels_cpu.csv", "kernels_cpu.md", "kernels_cpu.png"]
        assert "Triton providers skipped" in capsys.readouterr().out
