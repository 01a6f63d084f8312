#!/usr/bin/env python3
"""`wcond inspect` in one process vs on Ray (a local instance) on the TinyLlama-shaped 1.1B checkpoint.

    python benchmarks/bench_ray.py [--rounds 2]

Runs the real command in a subprocess, local and ``--ray`` in turn (A B A B ...), and samples
every 0.2 s the resident memory of the driver (its peak, VmHWM) and of its whole process tree
(driver, raylet, Ray workers; the sum of their RSS, an upper bound since shared pages count in
each). The two JSON reports are compared number by number. The checkpoint is generated under
benchmarks/_data/tinyllama/ by bench_inspect.py's generator (fixed seed) and reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import DATA, ROOT, load_average, machine, table  # noqa: E402
from bench_inspect import tinyllama_checkpoint, tinyllama_shapes  # noqa: E402


def _vm_hwm_kb(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _tree_rss_bytes(root: int) -> int:
    """Summed RSS of ``root`` and all its descendants, from /proc."""
    parent: dict[int, int] = {}
    rss: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parent[int(d.name)] = int(fields[1])
            rss[int(d.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    total = 0
    for pid in rss:
        p = pid
        while p > 1 and p != root:
            p = parent.get(p, 0)
        if p == root:
            total += rss[pid]
    return total


def run_sampled(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall time, driver peak RSS and peak summed RSS of the process tree, sampled every 0.2 s."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    hwm = tree_peak = 0
    while proc.poll() is None:
        hwm = max(hwm, _vm_hwm_kb(proc.pid))
        tree_peak = max(tree_peak, _tree_rss_bytes(proc.pid))
        time.sleep(0.2)
    wall = time.perf_counter() - t
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode not in (0, 1):
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{err[-3000:]}")
    return {"wall_s": wall, "driver_gib": hwm / 2**20, "tree_gib": tree_peak / 2**30}


def max_rel_diff(a: object, b: object) -> float:
    """Largest relative difference between two JSON values' numbers; anything else must be equal."""
    if isinstance(a, dict) and isinstance(b, dict):
        assert a.keys() == b.keys()
        return max([max_rel_diff(a[k], b[k]) for k in a] + [0.0])
    if isinstance(a, list) and isinstance(b, list):
        assert len(a) == len(b)
        return max([max_rel_diff(x, y) for x, y in zip(a, b)] + [0.0])
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) / max(abs(a), abs(b), 1e-30)
    assert a == b, (a, b)
    return 0.0


def layers_rel_diff(a: dict, b: dict) -> float:
    """Every layer's numbers, matched by name (the summary's rankings may swap near-ties)."""
    la, lb = ({layer["name"]: layer for layer in doc["layers"]} for doc in (a, b))
    assert list(la) == list(lb), "layers in a different order"
    return max(max_rel_diff(la[k], lb[k]) for k in la)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1, help="local/Ray pairs to run")
    args = parser.parse_args()
    root = tinyllama_checkpoint()
    params = sum(math.prod(s) for _, s in tinyllama_shapes())
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    outs = {"local": DATA / "tinyllama_local.json", "ray": DATA / "tinyllama_ray.json"}
    base = [sys.executable, "-m", "wcond", "inspect", str(root), "-f", "json", "--device", "cpu"]
    cmds = {
        "local": [*base, "-o", str(outs["local"])],
        "ray": [*base, "-o", str(outs["ray"]), "--ray"],
    }
    rows = []
    loads = [load_average()]
    for r in range(args.rounds):
        for name in ("local", "ray"):
            m = run_sampled(cmds[name], env)
            loads.append(load_average())
            print(f"round {r + 1} {name}: {m}", flush=True)
            rows.append(
                [
                    r + 1,
                    name,
                    f"{m['wall_s']:.1f}",
                    f"{m['driver_gib']:.2f}",
                    f"{m['tree_gib']:.2f}",
                ]
            )
    diff = layers_rel_diff(
        json.loads(outs["local"].read_text()), json.loads(outs["ray"].read_text())
    )
    print(
        f"\n### inspect, local vs Ray (local instance), TinyLlama-shaped {params / 1e9:.3f}B fp16, sharded\n"
    )
    print(f"{machine()}; 1-min load average before/after each run: {', '.join(loads)}\n")
    print(
        table(
            [
                "round",
                "engine",
                "wall (s)",
                "driver peak RSS (GiB)",
                "process tree peak RSS, summed (GiB)",
            ],
            rows,
        )
    )
    print(
        f"\nlargest relative difference between the two JSON reports' per-layer numbers: {diff:.2e}"
    )


if __name__ == "__main__":
    main()
