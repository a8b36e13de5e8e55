"""What benchmark tables are stamped with (CPU, commit, threads, versions, date) and their CSV; imported by scripts."""

from __future__ import annotations

import csv
import datetime
import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else the architecture."""
    try:
        return next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def git_commit() -> str:
    """The short commit of this checkout (empty outside git)."""
    return subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True).stdout.strip()


def utc_now() -> str:
    """Now, ISO 8601 in UTC to the second."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def stamp(faiss_threads: int) -> dict[str, str]:
    """Commit, machine (with the load at the end), thread settings, versions and date."""
    cpu, commit, root = cpu_name(), git_commit(), ROOT
    dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "runtime", "benchmarks/*.py"],
                           capture_output=True, text=True).stdout.strip()
    return {"commit": commit + ("+changes" if dirty else ""),
            "machine": f"{cpu}, {os.cpu_count()} CPUs shared with other sessions (load average "
                       f"{os.getloadavg()[0]:.1f} at the end)",
            "threads": f"faiss {faiss_threads}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
            "numpy": np.__version__, "faiss": version("faiss-cpu"), "python": platform.python_version(),
            "date": utc_now()}


def stamp_line(stamped: dict[str, str]) -> str:
    """One markdown sentence of the stamp."""
    return (f"Commit {stamped['commit']}; {stamped['machine']}; threads: {stamped['threads']}; numpy "
            f"{stamped['numpy']}, faiss-cpu {stamped['faiss']}, Python {stamped['python']}; {stamped['date']}. "
            f"Command: `{stamped['command']}`.")


def write_csv(path: Path, rows: list[dict], stamped: dict[str, str]) -> None:
    """Rows (same keys) followed by the stamp's columns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*rows[0], *stamped])
        writer.writeheader()
        writer.writerows({**r, **stamped} for r in rows)
