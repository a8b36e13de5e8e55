"""benchmarks/gpu_check.py without a GPU: the dry run's report, the wheel and requirement checks, and the full run's
bookkeeping (pytest reports, time limits, result files). No network: wheels are built here as small zip files."""

import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gc():
    with load_script("gpu_check") as module:
        yield module


def _wheel(folder: Path, version: str = "1.15.1", tag: str = "cp310-abi3-manylinux_2_28_x86_64",
           requires: tuple[str, ...] = ("numpy>=1.25", "packaging")) -> Path:
    """A stand-in faiss-cpu wheel: a stub module and the metadata pip and the checks read."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"faiss_cpu-{version}-{tag}.whl"
    info = f"faiss_cpu-{version}.dist-info"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("faiss/__init__.py", "class IndexFlatL2:\n    def __init__(self, d):\n        self.ntotal = 0\n")
        zf.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: faiss-cpu\nVersion: {version}\n"
                    + "".join(f"Requires-Dist: {r}\n" for r in requires) + 'Requires-Dist: pytest; extra == "test"\n')
        zf.writestr(f"{info}/WHEEL", f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: false\nTag: {tag}\n")
        zf.writestr(f"{info}/RECORD", "")
    return path


def _dry(wheels: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), "--dry", "--wheels", str(wheels)], capture_output=True,
                          text=True, timeout=300)


def test_dry_run_without_the_wheels_names_what_is_missing(tmp_path):
    proc = _dry(tmp_path / "none")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    out = proc.stdout
    assert "FAIL  faiss-cpu==1.15.1: no wheel in" in out and "make gpu-check downloads it" in out
    assert "no GPU here: the kit is NOT ready" in out
    for step in ("install", "env", "tests_kernels", "tests_gpu", "bench_kernels", "bench_runtime", "bench_training"):
        assert f"  {step} " in out
    assert 'carry=[".whl"], timeout_s=600' in out


def test_dry_run_with_the_wheels_is_ready_and_installs_offline(tmp_path):
    _wheel(tmp_path / "whl")
    proc = _dry(tmp_path / "whl")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "ok    faiss-cpu 1.15.1: faiss_cpu-1.15.1-cp310-abi3-manylinux_2_28_x86_64.whl" in out
    assert "installed --no-deps with faiss_cpu-1.15.1" in out and "attrimeter.kernels.attr_distance, faiss" in out
    assert "of 64 MiB" in out and "FAIL" not in out
    assert out.rstrip().endswith("no GPU here: the kit is ready.")


@pytest.mark.parametrize(("wheels", "problem"), [
    ([("1.15.1", "cp310-abi3-macosx_14_0_arm64")], "do not install on CPython 3.12 x86-64"),
    ([("1.15.1", "cp313-cp313-manylinux_2_28_x86_64")], "do not install on CPython 3.12 x86-64"),
    ([("1.14.0", "cp310-abi3-manylinux_2_28_x86_64")], "version 1.14.0, expected 1.15.1"),
    ([("1.15.1", "cp310-abi3-manylinux_2_28_x86_64"), ("1.14.0", "cp310-abi3-manylinux_2_28_x86_64")],
     "2 wheels in"),
])
def test_unusable_wheels_are_refused(gc, tmp_path, wheels, problem):
    for version, tag in wheels:
        _wheel(tmp_path, version, tag)
    lines, problems = gc.check_wheels(tmp_path)
    assert any(problem in p for p in problems), problems


def test_requirements_the_image_cannot_meet_are_named(gc, tmp_path):
    _wheel(tmp_path, requires=("numpy<2", "leftpad>=1"))
    lines, problems = gc.check_requirements(tmp_path)
    assert lines == []
    assert any("requires numpy<2; the image has numpy 2.5.2" in p for p in problems), problems
    assert any("requires leftpad>=1, which the image lacks and nothing carries" in p for p in problems), problems
    _wheel(tmp_path)  # overwrites the file: requirements the image meets
    lines, problems = gc.check_requirements(tmp_path)
    assert problems == [] and "are in the image or carried" in lines[0]


def _junit(path: Path, cases: dict[str, str]) -> Path:
    body = {"passed": "", "failed": '<failure message="assert 1 == 2"/>', "skipped": '<skipped message="no GPU"/>'}
    rows = "".join(f'<testcase classname="tests.export.{k.split("::")[0]}" name="{k.split("::")[1]}">'
                   f"{body[v]}</testcase>" for k, v in cases.items())
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{rows}</testsuite></testsuites>')
    return path


def test_junit_report_requires_the_gpu_paths_to_pass(gc, tmp_path):
    ok = gc.junit_outcome(_junit(tmp_path / "a.xml", {"test_clib::test_ctest": "passed", "test_clib::x": "skipped"}),
                          ["test_clib::test_ctest"])
    assert ok.status == "pass" and ok.figures[0]["value"] == "1 / 0 / 1"
    skipped = gc.junit_outcome(_junit(tmp_path / "b.xml", {"test_clib::test_ctest": "skipped"}),
                               ["test_clib::test_ctest", "test_gpu_training::test_adam"])
    assert skipped.status == "fail"
    assert "REQUIRED test_clib::test_ctest: skipped" in skipped.notes
    assert "REQUIRED test_gpu_training::test_adam: not collected" in skipped.notes
    failed = gc.junit_outcome(_junit(tmp_path / "c.xml", {"test_aot::test_y[a]": "failed"}), [])
    assert failed.status == "fail" and failed.notes == ["FAILED test_aot::test_y[a]: ['assert 1 == 2']"]
    assert gc.junit_outcome(tmp_path / "missing.xml", []).status == "fail"


def test_a_step_past_its_limit_is_killed_and_reported(gc, tmp_path):
    runner = gc.Runner(tmp_path / "work", tmp_path / "out", budget=100)
    step = gc.Step("env", 0, 1.0, (), "test")
    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    t0 = time.monotonic()
    runner.wait([(step, proc, t0, 1.0)])
    assert time.monotonic() - t0 < 30 and proc.poll() is not None
    assert runner.outcomes["env"].status == "timeout"
    assert runner.blocked(gc.Step("bench_kernels", 2, 10, ("env",), "test")) == "skipped: needs env"


def test_report_writes_at_most_eight_files_and_fails_on_a_missed_step(gc, tmp_path, capsys):
    runner = gc.Runner(tmp_path / "work", tmp_path / "out", budget=100)
    (tmp_path / "out").mkdir()
    runner.outcomes = {s.name: gc.Outcome("pass", 1.0, figures=[]) for s in gc.STEPS}
    runner.outcomes["bench_runtime"] = gc.Outcome("pass", 2.0, figures=[
        {"name": "p99", "value": 12.5, "unit": "ms", "target": "p99 < 10 ms", "ok": False}])
    runner.outcomes["bench_training"] = gc.Outcome("timeout", 120.0, notes=["killed"])
    (runner.work / "logs" / "env.log").write_text("env log line\n")
    assert gc.report(runner, runner.out, "2026-01-01T00:00:00Z", 300.0, tmp_path / "no-wheels") == 1
    files = sorted(p.name for p in runner.out.iterdir())
    assert files == ["gpu_check_gpu.csv", "gpu_check_gpu.log", "gpu_check_gpu.md"]
    md = (runner.out / "gpu_check_gpu.md").read_text()
    assert "| bench_training | timeout | 120 | killed |" in md and "| p99 | 12.5 ms | p99 < 10 ms | NO |" in md
    assert "env log line" in (runner.out / "gpu_check_gpu.log").read_text()
    printed = capsys.readouterr().out
    assert "p99 12.5 ms MISSED p99 < 10 ms" in printed and printed.rstrip().endswith("on unknown")
