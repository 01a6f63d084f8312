#!/usr/bin/env python3
"""The figures behind docs/SCALE.md: Gram work per second, read throughput, Ray's per-task overhead.

    python benchmarks/bench_scale.py [--device cpu|cuda] [--no-ray]

- Gram work: `wcond.analyze_tensor` (every inspect number of one layer) on TinyLlama-shaped fp16
  layers; its cost is dominated by the cosine Gram blocks of rows and of columns, out*in*(out+in)
  multiply-adds (the upper triangles: N^2 d / 2 pairs-dims each way, times 2 FLOPs), so the
  figure quoted is seconds per GFLOP of out*in*(out+in).
- Reading: every tensor of the generated TinyLlama checkpoint through `Checkpoint.get` (page
  cache warm or cold, as found; the script says which it cannot control).
- Ray: start-up of a local instance and the round trip of no-op tasks through `RayEngine.map`.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import load_average, machine, table  # noqa: E402
from bench_inspect import tinyllama_checkpoint  # noqa: E402

SHAPES = [(256, 2048), (2048, 2048), (5632, 2048), (2048, 5632)]


def gram_gflop(shape: tuple[int, ...]) -> float:
    out, rest = shape[0], math.prod(shape[1:])
    return 2 * out * rest * (out + rest) / 2 / 1e9  # 2 FLOPs per multiply-add, upper triangles


def bench_gram(device: str) -> None:
    from wcond.analyze import analyze_tensor

    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in SHAPES:
        w = (0.02 * torch.randn(shape, generator=g)).half()
        analyze_tensor("w", w[:64, :64], device=device)  # warm-up (kernels, allocator)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        analyze_tensor("w", w, device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        s = time.perf_counter() - t
        gf = gram_gflop(shape)
        rows.append(["x".join(map(str, shape)), f"{gf:.1f}", f"{s:.2f}", f"{s / gf * 1e3:.2f}"])
    print(f"\n### Gram work on {device} (load {load_average()})\n")
    print(table(["layer (fp16)", "Gram GFLOP", "seconds", "ms per GFLOP"], rows))


def bench_read() -> None:
    from wcond.checkpoint.open import open_checkpoint

    root = tinyllama_checkpoint()
    ck = open_checkpoint(root)
    t = time.perf_counter()
    nbytes = 0
    for key in ck.keys():
        nbytes += ck.get(key).nbytes
    s = time.perf_counter() - t
    print(
        f"\n### Reading every tensor of {root.name} ({nbytes / 2**30:.2f} GiB) (load {load_average()})\n"
    )
    print(f"{s:.1f} s, {nbytes / s / 2**30:.2f} GiB/s")


def bench_ray() -> None:
    from wcond.engine import RayEngine, Task

    t = time.perf_counter()
    with RayEngine(num_cpus=2) as engine:
        start = time.perf_counter() - t
        tasks = [Task("x", (f"k{i}",), 1) for i in range(200)]
        engine.map(_noop, tasks[:10])  # workers started
        t = time.perf_counter()
        engine.map(_noop, tasks)
        per_task = (time.perf_counter() - t) / len(tasks)
    print(f"\n### Ray, local instance with 2 CPUs (load {load_average()})\n")
    print(f"ray.init: {start:.1f} s; a no-op task's round trip: {per_task * 1e3:.1f} ms")


def _noop(task: object) -> int:
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-ray", action="store_true")
    parser.add_argument("--no-read", action="store_true")
    args = parser.parse_args()
    print(machine())
    bench_gram(args.device)
    if not args.no_read:
        bench_read()
    if not args.no_ray:
        bench_ray()


if __name__ == "__main__":
    main()
