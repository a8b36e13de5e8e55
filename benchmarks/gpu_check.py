"""GPU proof kit: one command that proves every GPU path of AttriMeter on a lent GPU, or rehearses itself without one.

On a machine with an NVIDIA GPU (the lent H200: README, "GPU check") it runs, under one deadline (``--budget``):

1. ``install``: the project without network into a scratch site folder: a wheel built from this tree with the
   machine's own setuptools (``pip wheel --no-index --no-build-isolation``; the carried ``.whl/attrimeter-*.whl`` if
   that fails) and the carried wheels of what the machine's image lacks (``CARRIED``), all ``--no-deps``;
2. ``env``: versions, device, driver, and the two measured ceilings (device copy bandwidth, matmul rates);
3. side by side: the compiled kernel tests; the GPU-only tests (fused search, the AOT explain kernel through
   cuda-python, the C launcher library built with CMake and its test program against the references, the CUDA
   training smoke test); the data, model and 10^6-entry gallery of the runtime benchmark; the training data;
4. alone on the GPU: the kernel, runtime and training benchmarks at the sizes the kernel and runtime issues named.

Every step is a process with its own time limit; a failing step stops only the steps that need it. It writes at most
8 files to ``--out`` (``$OUT`` on the lent machine): ``gpu_check_TAG.{md,csv,log}``, ``env_TAG.txt``,
``kernels_TAG.{csv,md}`` and ``runtime_torch_TAG.{csv,md}`` (TAG from the device name, e.g. ``nvidia_h200``), and
prints a pass/fail table with the figures last.

Without a GPU (or with ``--dry``) it rehearses: the carried wheels (present, one version each, tagged for the image's
CPython 3.12 on x86-64, their requirements and the project's in the image or carried, importable here where their
tags allow), the project built and installed offline, the size of the tree that would travel, and the steps; then it
prints "no GPU here" and exits 0 when the kit is ready, 1 when not. ``--prepare`` (what ``make gpu-check`` runs) first
downloads missing wheels and builds the project wheel into ``.whl``.

    python benchmarks/gpu_check.py [--out DIR] [--dry] [--prepare] [--wheels DIR] [--budget SECONDS]

Needs Python >= 3.11 (tomllib) and ``packaging``; the project itself is installed by the kit, not imported here.
That is also why it is one file of ~640 lines: it runs on a bare machine before the project exists there, so it can
import no helper of ours and must travel as one self-contained script.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import tomllib
from packaging.requirements import Requirement
from packaging.tags import Tag, compatible_tags, cpython_tags, sys_tags
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
# What the lent machine's image lacks, carried as wheels (one pinned version each).
CARRIED = {"faiss-cpu": "1.15.1"}
# The image's Python packages (the device tool's KINDS.md, read 2026-11) with the versions seen there; None: present,
# version not recorded. Listed: what the project, the carried wheels and this kit (pytest, xdist, setuptools) use.
IMAGE = {"numpy": "2.5.2", "torch": "2.11.0", "triton": "3.6.0", "onnx": "1.23.1", "onnxruntime": "1.30.0",
         "onnxscript": "0.7.2", "tqdm": None, "pyyaml": None, "scipy": None, "pillow": None, "matplotlib": None,
         "packaging": None, "pytest": None, "pytest-xdist": None, "setuptools": None, "cuda-bindings": None}
IMAGE_PYTHON = (3, 12)
# The image's glibc is newer than 2.35 (Python 3.12.3 there, Ubuntu 24.04's); manylinux wheels up to 2_35 are taken.
IMAGE_PLATFORMS = [f"manylinux_2_{n}_x86_64" for n in range(35, 16, -1)] + ["manylinux2014_x86_64"]
EXTRAS = ("train", "kernels", "export", "runtime")  # what runs on the GPU machine (not trt, not dev)
TREE_LIMIT = 64 * 2**20
DEFAULT_BUDGET = 530.0  # seconds: under 9 minutes, so a rerun fits the lease
RUN_TIMEOUT = 600  # the device tool's per-command limit
XDIST = importlib.util.find_spec("xdist") is not None


@dataclass(frozen=True)
class Step:
    """One step: its phase (0 set-up, 1 side by side, 2 alone on the GPU), time limit, prerequisites and purpose."""

    name: str
    phase: int
    timeout: float
    needs: tuple[str, ...]
    what: str


STEPS = (
    Step("install", 0, 120, (), "pip --no-index --no-deps: a wheel of this tree (else the carried one) + the "
         "carried wheels"),
    Step("env", 0, 90, ("install",), "nvidia-smi, versions, SMs, L2; measured copy bandwidth and matmul rates"),
    Step("tests_kernels", 1, 240, ("install",), "tests/kernels, compiled"),
    Step("tests_gpu", 1, 240, ("install",), "GPU-only tests: fused search, torch backend with the fused pooling, "
         "cuda-python AOT explain, C launcher (CMake) vs references, CUDA training smoke test"),
    Step("prep_runtime", 1, 240, ("install",), "synthetic data, a demo-size model trained and exported, a gallery of "
         "10^6 entries"),
    Step("prep_training", 1, 120, ("install",), "synthetic data at 256x128"),
    Step("bench_kernels", 2, 200, ("env",), "masked_gem_pool B=256 C=2048 HW=192 M=26 bf16 (every provider); "
         "attr_distance full scan and explain top-k, Q=64 N=1e5 C=2048 M=26"),
    Step("bench_runtime", 2, 150, ("env", "prep_runtime"), "search + explain of one query against 10^6 entries, "
         "torch backend, fused kernels: p50 / p99"),
    Step("bench_training", 2, 120, ("prep_training",), "target + interpreter training throughput (images/s)"),
)
PYTEST_PATHS = {
    "tests_kernels": ["tests/kernels"],
    "tests_gpu": ["tests/export/test_clib.py", "tests/export/test_aot.py", "tests/runtime/test_tensorrt_backend.py",
                  "tests/runtime/test_cuda_kernels.py",
                  "tests/runtime/test_runtime.py::test_fused_triton_search_agrees_with_the_cpu_path",
                  "tests/runtime/test_backends.py::test_onnxruntime_and_torch_backends_agree",
                  "tests/engine/test_gpu_training.py"],
}
# Tests that must pass (not skip) on the GPU: the paths this machine cannot run.
REQUIRED = {
    "tests_gpu": ["test_clib::test_program_against_reference", "test_clib::test_ctest",
                  "test_cuda_kernels::test_explainer_matches_numpy",
                  "test_runtime::test_fused_triton_search_agrees_with_the_cpu_path",
                  "test_backends::test_onnxruntime_and_torch_backends_agree[cuda]",
                  "test_gpu_training::test_cuda_loss_and_gradients_match_the_cpu",
                  "test_gpu_training::test_adam_steps_on_cuda_stay_finite"],
}


def device_command(budget: float = DEFAULT_BUDGET) -> str:
    """The device tool call that runs the kit (also printed by the dry run)."""
    return (f'run(command="PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT --budget {budget:g}", '
            f'carry=[".whl"], timeout_s={RUN_TIMEOUT})')


# ------------------------------------------------------------------------------------------------------- wheels


def image_tags() -> set[Tag]:
    """Wheel tags that the image's CPython 3.12 on x86-64 Linux installs."""
    return {*cpython_tags(IMAGE_PYTHON, platforms=IMAGE_PLATFORMS),
            *compatible_tags(IMAGE_PYTHON, "cp312", platforms=IMAGE_PLATFORMS)}


def source_digest(root: Path = REPO) -> str:
    """sha256 over the installed package folders and pyproject.toml: which tree a project wheel was built from."""
    config = tomllib.loads((root / "pyproject.toml").read_text())
    h = hashlib.sha256((root / "pyproject.toml").read_bytes())
    for folder in sorted(set(config["tool"]["setuptools"]["package-dir"].values())):
        for path in sorted((root / folder).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def build_project_wheel(dest: Path, offline: bool, timeout: float = 120) -> Path:
    """Build the project's wheel from a copy of its sources (the tree stays untouched) with this Python's setuptools.

    Raises:
        RuntimeError: The build failed; the message holds pip's last lines.
    """
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        for name in ("pyproject.toml", config["project"]["readme"]):
            shutil.copy2(REPO / name, src / name)
        for folder in set(config["tool"]["setuptools"]["package-dir"].values()):
            shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
        dest.mkdir(parents=True, exist_ok=True)
        for old in dest.glob("attrimeter-*.whl"):
            old.unlink()
        cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dest),
               str(src), *(["--no-index"] if offline else [])]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError("pip wheel failed: " + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:]))
    return next(dest.glob("attrimeter-*.whl"))


def prepare(wheels: Path) -> None:
    """Download the carried wheels that are missing and build the project wheel into ``wheels`` (PyPI needed)."""
    wheels.mkdir(parents=True, exist_ok=True)
    have = {parse_wheel_filename(p.name)[:2] for p in wheels.glob("*.whl")}
    platforms = [arg for p in IMAGE_PLATFORMS for arg in ("--platform", p)]
    for name, version in CARRIED.items():
        if (canonicalize_name(name), Version(version)) in have:
            continue
        print(f"prepare: downloading {name}=={version} for CPython 3.12 x86-64 into {wheels}")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                        "--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(wheels),
                        f"{name}=={version}"], check=True)
    wheel = build_project_wheel(wheels, offline=False)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    dirty = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, cwd=REPO).stdout.strip()
    (wheels / "manifest.json").write_text(json.dumps({
        "project_wheel": wheel.name, "digest": source_digest(), "commit": commit.stdout.strip() or "unknown",
        "local_changes": bool(dirty)}, indent=1) + "\n")
    print(f"prepare: built {wheel.name}")


def check_wheels(wheels: Path) -> tuple[list[str], list[str]]:
    """Check that each carried wheel is there once, at its pinned version, tagged for the image's Python.

    Returns:
        ``(report lines, problems)``; no problems means the wheels are ready.
    """
    lines, problems = [], []
    tags = image_tags()
    found: dict[str, list[Path]] = {}
    for path in sorted(wheels.glob("*.whl")) if wheels.is_dir() else []:
        found.setdefault(canonicalize_name(parse_wheel_filename(path.name)[0]), []).append(path)
    for name, version in CARRIED.items():
        paths = found.get(canonicalize_name(name), [])
        if not paths:
            problems.append(f"{name}=={version}: no wheel in {wheels} (make gpu-check downloads it)")
            continue
        if len(paths) > 1:
            problems.append(f"{name}: {len(paths)} wheels in {wheels} ({', '.join(p.name for p in paths)}); keep one")
        path = paths[0]
        _, got, _, wheel_tags = parse_wheel_filename(path.name)
        size = path.stat().st_size / 2**20
        if str(got) != version:
            problems.append(f"{path.name}: version {got}, expected {version}")
        elif not wheel_tags & tags:
            problems.append(f"{path.name}: tags {sorted(map(str, wheel_tags))} do not install on CPython 3.12 x86-64")
        else:
            lines.append(f"ok    {name} {got}: {path.name} ({size:.1f} MiB), installs on CPython 3.12 x86-64")
    return lines, problems


def check_requirements(wheels: Path) -> tuple[list[str], list[str]]:
    """Check that what the carried wheels and the project's extras require is in the image or carried.

    Returns:
        ``(report lines, problems)``.
    """
    problems = []
    found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
    requirements = [(path.name, req) for path in found if not path.name.startswith("attrimeter-")
                    for req in _wheel_requires(path)]
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    project = [Requirement(r) for r in config["project"]["dependencies"]]
    project += [Requirement(r) for extra in EXTRAS for r in config["project"]["optional-dependencies"][extra]]
    requirements += [("the project", req) for req in project]
    carried = {canonicalize_name(n) for n in CARRIED}
    for who, req in requirements:
        name = canonicalize_name(req.name)
        if name in carried:
            continue
        if name not in IMAGE:
            problems.append(f"{who} requires {req}, which the image lacks and nothing carries")
        elif IMAGE[name] is not None and not req.specifier.contains(IMAGE[name], prereleases=True):
            problems.append(f"{who} requires {req}; the image has {name} {IMAGE[name]}")
    if problems:
        return [], problems
    pinned = ", ".join(f"{k} {v}" for k, v in IMAGE.items() if v)
    return [f"ok    requirements of the carried wheels and of the project ({', '.join(EXTRAS)}) are in the image or "
            f"carried; the image's {pinned} satisfy the project's pins"], []


def _wheel_requires(path: Path) -> list[Requirement]:
    """A wheel's unconditional requirements (its METADATA's Requires-Dist without an ``extra`` marker)."""
    import zipfile

    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        text = zf.read(meta).decode()
    reqs = [Requirement(line.split(":", 1)[1].strip()) for line in text.splitlines()
            if line.startswith("Requires-Dist:")]
    return [r for r in reqs if r.marker is None or "extra" not in str(r.marker)]


def rehearse_install(wheels: Path) -> tuple[list[str], list[str]]:
    """Build the project wheel offline, install it with the carried wheels this Python takes, and import them."""
    here = set(sys_tags())
    with tempfile.TemporaryDirectory() as tmp:
        site = Path(tmp) / "site"
        try:
            project = build_project_wheel(Path(tmp) / "wheel", offline=True)
        except (RuntimeError, subprocess.TimeoutExpired) as err:
            return [], [f"the project does not build offline: {err}"]
        usable = [p for p in sorted(wheels.glob("*.whl")) if not p.name.startswith("attrimeter-")
                  and parse_wheel_filename(p.name)[3] & here] if wheels.is_dir() else []
        skipped = [p.name for p in wheels.glob("*.whl") if p not in usable and not p.name.startswith("attrimeter-")] \
            if wheels.is_dir() else []
        err = _pip_install([project, *usable], site, timeout=120)
        if err:
            return [], [err]
        modules = ["attrimeter.runtime", "attrimeter.export.aot", "attrimeter.kernels.masked_gem_pool",
                   "attrimeter.kernels.attr_distance"]
        probe = "import faiss; assert faiss.IndexFlatL2(4).ntotal == 0" if usable else "pass"
        code = f"import {', '.join(modules)}; {probe}"
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp, timeout=120,
                              env=_site_env(site))
        if proc.returncode != 0:
            return [], [f"installed offline but does not import: {proc.stderr.strip().splitlines()[-1:]}"]
    lines = [f"ok    project wheel built offline (--no-index --no-build-isolation) and installed --no-deps with "
             f"{', '.join(p.name for p in usable) or 'no carried wheel'}; imports {', '.join(modules)}"
             + (", faiss" if usable else "")]
    lines += [f"note  {name}: not installable by this Python {sys.version_info[0]}.{sys.version_info[1]} (tags)"
              for name in skipped]
    return lines, []


def _pip_install(paths: list[Path], site: Path, timeout: float) -> str | None:
    """``pip install --no-index --no-deps --target site``; the error text, or None."""
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
           "--upgrade", "--target", str(site), *map(str, paths)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        return "pip install failed: " + "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-8:])
    return None


def _site_env(site: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def travelling_size(carried: list[Path]) -> tuple[int | None, int]:
    """Bytes of the tree that travels (tracked + untracked-not-ignored files; None without git) and of ``carried``."""
    proc = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                          capture_output=True)
    tree = None
    if proc.returncode == 0:
        tree = sum((REPO / p).stat().st_size for p in proc.stdout.decode().split("\0") if p and (REPO / p).is_file())
    extra = sum(f.stat().st_size for path in carried if path.exists()
                for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    return tree, extra


def dry_run(wheels: Path, budget: float) -> int:
    """The rehearsal without a GPU; returns the exit status (0: ready, 1: not)."""
    print("gpu_check (dry run): no NVIDIA GPU here; rehearsing what the lent machine will run.\n")
    lines, problems = [], []
    for check in (check_wheels, check_requirements, rehearse_install):
        more, more_problems = check(wheels)
        lines, problems = lines + more, problems + more_problems
    tree, carried = travelling_size([wheels])
    if tree is None:
        lines.append(f"note  tree size unknown (no git here); carried {carried / 2**20:.1f} MiB")
    elif tree + carried > TREE_LIMIT:
        problems.append(f"the tree that travels is {(tree + carried) / 2**20:.1f} MiB, over the 64 MiB limit")
    else:
        lines.append(f"ok    travelling tree {tree / 2**20:.1f} MiB + carried {carried / 2**20:.1f} MiB = "
                     f"{(tree + carried) / 2**20:.1f} MiB of 64 MiB")
    manifest = wheels / "manifest.json"
    if manifest.is_file():
        info = json.loads(manifest.read_text())
        fresh = info.get("digest") == source_digest()
        lines.append(f"{'ok   ' if fresh else 'note '} carried project wheel {info['project_wheel']} "
                     + ("matches this tree" if fresh else "is older than this tree (make gpu-check rebuilds it; the "
                        "lent machine builds from the tree first anyway)"))
    for line in lines:
        print(line)
    for problem in problems:
        print(f"FAIL  {problem}")
    print(f"\nsteps on the lent machine (budget {budget:g} s; phase 1 runs side by side, phase 2 alone on the GPU):")
    for step in STEPS:
        print(f"  {step.phase}  {step.name:<15} {step.timeout:>4.0f} s  {step.what}")
    print(f"\nrun it there with the device tool:\n  {device_command(budget)}")
    if problems:
        print(f"\nno GPU here: the kit is NOT ready ({len(problems)} problem(s) above).")
        return 1
    print("\nno GPU here: the kit is ready.")
    return 0


# ------------------------------------------------------------------------------------------------- the full run


@dataclass
class Outcome:
    """What a step did: status (pass / fail / timeout / skipped), seconds, figures and notes."""

    status: str
    seconds: float = 0.0
    figures: list[dict[str, Any]] | None = None
    notes: list[str] | None = None


class Runner:
    """Runs the steps as process groups with time limits under one deadline, collecting logs and outcomes."""

    def __init__(self, work: Path, out: Path, budget: float) -> None:
        self.work, self.out, self.budget = work, out, budget
        self.deadline = time.monotonic() + budget
        self.outcomes: dict[str, Outcome] = {}
        self.site = work / "site"
        (work / "logs").mkdir(parents=True, exist_ok=True)

    def _command(self, step: Step) -> list[str]:
        if step.name in PYTEST_PATHS:
            workers = ["-n", "8" if step.name == "tests_kernels" else "4", "--dist",
                       "load" if step.name == "tests_kernels" else "loadfile"] if XDIST else []
            return [sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--rootdir", str(REPO),
                    "-c", str(REPO / "pyproject.toml"), f"--junitxml={self.work / (step.name + '.xml')}", *workers,
                    *(str(REPO / p) for p in PYTEST_PATHS[step.name])]
        return [sys.executable, str(HERE / "gpu_steps.py"), step.name, "--work", str(self.work), "--out",
                str(self.out)]

    def blocked(self, step: Step) -> str | None:
        """Why the step cannot run (a prerequisite did not pass, or no time is left), or None."""
        failed = [n for n in step.needs if self.outcomes.get(n, Outcome("skipped")).status != "pass"]
        if failed:
            return f"skipped: needs {', '.join(failed)}"
        if self.deadline - time.monotonic() < 20:
            return "skipped: out of time"
        return None

    def start(self, step: Step) -> tuple[subprocess.Popen, float, float]:
        """Start a step in its own process group (cwd: the scratch folder, so the installed project is imported)."""
        with (self.work / "logs" / f"{step.name}.log").open("w") as log:
            proc = subprocess.Popen(self._command(step), cwd=self.work, env=_site_env(self.site), stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        limit = min(step.timeout, self.deadline - time.monotonic() - 10)
        return proc, time.monotonic(), limit

    def finish(self, step: Step, t0: float, rc: int | None) -> None:
        """Record a step that ended with ``rc`` (None: killed at its limit)."""
        seconds = time.monotonic() - t0
        outcome = self._result(step, rc)
        outcome.seconds = seconds
        self.outcomes[step.name] = outcome
        print(f"[{seconds:6.1f} s] {step.name}: {outcome.status}", flush=True)

    def wait(self, started: list[tuple[Step, subprocess.Popen, float, float]]) -> None:
        """Wait for the started steps, each up to its own limit; a step past it is killed with its process group."""
        running = list(started)
        while running:
            for item in list(running):
                step, proc, t0, limit = item
                rc = proc.poll()
                if rc is None and time.monotonic() - t0 < limit:
                    continue
                if rc is None:
                    os.killpg(proc.pid, signal.SIGKILL)  # the step's own process group (start_new_session)
                    proc.wait()
                self.finish(step, t0, rc)
                running.remove(item)
            time.sleep(0.2)

    def _result(self, step: Step, rc: int | None) -> Outcome:
        if step.name in PYTEST_PATHS:
            outcome = junit_outcome(self.work / f"{step.name}.xml", REQUIRED.get(step.name, []))
            if rc is None:
                outcome.status = "timeout"
            return outcome
        path = self.work / "results" / f"{step.name}.json"
        if rc is None:
            return Outcome("timeout", notes=[f"killed after its {step.timeout:g} s limit (or the deadline)"])
        if rc != 0 or not path.is_file():
            tail = (self.work / "logs" / f"{step.name}.log").read_text(errors="replace").strip().splitlines()[-3:]
            return Outcome("fail", notes=[f"exit status {rc}: " + " / ".join(tail)])
        result = json.loads(path.read_text())
        status = "fail" if result.get("failed") else "pass"
        return Outcome(status, figures=result["figures"], notes=result.get("notes", []) + result.get("failed", []))

    def run(self, steps: list[Step]) -> None:
        """Start the steps side by side (one at a time for a single step) and wait for each within its limit."""
        started = []
        for step in steps:
            why = self.blocked(step)
            if why:
                self.outcomes[step.name] = Outcome("skipped", notes=[why])
                print(f"[   0.0 s] {step.name}: {why}", flush=True)
                continue
            started.append((step, *self.start(step)))
        self.wait(started)


def junit_outcome(path: Path, required: list[str]) -> Outcome:
    """Counts, failures and required-but-not-passed tests from pytest's JUnit XML."""
    if not path.is_file():
        return Outcome("fail", notes=["pytest wrote no report (see the log)"])
    cases = list(ET.parse(path).getroot().iter("testcase"))
    results: dict[str, str] = {}
    notes = []
    for case in cases:
        key = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None:
            results[key] = "failed"
            notes.append(f"FAILED {key}: {(bad.get('message') or '').splitlines()[:1]}")
        elif case.find("skipped") is not None:
            results[key] = "skipped"
        else:
            results[key] = "passed"
    counts = {s: sum(v == s for v in results.values()) for s in ("passed", "failed", "skipped")}
    for want in required:
        got = [v for k, v in results.items() if k.startswith(want)]
        if not got or any(v != "passed" for v in got):
            notes.append(f"REQUIRED {want}: {', '.join(got) or 'not collected'}")
    status = "fail" if counts["failed"] or any(n.startswith("REQUIRED") for n in notes) else "pass"
    figures = [{"name": "tests passed / failed / skipped", "value": f"{counts['passed']} / {counts['failed']} / "
                f"{counts['skipped']}", "unit": "", "target": "0 failed", "ok": counts["failed"] == 0}]
    return Outcome(status, figures=figures, notes=notes)


def install(runner: Runner, wheels: Path) -> None:
    """The ``install`` step, in this process: build or take the project wheel, install it with the carried ones."""
    t0 = time.monotonic()
    notes = []
    try:
        project = build_project_wheel(runner.work / "wheel", offline=True, timeout=90)
        notes.append(f"project built from this tree ({project.name})")
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        carried = sorted(wheels.glob("attrimeter-*.whl"))
        if not carried:
            runner.outcomes["install"] = Outcome("fail", time.monotonic() - t0, notes=[str(err)])
            return
        project = carried[0]
        manifest = json.loads((wheels / "manifest.json").read_text()) if (wheels / "manifest.json").is_file() else {}
        fresh = manifest.get("digest") == source_digest()
        notes.append(f"project from the carried {project.name} ({'matches' if fresh else 'DIFFERS FROM'} this tree); "
                     f"building here failed: {str(err).splitlines()[-1]}")
    deps = [p for p in sorted(wheels.glob("*.whl")) if not p.name.startswith("attrimeter-")]
    err = _pip_install([project, *deps], runner.site, timeout=90)
    if err is None:
        proc = subprocess.run([sys.executable, "-c", "import attrimeter.runtime, attrimeter.kernels.attr_distance, "
                               "attrimeter.export.aot, faiss"], cwd=runner.work, env=_site_env(runner.site),
                              capture_output=True, text=True, timeout=120)
        err = proc.stderr.strip().splitlines()[-1] if proc.returncode else None
    notes.append(f"carried: {', '.join(p.name for p in deps) or 'none'}")
    runner.outcomes["install"] = Outcome("fail" if err else "pass", time.monotonic() - t0, notes=notes + [err or ""])
    print(f"[{time.monotonic() - t0:6.1f} s] install: {runner.outcomes['install'].status}", flush=True)


def full_run(out: Path, wheels: Path, budget: float) -> int:
    """Every step on the GPU; writes the reports and prints the table. Returns 0 when every step passed."""
    t_start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    runner = Runner(work, out, budget)
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    print(f"gpu_check: {date}, budget {budget:g} s, scratch {work}", flush=True)
    install(runner, wheels)
    by_phase = {p: [s for s in STEPS if s.phase == p and s.name != "install"] for p in (0, 1, 2)}
    for step in by_phase[0]:
        runner.run([step])
    runner.run(by_phase[1])
    for step in by_phase[2]:
        runner.run([step])
    return report(runner, out, date, time.monotonic() - t_start, wheels)


def report(runner: Runner, out: Path, date: str, wall: float, wheels: Path) -> int:
    """Write ``gpu_check_TAG.{md,csv,log}`` and print the pass/fail + figures table."""
    env_path = runner.work / "env.json"
    env = json.loads(env_path.read_text()) if env_path.is_file() else {}
    tag = env.get("tag", "gpu")
    manifest = json.loads((wheels / "manifest.json").read_text()) if (wheels / "manifest.json").is_file() else {}
    changed = manifest.get("local_changes") or manifest.get("digest") != source_digest()
    tree = manifest.get("commit", "unknown") + (" + changes" if changed else "")
    packages = env.get("packages") or {name: _version(name) for name in ("torch", "triton")}
    stamp = {"device": env.get("device", "unknown"), "driver": env.get("driver", "unknown"),
             "torch": packages["torch"], "triton": packages["triton"], "cuda": env.get("cuda", "unknown"),
             "python": env.get("python", platform.python_version()), "tree": tree, "date": date}
    rows = [{"step": name, "status": o.status, "metric": f["name"], "value": f["value"], "unit": f["unit"],
             "target": f["target"], "met": "" if f["ok"] is None else ("yes" if f["ok"] else "NO"), **stamp}
            for name, o in runner.outcomes.items() for f in (o.figures or [])]
    with (out / f"gpu_check_{tag}.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["step", "status", "metric", "value", "unit", "target", "met", *stamp])
        writer.writeheader()
        writer.writerows(rows)
    passed = all(o.status == "pass" for o in runner.outcomes.values()) and len(runner.outcomes) == len(STEPS)
    lines = [f"# GPU check: {stamp['device']}", "",
             ", ".join(f"{k} {v}" for k, v in stamp.items() if k != "device") + f"; wall {wall:.0f} s. Command: "
             f"`{device_command(runner.budget)}`.", "",
             "| step | status | s | notes |", "|---|---|---:|---|"]
    for step in STEPS:
        o = runner.outcomes.get(step.name, Outcome("not run"))
        notes = "; ".join(n for n in (o.notes or []) if n).replace("|", "\\|")
        lines.append(f"| {step.name} | {o.status} | {o.seconds:.0f} | {notes} |")
    lines += ["", "| step | figure | value | target | met |", "|---|---|---:|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['metric']} | {_value(r)} | {r['target']} | {r['met']} |")
    (out / f"gpu_check_{tag}.md").write_text("\n".join(lines) + "\n")
    with (out / f"gpu_check_{tag}.log").open("w") as log:
        for step in STEPS:
            path = runner.work / "logs" / f"{step.name}.log"
            if path.is_file():
                text = path.read_text(errors="replace")
                log.write(f"===== {step.name} =====\n{text[-200_000:]}\n")
    print(f"\nwrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}\n")
    print(f"{'step':<15} {'status':<8} {'s':>5}  figures (value, target met)")
    for step in STEPS:
        o = runner.outcomes.get(step.name, Outcome("not run"))
        figs = "; ".join(f"{f['name'].strip()} {_value(f)}"
                         + ("" if f["ok"] is None else " ok" if f["ok"] else f" MISSED {f['target']}")
                         for f in o.figures or [])
        print(f"{step.name:<15} {o.status:<8} {o.seconds:>5.0f}  {figs}")
    print(f"\ngpu_check: {'PASS' if passed else 'FAIL'} in {wall:.0f} s on {stamp['device']}")
    return 0 if passed else 1


def _value(figure: dict[str, Any]) -> str:
    value = f"{figure['value']:.4g}" if isinstance(figure["value"], float) else str(figure["value"])
    return f"{value} {figure['unit']}".strip()


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "absent"


def has_gpu() -> bool:
    """Whether ``nvidia-smi -L`` lists a GPU (decided without importing torch)."""
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        proc = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "GPU " in proc.stdout


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT") or REPO / "runs" / "gpu_check"),
                        help="folder for the (at most 8) result files (default $OUT, else runs/gpu_check)")
    parser.add_argument("--wheels", type=Path, default=REPO / ".whl", help="carried wheels (default .whl)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="overall deadline in seconds")
    parser.add_argument("--dry", action="store_true", help="rehearse even where a GPU is present")
    parser.add_argument("--prepare", action="store_true", help="first download missing wheels and build the project "
                        "wheel into --wheels (needs PyPI)")
    args = parser.parse_args(argv)
    if args.budget <= 60:
        parser.error(f"--budget must be over 60 seconds, got {args.budget:g}")
    if args.prepare:
        prepare(args.wheels)
    if args.dry or not has_gpu():
        return dry_run(args.wheels, args.budget)
    return full_run(args.out, args.wheels, args.budget)


if __name__ == "__main__":
    raise SystemExit(main())
