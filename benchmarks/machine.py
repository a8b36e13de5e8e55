"""What every benchmark table is stamped with: the CPU's name, the tree's commit and the time (imported by scripts)."""

from __future__ import annotations

import datetime
import platform
import subprocess
from pathlib import Path

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
