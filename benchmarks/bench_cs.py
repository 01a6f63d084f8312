#!/usr/bin/env python3
"""Convolutional Similarity: wcond's linear-cost formula vs the literal pairwise definition.

The literal definition (CS paper eq. 10, METRICS.md) convolves every pair of filters i < j
and every pair of their input channels (c1, c2) with full padding and sums the squares:

    CS = sum_{i<j} sum_{c1,c2} || K_i[c1] * K_j[c2] ||^2

Here it runs with torch.nn.functional.conv2d, batched in blocks of B x B filters: one call
cross-correlates every channel of B filters (as zero-padded images) with every channel of B
other filters (as kernels), so each call materializes B*B*C*C full cross-correlations. Every
convolution of the definition is computed; only the Python loop is batched. The whole triangle
i <= j takes (out/B)(out/B + 1)/2 such blocks, every block the same size, so timing a few
blocks and multiplying gives the full time (``--full`` runs all of them). The B blocks on the
diagonal also compute their pairs j <= i, which are masked out: for 256 filters and B = 16 that
is 34816 filter pairs convolved for the 32640 of the definition (7% extra).

wcond.metrics.conv_similarity gets the same number from the filters' channel-summed
autocorrelations R_i, CS = (|sum_i R_i|^2 - sum_i |R_i|^2) / 2 (METRICS.md), at a cost linear
in out x in; the pair terms are the Gram matrix of the R_i, which is what the literal pairs are
compared with.

    python benchmarks/bench_cs.py              # 6 literal blocks, extrapolated
    python benchmarks/bench_cs.py --full       # the whole literal triangle (~13 min on 2 cores)
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from _bench import load_average, machine, table, time_call

from wcond import metrics


def literal_block(w: torch.Tensor, a: slice, b: slice) -> torch.Tensor:
    """sum_{c1,c2} ||K_i[c1] * K_j[c2]||^2 for i in a, j in b, by conv2d: a (|a|, |b|) matrix."""
    _, cin, kh, kw = w.shape
    ni, nj = a.stop - a.start, b.stop - b.start
    # Each channel K_i[c1] becomes a one-channel image padded by k-1 on every side, so the
    # valid cross-correlation with a k x k kernel covers all (2k-1)^2 lags: the full one.
    images = F.pad(w[a].reshape(ni * cin, 1, kh, kw), (kw - 1, kw - 1, kh - 1, kh - 1))
    kernels = w[b].reshape(nj * cin, 1, kh, kw)
    y = F.conv2d(images, kernels)  # (ni*cin, nj*cin, 2kh-1, 2kw-1): one map per (i, c1, j, c2)
    return y.square_().reshape(ni, cin, nj, -1).sum(dim=(1, 3))


def literal_pairs(
    w: torch.Tensor, block: int, max_blocks: int | None
) -> tuple[torch.Tensor, torch.Tensor, int, int, float]:
    """Literal pair terms over the upper triangle, block by block.

    Returns (pair matrix, mask of the pairs computed, blocks done, blocks in all, seconds).
    """
    out = w.shape[0]
    starts = range(0, out, block)
    tiles = [(a, b) for a in starts for b in starts if b >= a]
    todo = tiles if max_blocks is None else tiles[:max_blocks]
    pairs = torch.zeros(out, out)
    mask = torch.zeros(out, out, dtype=torch.bool)
    t = time.perf_counter()
    for n, (a0, b0) in enumerate(todo, 1):
        a, b = slice(a0, min(out, a0 + block)), slice(b0, min(out, b0 + block))
        pairs[a, b] = literal_block(w, a, b)
        mask[a, b] = True
        print(f"  literal block {n}/{len(todo)} ({time.perf_counter() - t:.1f} s)", flush=True)
    seconds = time.perf_counter() - t
    mask &= torch.ones(out, out, dtype=torch.bool).triu(1)  # i < j only
    return pairs, mask, len(todo), len(tiles), seconds


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=int, default=256, help="filters of the compared layer")
    ap.add_argument(
        "--in", dest="cin", type=int, default=256, help="input channels of the compared layer"
    )
    ap.add_argument("--k", type=int, default=3, help="kernel size")
    ap.add_argument("--block", type=int, default=16, help="filters per literal conv2d block")
    ap.add_argument(
        "--blocks", type=int, default=6, help="literal blocks to time (then extrapolated)"
    )
    ap.add_argument("--full", action="store_true", help="run the whole literal triangle")
    ap.add_argument("--repeat", type=int, default=5, help="timed calls of the fast version")
    ap.add_argument("--no-scaling", action="store_true", help="skip the scaling table")
    args = ap.parse_args()

    print(f"machine: {machine()}; load average at start {load_average()}\n")
    torch.manual_seed(0)
    w = torch.randn(args.out, args.cin, args.k, args.k) * math.sqrt(
        2 / (args.cin * args.k * args.k)
    )

    fast = time_call(lambda: metrics.conv_similarity(w), args.repeat)
    cs_fast = float(metrics.conv_similarity(w))
    # Pair terms the fast way: Gram matrix of the channel-summed autocorrelations R_i (METRICS.md).
    r = metrics.autocorrelation_sums(w).reshape(args.out, -1).double()
    gram = r @ r.T

    pairs, mask, done, total, seconds = literal_pairs(
        w, args.block, None if args.full else args.blocks
    )
    lit_pairs, fast_pairs = pairs[mask].double(), gram[mask]
    max_pair_rel = float(((lit_pairs - fast_pairs).abs() / fast_pairs.abs()).max())
    subset_rel = rel(float(lit_pairs.sum()), float(fast_pairs.sum()))
    literal_s = seconds * total / done
    shape = f"{args.out}x{args.cin}x{args.k}x{args.k}"
    how = (
        "measured (all blocks)"
        if done == total
        else f"extrapolated from {done} of {total} blocks ({seconds:.1f} s)"
    )

    print(f"\n### Convolutional Similarity, {shape} (float32)\n")
    rows = [
        [
            "wcond.metrics.conv_similarity",
            f"{fast.median * 1e3:.1f} ms (min {fast.min * 1e3:.1f})",
            f"median of {args.repeat}",
        ],
        ["literal, conv2d per filter pair and channel pair", f"{literal_s:.0f} s", how],
        ["ratio literal / wcond", f"{literal_s / fast.median:,.0f}x", ""],
    ]
    print(table(["method", "time", "note"], rows))
    print(
        f"\nagreement on the {int(mask.sum())} pairs i<j computed literally: max relative difference per pair "
        f"{max_pair_rel:.1e}, of their sum {subset_rel:.1e}"
    )
    if done == total:
        print(
            f"CS literal {float(lit_pairs.sum()):.6e} vs wcond {cs_fast:.6e}: relative difference "
            f"{rel(float(lit_pairs.sum()), cs_fast):.1e}"
        )

    if not args.no_scaling:
        print(
            f"\n### Scaling of wcond.metrics.conv_similarity (k={args.k}, median of {args.repeat})\n"
        )
        rows = []
        for cin_of in (lambda out: 256, lambda out: out):
            for out in (64, 128, 256, 512, 1024):
                cin = cin_of(out)
                x = torch.randn(out, cin, args.k, args.k)
                t = time_call(lambda x=x: metrics.conv_similarity(x), args.repeat)
                rows.append(
                    [
                        f"{out}x{cin}x{args.k}x{args.k}",
                        out * cin,
                        f"{t.median * 1e3:.2f}",
                        f"{t.median / (out * cin) * 1e9:.0f}",
                    ]
                )
        print(table(["shape", "out x in", "ms", "ns per (out x in)"], rows))
    print(f"\nload average at end {load_average()}")


if __name__ == "__main__":
    main()
