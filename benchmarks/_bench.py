"""Helpers the benchmark scripts share: timing, peak memory of a child process, markdown tables."""

from __future__ import annotations

import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "_data"


@dataclass
class Timing:
    """Wall-clock seconds of repeated runs."""

    runs: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.runs)

    @property
    def min(self) -> float:
        return min(self.runs)


def time_call(fn: Callable[[], object], repeat: int, warmup: int = 1) -> Timing:
    """Time ``fn()`` in this process, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    runs = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return Timing(runs)


def time_processes(
    cmds: dict[str, Sequence[str]], repeat: int, envs: dict[str, dict[str, str]] | None = None
) -> dict[str, Timing]:
    """Time whole processes (interpreter start, imports, work, exit), output discarded.

    The commands take turns, round after round, so a burst of load from elsewhere on the machine
    hits all of them alike instead of one. ``envs`` gives a command's environment by label.
    """
    runs: dict[str, list[float]] = {label: [] for label in cmds}
    for _ in range(repeat):
        for label, cmd in cmds.items():
            t = time.perf_counter()
            done = subprocess.run(
                cmd,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                env=(envs or {}).get(label),
                cwd=ROOT,
            )
            runs[label].append(time.perf_counter() - t)
            if done.returncode not in (
                0,
                1,
            ):  # wcond exits 1 when a gate trips; anything else is a failure
                sys.exit(
                    f"failed ({done.returncode}): {' '.join(cmd)}\n{done.stderr.decode()[-2000:]}"
                )
    return {label: Timing(r) for label, r in runs.items()}


@dataclass
class Measured:
    """One process run under /usr/bin/time -v."""

    wall_s: float
    max_rss_mb: float
    user_s: float
    sys_s: float


def time_v(cmd: Sequence[str]) -> Measured:
    """Run ``cmd`` under GNU time -v: wall clock (perf_counter) and peak resident memory."""
    t = time.perf_counter()
    done = subprocess.run(
        ["/usr/bin/time", "-v", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT
    )
    wall = time.perf_counter() - t
    err = done.stderr.decode()
    if done.returncode not in (0, 1):
        sys.exit(f"failed ({done.returncode}): {' '.join(cmd)}\n{err[-2000:]}")

    def field(name: str) -> float:
        found = re.search(rf"{re.escape(name)}: ([\d.]+)", err)
        if not found:
            sys.exit(f"/usr/bin/time -v printed no '{name}' for {' '.join(cmd)}")
        return float(found.group(1))

    return Measured(
        wall_s=wall,
        max_rss_mb=field("Maximum resident set size (kbytes)") / 1024,
        user_s=field("User time (seconds)"),
        sys_s=field("System time (seconds)"),
    )


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def machine() -> str:
    """One line describing where the figures were measured."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        names = re.findall(r"model name\s*: (.*)", Path("/proc/cpuinfo").read_text())
        cpu = names[0] if names else cpu
    except OSError:
        pass
    mem = ""
    try:
        kb = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1))  # type: ignore[union-attr]
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, AttributeError):
        pass
    return (
        f"{cpu}, nproc={os.cpu_count()}{mem}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), Python {platform.python_version()}, {platform.system()}"
    )


def load_average() -> str:
    """The 1-minute load average: other work on a 2-core machine skews timings, so it is printed with them."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "n/a"
