"""Benchmark the blocked near-parallel pair search behind `wcond shrink`: time and peak memory.

Cases: a 4096 x 4096 matrix and a 32000 x 4096 embedding (rows are the vectors), float32 with
64 exactly (anti-)parallel and 64 near-parallel (1 - cos ~ 1e-8..1e-6) planted row pairs. Each case runs in
a fresh subprocess so that its peak resident memory (ru_maxrss) is its own.

    python benchmarks/bench_shrink.py                 # both cases on the CPU
    python benchmarks/bench_shrink.py --device cuda   # on a GPU

Columns: search = metrics.near_parallel_pairs over all N(N-1)/2 pairs; fuse = shrink.fuse_vectors
(the same search, then greedy fusing with every fused vector re-tested against all others);
RSS = peak resident memory of the process, "data" being the peak right after the matrix is built.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time

import torch

from wcond import metrics
from wcond.shrink import fuse_vectors

CASES = {"matrix 4096x4096": (4096, 4096), "embedding 32000x4096": (32000, 4096)}
PLANTED = 64
TAU_COS, TAU_EUC = 1e-4, 0.1


def _rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def child(name: str, device_name: str) -> dict[str, object]:
    """Build one case, time the search and the fusing; return the figures."""
    n, d = CASES[name]
    device = torch.device(device_name)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, d, generator=g)
    idx = torch.randperm(n, generator=g)[: 4 * PLANTED].view(2 * PLANTED, 2)
    for k, (a, b) in enumerate(idx.tolist()):
        if k < PLANTED:  # exactly (anti-)parallel
            w[b] = (-1.5 if k % 2 else 0.5) * w[a]
        else:  # near-parallel: relative noise 1e-4..1e-3, so 1 - cos ~ 1e-8..1e-6 and D_euc < 0.1
            w[b] = (
                0.8 * w[a]
                + 1e-4 * (1 + 3 * (k % 4)) * w[a].norm() * torch.randn(d, generator=g) / d**0.5
            )
    w = w.to(device)
    _sync(device)
    data_rss = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    pairs = list(metrics.near_parallel_pairs(w, tau_cos=TAU_COS, tau_euc=TAU_EUC))
    _sync(device)
    search_s = time.perf_counter() - t
    search_rss = _rss_mib()
    t = time.perf_counter()
    grouping = fuse_vectors(w, tau_cos=TAU_COS, tau_euc=TAU_EUC)
    _sync(device)
    fuse_s = time.perf_counter() - t
    out: dict[str, object] = {
        "case": name,
        "device": str(device),
        "pairs": len(pairs),
        "fused": grouping.fused,
        "search_s": round(search_s, 2),
        "fuse_s": round(fuse_s, 2),
        "data_mib": round(w.numel() * 4 / 2**20),
        "rss_data_mib": round(data_rss),
        "rss_search_mib": round(search_rss),
        "rss_peak_mib": round(_rss_mib()),
    }
    if device.type == "cuda":
        out["gpu_peak_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--case", choices=list(CASES), help="run one case in this process (used by the parent)"
    )
    args = parser.parse_args()
    if args.case:
        print(json.dumps(child(args.case, args.device)))
        return
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {args.device}"
    )
    head = (
        "| case | pairs found | fused | search (s) | search + fuse (s) | data (MiB) "
        "| peak RSS: data / after search / after fuse (MiB) |"
    )
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for name in CASES:
        proc = subprocess.run(
            [sys.executable, __file__, "--case", name, "--device", args.device],
            capture_output=True,
            text=True,
        )
        if proc.returncode:
            sys.exit(f"{name}: failed\n{proc.stderr}")
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        gpu = f", GPU peak {r['gpu_peak_mib']} MiB" if "gpu_peak_mib" in r else ""
        print(
            f"| {name} | {r['pairs']} | {r['fused']} | {r['search_s']} | {r['fuse_s']} | {r['data_mib']} | "
            f"{r['rss_data_mib']} / {r['rss_search_mib']} / {r['rss_peak_mib']}{gpu} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
