"""Benchmarks for `wcond init-cs` on a ResNet-18-shaped checkpoint.

1. Seconds per iteration of the Convolutional Similarity loss with its gradient, summed over the
   20 conv weights of ResNet-18:
   - fast: ``wcond.metrics.conv_similarity`` (what inspect reports and init-cs minimizes), with
     the weights in their stored layout (as a training regularizer sees them) and channels-last
     (as init-cs keeps its float32 copies); and once with its FFT route forced, the one it takes
     for kernels over 64 taps (3x3 and 7x7 kernels normally go through the position Gram matrix);
   - literal: the pairwise definition, CS paper eq. 10: for every filter pair i < j and every
     channel pair (c1, c2), the full cross-correlation K_i[c1] * K_j[c2] by ``conv2d`` with
     padding k-1, squared and summed; then autograd. One conv2d call covers all channel pairs of
     a few filter pairs (batch = K_j's channels, output channels = K_i's). The full literal
     iteration would take hours, so it is timed on a few filter pairs per distinct layer shape and
     extrapolated by the number of pairs (every pair of a layer costs the same).
2. Wall time of ``wcond init-cs resnet18.pt -o out.pt --iterations 500`` as a whole process
   (interpreter start, load, optimization, save), with wcond's default threading, libgomp's
   default spin, OMP_WAIT_POLICY=PASSIVE and OMP_NUM_THREADS=1.

The checkpoint is built in code (torchvision's ResNet-18 key names and shapes, Kaiming-normal
fan_out convs as torchvision initializes them, BatchNorm at 1/0, a 1000-way fc) in a temporary
directory. Results are printed as Markdown.

Usage: python benchmarks/bench_init_cs.py [--iterations 500] [--repeats 5] [--skip-cli]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from _bench import time_call  # benchmarks/_bench.py, beside this script

from wcond import metrics
from wcond.metrics import convolutional_similarity

# torchvision resnet18's stages: (index, channels out, channels into its first block)
_STAGES = [(1, 64, 64), (2, 128, 64), (3, 256, 128), (4, 512, 256)]


def resnet18_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision resnet18's state dict keys and shapes, freshly initialized (11.7M parameters)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}

    def conv(key: str, out: int, cin: int, k: int) -> None:
        std = math.sqrt(2.0 / (out * k * k))  # kaiming_normal_(mode="fan_out", nonlinearity="relu")
        sd[key] = torch.randn(out, cin, k, k, generator=g) * std

    def bn(prefix: str, n: int) -> None:
        sd[f"{prefix}.weight"] = torch.ones(n)
        sd[f"{prefix}.bias"] = torch.zeros(n)
        sd[f"{prefix}.running_mean"] = torch.zeros(n)
        sd[f"{prefix}.running_var"] = torch.ones(n)
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(0)

    conv("conv1.weight", 64, 3, 7)
    bn("bn1", 64)
    for stage, out, cin in _STAGES:
        for block in range(2):
            p = f"layer{stage}.{block}"
            conv(f"{p}.conv1.weight", out, cin if block == 0 else out, 3)
            bn(f"{p}.bn1", out)
            conv(f"{p}.conv2.weight", out, out, 3)
            bn(f"{p}.bn2", out)
            if block == 0 and stage > 1:
                conv(f"{p}.downsample.0.weight", out, cin, 1)
                bn(f"{p}.downsample.1", out)
    bound = 1 / math.sqrt(512)
    sd["fc.weight"] = (torch.rand(1000, 512, generator=g) * 2 - 1) * bound
    sd["fc.bias"] = (torch.rand(1000, generator=g) * 2 - 1) * bound
    return sd


def conv_weights(sd: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in sd.values() if t.ndim == 4]


def time_per_call(fn, repeats: int) -> float:
    """Median wall seconds of fn() over ``repeats`` calls, after one warm-up call."""
    return time_call(fn, repeats).median


def fast_seconds(weights: list[torch.Tensor], repeats: int, channels_last: bool) -> float:
    params = [
        (w.movedim(1, -1).contiguous() if channels_last else w.clone()).requires_grad_()
        for w in weights
    ]

    def step() -> None:
        views = [p.movedim(-1, 1) if channels_last else p for p in params]
        loss = metrics.conv_similarity(views)
        torch.autograd.grad(loss, params)

    return time_per_call(step, repeats)


def literal_pairs_loss(w: torch.Tensor, i: int, js: range) -> torch.Tensor:
    """sum over j in js, c1, c2 of ||K_i[c1] * K_j[c2]||^2, full cross-correlation by conv2d."""
    _, cin, kh, kw = w.shape
    images = w[js.start : js.stop].reshape(
        -1, 1, kh, kw
    )  # every channel of every K_j: a 1-channel image
    filters = w[i].reshape(cin, 1, kh, kw)  # every channel of K_i: one output channel
    xcorr = F.conv2d(images, filters, padding=(kh - 1, kw - 1))  # (|js| * cin, cin, 2kh-1, 2kw-1)
    return xcorr.pow(2).sum()


def literal_seconds_per_pair(shape: tuple[int, ...], repeats: int) -> tuple[float, int]:
    """Seconds per filter pair (loss + gradient) of the literal definition on a layer of this shape."""
    out, cin, kh, kw = shape
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05).requires_grad_()
    # As many K_j per call as keep the cross-correlation output near 2**24 floats (64 MiB).
    batch = max(1, min(out - 1, (1 << 24) // (cin * cin * (2 * kh - 1) * (2 * kw - 1))))
    js = range(1, 1 + batch)

    def step() -> None:
        loss = literal_pairs_loss(w, 0, js)
        torch.autograd.grad(loss, w)

    return time_per_call(step, repeats) / batch, batch


def check_literal_matches(weights: list[torch.Tensor]) -> float:
    """Largest relative difference between fast and literal CS over small slices of the real layers."""
    worst = 0.0
    for w in weights:
        sub = w[:6, :5].double()
        lit = sum(
            literal_pairs_loss(sub, i, range(i + 1, sub.shape[0])) for i in range(sub.shape[0] - 1)
        )
        fast = metrics.conv_similarity(sub)
        worst = max(worst, abs(float(fast) - float(lit)) / float(lit))
    return worst


def run_cli(src: Path, iterations: int, env_extra: dict[str, str]) -> dict:
    """Time one whole ``wcond init-cs`` process; its JSON summary gives the loop's share and the CS totals."""
    out = src.with_name("resnet18_cs.pt")
    cmd = [
        sys.executable,
        "-m",
        "wcond",
        "init-cs",
        str(src),
        "-o",
        str(out),
        "--iterations",
        str(iterations),
        "--device",
        "cpu",
        "--seed",
        "0",
        "--format",
        "json",
        "--force",
    ]
    start = time.perf_counter()
    proc = subprocess.run(
        cmd, capture_output=True, text=True, check=True, env={**os.environ, **env_extra}
    )
    wall = time.perf_counter() - start
    doc = json.loads(proc.stdout)
    env = " ".join(f"{k}={v}" for k, v in env_extra.items())
    command = " ".join([env, "wcond", *cmd[3:]]).strip().replace(str(src.parent) + os.sep, "")
    return {
        "wall": wall,
        "loop": doc["seconds"],
        "cs_before": doc["cs_before"],
        "cs_after": doc["cs_after"],
        "command": command,
    }


# The whole-process runs: wcond's default (a short OpenMP spin), libgomp's own default spin (long
# busy-waiting, which on a small shared machine can cost several times the work itself), never
# spinning, and one thread.
CLI_ENVS = [
    {},
    {"GOMP_SPINCOUNT": "300000"},
    {"OMP_WAIT_POLICY": "PASSIVE"},
    {"OMP_NUM_THREADS": "1"},
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument(
        "--repeats", type=int, default=5, help="timed calls per measurement (median reported)"
    )
    ap.add_argument("--skip-cli", action="store_true", help="skip the 500-iteration init-cs run")
    args = ap.parse_args()

    sd = resnet18_state_dict()
    weights = conv_weights(sd)
    n_conv = sum(w.numel() for w in weights)
    print(
        f"## init-cs benchmark: ResNet-18-shaped checkpoint ({len(weights)} conv weights, {n_conv:,} conv parameters)\n"
    )
    print(
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f} at start.\n"
    )

    mismatch = check_literal_matches(weights)
    fast_std = fast_seconds(weights, args.repeats, channels_last=False)
    fast_cl = fast_seconds(weights, args.repeats, channels_last=True)
    gram_max_taps = convolutional_similarity._GRAM_MAX_TAPS
    convolutional_similarity._GRAM_MAX_TAPS = (
        0  # force the FFT route that kernels over 64 taps take
    )
    try:
        fast_fft = fast_seconds(weights, args.repeats, channels_last=False)
    finally:
        convolutional_similarity._GRAM_MAX_TAPS = gram_max_taps

    rows = []
    literal_total = 0.0
    for shape, count in Counter(tuple(w.shape) for w in weights).items():
        per_pair, batch = literal_seconds_per_pair(shape, args.repeats)
        pairs = shape[0] * (shape[0] - 1) // 2
        literal_total += per_pair * pairs * count
        rows.append((shape, count, pairs, batch, per_pair, per_pair * pairs * count))

    print("CS loss + gradient, seconds per iteration (all conv weights):\n")
    print("| implementation | s / iteration |")
    print("|---|---:|")
    print(f"| fast `metrics.conv_similarity`, stored layout | {fast_std:.4f} |")
    print(f"| fast, channels-last (init-cs's float32 copies) | {fast_cl:.4f} |")
    print(
        f"| fast, FFT route forced (taken by kernels over {gram_max_taps} taps) | {fast_fft:.4f} |"
    )
    print(
        f"| literal pairwise eq. 10 (conv2d per channel pair), extrapolated | {literal_total:,.0f} |"
    )
    print(
        f"\nspeed-up: {literal_total / fast_std:,.0f}x (stored layout). Fast and literal agree to "
        f"{mismatch:.1e} relative on 6-filter x 5-channel slices of every layer (float64).\n"
    )
    print(
        "Literal extrapolation per layer shape (timed on filter pairs (0, j), j = 1..batch; every "
        "pair costs the same):\n"
    )
    print("| shape | layers | pairs per layer | timed pairs | s / pair | s / iteration |")
    print("|---|---:|---:|---:|---:|---:|")
    for shape, count, pairs, batch, per_pair, total in rows:
        print(
            f"| {'x'.join(map(str, shape))} | {count} | {pairs:,} | {batch} | {per_pair:.2e} | {total:,.1f} |"
        )

    if not args.skip_cli:
        print(f"\nWhole `wcond init-cs` process, {args.iterations} iterations, Adam lr 1e-3:\n")
        print("| command | wall (s) | loop (s) | s / iteration | total CS before -> after |")
        print("|---|---:|---:|---:|---|")
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / "resnet18.pt"
            torch.save(sd, src)
            for env in CLI_ENVS:
                r = run_cli(src, args.iterations, env)
                print(
                    f"| `{r['command']}` | {r['wall']:.1f} | {r['loop']:.1f} | {r['loop'] / args.iterations:.3f} | "
                    f"{r['cs_before']:.4g} -> {r['cs_after']:.4g} |",
                    flush=True,
                )
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
