#!/usr/bin/env python3
"""wcond on a GPU against the CPU, in one run: init-cs speed, inspect speed, and exact agreement.

    python benchmarks/gpu.py                 # on a machine with CUDA: the full measurement
    python benchmarks/gpu.py --quick         # small sizes: proves the script works (any machine)

What it measures (issue 11's GPU targets):

1. ``init-cs`` on a ResNet-18-shaped checkpoint, ``--iterations`` steps (500), the optimization
   loop's own time (``InitCSResult.seconds``) on the GPU and on all CPU cores; target GPU >= 5x.
   Both runs start from the same weights with the same seed; their final CS must agree.
2. ``inspect`` in process of an LLM-shaped fp16 safetensors checkpoint (~0.38B parameters,
   written once under benchmarks/_data/), warm, against the time to read every tensor and copy
   it to the GPU (what inspect cannot avoid); target <= 2x.
3. Correctness on the GPU: inspect agrees with the CPU within tolerance on every number, and
   ``diff X X`` is exactly zero everywhere.

Without CUDA (or MPS) the "GPU" column runs on the CPU, so the script can be checked anywhere;
the figures then say nothing about a GPU. Everything printed is also written as JSON to
``$OUT/gpu.json`` when ``OUT`` is set, else benchmarks/_out/gpu.json. Never run in CI.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from _bench import DATA, ROOT, load_average, machine, table  # noqa: E402
from bench_inspect import resnet_checkpoint  # noqa: E402

import wcond  # noqa: E402
from wcond.checkpoint.open import open_checkpoint  # noqa: E402
from wcond.diff import diff  # noqa: E402


def accelerator() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()
    elif dev.type == "mps":
        torch.mps.synchronize()


def llm_shapes(
    hidden: int, layers: int, inter: int, vocab: int, kv: int
) -> list[tuple[str, tuple[int, ...]]]:
    """A Llama-style decoder's matrices (norm gains left out: inspect skips 1-D tensors)."""
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [
            (p + "self_attn.q_proj.weight", (hidden, hidden)),
            (p + "self_attn.k_proj.weight", (kv, hidden)),
            (p + "self_attn.v_proj.weight", (kv, hidden)),
            (p + "self_attn.o_proj.weight", (hidden, hidden)),
            (p + "mlp.gate_proj.weight", (inter, hidden)),
            (p + "mlp.up_proj.weight", (inter, hidden)),
            (p + "mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes.append(("lm_head.weight", (vocab, hidden)))
    return shapes


def llm_checkpoint(quick: bool) -> Path:
    """An fp16 safetensors file of seeded N(0, 0.02) weights, written once."""
    from safetensors.torch import save_file

    dims = (256, 2, 688, 4000, 64) if quick else (1024, 28, 2816, 32000, 256)
    path = DATA / f"llm_{'quick' if quick else '0.4b'}.safetensors"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(0)
        tensors = {k: (0.02 * torch.randn(s, generator=gen)).half() for k, s in llm_shapes(*dims)}
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp))
        tmp.rename(path)
    return path


def bench_init_cs(dev: torch.device, iterations: int, quick: bool) -> dict[str, object]:
    path = resnet_checkpoint("resnet18")
    if quick:
        iterations = min(iterations, 20)
    # Warm-up: CUDA context, kernels, cuBLAS handles (not counted).
    wcond.init_cs(path, iterations=2, device=str(dev), seed=0, layers=["layer1.*"])
    runs = {}
    for label, d in (("gpu", dev), ("cpu", torch.device("cpu"))):
        t = time.perf_counter()
        _, res = wcond.init_cs(path, iterations=iterations, device=str(d), seed=0)
        runs[label] = {
            "device": str(d),
            "loop_s": res.seconds,
            "call_s": time.perf_counter() - t,
            "cs_before": res.cs_before,
            "cs_after": res.cs_after,
        }
    speedup = runs["cpu"]["loop_s"] / runs["gpu"]["loop_s"]  # type: ignore[operator]
    agree = math.isclose(runs["gpu"]["cs_after"], runs["cpu"]["cs_after"], rel_tol=1e-3)  # type: ignore[arg-type]
    print(f"\n### init-cs, ResNet-18-shaped, {iterations} iterations (loop time)\n")
    print(
        table(
            ["device", "loop (s)", "call (s)", "CS before", "CS after"],
            [
                [
                    r["device"],
                    f"{r['loop_s']:.2f}",
                    f"{r['call_s']:.2f}",
                    f"{r['cs_before']:.6g}",
                    f"{r['cs_after']:.6g}",
                ]
                for r in runs.values()
            ],
        )
    )
    print(f"\nGPU speed-up {speedup:.1f}x (target >= 5x); final CS agrees to 1e-3: {agree}")
    return {"iterations": iterations, "runs": runs, "speedup": speedup, "cs_agree": agree}


def bench_inspect(dev: torch.device, quick: bool, repeat: int) -> dict[str, object]:
    path = llm_checkpoint(quick)
    ck = open_checkpoint(path)
    params = sum(math.prod(ck.info(k).shape) for k in ck.keys())

    def read_and_copy() -> None:
        c = open_checkpoint(path)
        for k in c.keys():
            c.get(k).to(dev)
        sync(dev)

    def inspect() -> wcond.Report:
        r = wcond.inspect(path, device=str(dev))
        sync(dev)
        return r

    def best(fn: object) -> float:
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - t)
        return min(times)

    t_cold = time.perf_counter()
    inspect()
    cold = time.perf_counter() - t_cold
    read_and_copy()  # warm the page cache for both alike
    t_read = best(read_and_copy)
    t_inspect = best(inspect)
    ratio = t_inspect / t_read
    print(
        f"\n### inspect in process, LLM-shaped fp16 ({params / 1e6:.1f}M params, "
        f"{path.stat().st_size / 2**30:.2f} GiB), best of {repeat}, warm\n"
    )
    print(
        table(
            ["what", "seconds"],
            [
                [f"read every tensor + copy to {dev}", f"{t_read:.3f}"],
                [f"wcond.inspect(path, device={str(dev)!r})", f"{t_inspect:.3f}"],
                ["first inspect (cold: kernels, page cache)", f"{cold:.3f}"],
            ],
        )
    )
    print(f"\ninspect / (read + copy): {ratio:.2f}x (target <= 2x)")
    return {
        "params": params,
        "read_copy_s": t_read,
        "inspect_s": t_inspect,
        "cold_s": cold,
        "ratio": ratio,
    }


def check_agreement(dev: torch.device) -> dict[str, object]:
    """Every number of inspect on dev against the CPU, and diff X X on dev."""
    g = torch.Generator().manual_seed(1)
    sd = {
        "conv.weight": torch.randn(64, 32, 3, 3, generator=g),
        "conv7.weight": torch.randn(16, 3, 7, 7, generator=g),
        "fc.weight": torch.randn(300, 512, generator=g).half(),
        "dead.weight": torch.randn(40, 20, generator=g),
    }
    sd["dead.weight"][3] = 0
    sd["conv.weight"][5] = -0.5 * sd["conv.weight"][9]
    from wcond.analyze import NUMERIC_FIELDS

    a = wcond.inspect(sd, device="cpu")
    b = wcond.inspect(sd, device=str(dev))
    worst = 0.0
    for la, lb in zip(a.layers, b.layers):
        for m in NUMERIC_FIELDS:
            x, y = la.value(m), lb.value(m)
            if x is None or y is None:
                assert x == y, (la.name, m, x, y)
                continue
            worst = max(worst, abs(x - y) / max(abs(x), 1e-12))
    d = diff(sd, sd, device=str(dev))
    nonzero = [
        (layer.name, m)
        for layer in d.layers
        for m, v in layer.metrics.items()
        if v.delta not in (0, None)
    ]
    print(f"\n### agreement on {dev}\n")
    print(f"largest relative difference to the CPU over every inspect number: {worst:.2e}")
    print(
        f"diff X X on {dev}: {'exactly zero everywhere' if not nonzero else f'NONZERO in {nonzero}'}"
    )
    return {"max_rel_diff_vs_cpu": worst, "self_diff_nonzero": nonzero}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="small sizes, to check the script")
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    dev = accelerator()
    info = {
        "machine": machine(),
        "torch": torch.__version__,
        "device": str(dev),
        "device_name": torch.cuda.get_device_name() if dev.type == "cuda" else str(dev),
        "cpu_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "quick": args.quick,
    }
    print(
        f"machine: {info['machine']}; accelerator: {info['device_name']}; torch {torch.__version__}"
    )
    if dev.type == "cpu":
        print(
            "NO GPU HERE: the 'gpu' figures below ran on the CPU and only show that the script works"
        )
    results: dict[str, object] = {"info": info}
    results["agreement"] = check_agreement(dev)
    results["inspect"] = bench_inspect(dev, args.quick, args.repeat)
    results["init_cs"] = bench_init_cs(dev, args.iterations, args.quick)
    info["load_average_end"] = load_average()
    out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks" / "_out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {out / 'gpu.json'}")


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
