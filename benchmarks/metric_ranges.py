"""The ranges in docs/NUMBERS.md: every inspect metric on untrained and trained networks, measured.

Networks (all offline; the digits are scikit-learn's bundled 8x8 images):

  digits-cnn       cs_training.make_cnn(64 filters, BatchNorm, padding 2): PyTorch's default init,
                   then trained --cnn-epochs of plain SGD at lr 0.01, batch 64 (cs_training's
                   baseline arm); also the same init after wcond.init_cs(keep_norm=True).
  digits-mlp       rare_paper.make_mlp(64 -> 5 x 64 -> 10): default init, then trained --mlp-epochs
                   of Adam at 1e-3 (rare_paper's baseline arm) and with the RaRe loss (its rare+FN arm).
  resnet18         bench_inspect.resnet("resnet18"): Kaiming-normal init, NOT trained (torchvision
                   and its pretrained weights are not available offline).
  sample_checkpoints/*.pt, .safetensors, .ckpt: default init with planted redundancy (see
                   make_samples.py), not trained (lightning_cnn: 120 steps on noise).

Prints, per metric and network, min / median / max over the layers where it applies (seeds pooled).

    python benchmarks/metric_ranges.py                      # the table in docs/NUMBERS.md
    # or one process per seed, then the table of all (what docs/NUMBERS.md ran; ~2 min per seed)
    python benchmarks/metric_ranges.py --seed-list 0 --threads 1 --out s0.json
    python benchmarks/metric_ranges.py --seed-list 1 --threads 1 --no-fixed --out s1.json
    python benchmarks/metric_ranges.py --seed-list 2 --threads 1 --no-fixed --out s2.json
    python benchmarks/metric_ranges.py --merge s0.json s1.json s2.json
    python benchmarks/metric_ranges.py --seeds 1 --cnn-epochs 1 --mlp-epochs 1 --no-init-cs   # smoke run

Benchmark-only dependency: scikit-learn (`pip install scikit-learn`), for the data.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
for p in (str(REPO_ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)  # this checkout's wcond and the sibling benchmarks

import bench_inspect  # noqa: E402
import cs_training  # noqa: E402
import rare_paper  # noqa: E402

import wcond  # noqa: E402
from wcond.report import NUMERIC_FIELDS, Report  # noqa: E402

SAMPLES = REPO_ROOT / "sample_checkpoints"


def cnn_runs(args: argparse.Namespace, seed: int) -> dict[str, nn.Module]:
    data = cs_training.load_data("digits", seed, args)
    xtr, ytr = data[0], data[1]
    torch.manual_seed(seed)
    model = cs_training.make_cnn(64, bn=True, padding=2)
    out: dict[str, nn.Module] = {"digits-cnn, init": _copy(model)}
    if args.init_cs:
        cs_args = argparse.Namespace(iterations=500, cs_lr=1e-3)
        out["digits-cnn, init-cs --keep-norm"] = cs_training.init_arm(
            "init-cs-kn", model, cs_args, seed
        )[0]
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    order = torch.Generator().manual_seed(seed)
    for _ in range(args.cnn_epochs):
        model.train()
        for idx in torch.randperm(len(ytr), generator=order).split(64):
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    acc = cs_training.accuracy(model, data[2], data[3])
    print(f"  digits-cnn seed {seed}: test accuracy {acc:.1f} %", file=sys.stderr)
    out[f"digits-cnn, trained {args.cnn_epochs} epochs"] = model
    return out


def mlp_runs(args: argparse.Namespace, seed: int) -> dict[str, nn.Module]:
    data = rare_paper.load_data(seed)
    rp = argparse.Namespace(
        width=64,
        depth=5,
        epochs=args.mlp_epochs,
        batch=64,
        lambda1=20.0,
        lambda2=0.1,
        tau_cos=1e-4,
        tau_euc=0.1,
    )
    torch.manual_seed(seed)
    out: dict[str, nn.Module] = {
        "digits-mlp, init": rare_paper.make_mlp(rare_paper.widths(rp), False)
    }
    for arm, label in (("baseline", "trained"), ("rare+FN", "trained with the RaRe loss")):
        model = rare_paper.train(arm, data, seed, rp)[0]
        acc = rare_paper.accuracy(model, data[2], data[3])
        print(f"  digits-mlp {arm} seed {seed}: test accuracy {acc:.1f} %", file=sys.stderr)
        out[f"digits-mlp, {label} {args.mlp_epochs} epochs"] = model
    return out


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


Values = dict[str, dict[str, list[float]]]  # network -> metric -> per-layer values, seeds pooled


def collect(groups: dict[str, list[Report]]) -> Values:
    return {
        name: {
            m: [v for r in reports for layer in r.layers if (v := layer.value(m)) is not None]
            for m in NUMERIC_FIELDS
        }
        for name, reports in groups.items()
    }


def stats(values: list[float]) -> str:
    if not values:
        return "n/a"
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return " / ".join(_fmt(v) for v in (lo, mid, hi))


def _fmt(v: float) -> str:
    if v == int(v) and abs(v) < 1e6:
        return str(int(v))
    return f"{v:.3g}"


def table(values: Values) -> str:
    names = list(values)
    out = ["min / median / max over layers (seeds pooled)", ""]
    out.append("| metric | " + " | ".join(names) + " |")
    out.append("|---|" + "---|" * len(names))
    for m in NUMERIC_FIELDS:
        out.append(f"| {m} | " + " | ".join(stats(values[n][m]) for n in names) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (or --seed-list)")
    ap.add_argument("--seed-list", default=None, help="comma-separated seeds, instead of --seeds")
    ap.add_argument("--cnn-epochs", type=int, default=30)
    ap.add_argument("--mlp-epochs", type=int, default=40)
    ap.add_argument("--no-init-cs", dest="init_cs", action="store_false")
    ap.add_argument(
        "--no-fixed", dest="fixed", action="store_false", help="skip ResNet-18 and the samples"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="also save the per-layer values as JSON")
    ap.add_argument("--merge", type=Path, nargs="+", help="print the table of saved runs, pooled")
    args = ap.parse_args()
    if args.merge:
        merged: Values = {}
        for path in args.merge:
            for name, by_metric in json.loads(path.read_text()).items():
                for m, vs in by_metric.items():
                    merged.setdefault(name, {}).setdefault(m, []).extend(vs)
        print(table(merged))
        return
    torch.set_num_threads(args.threads)
    seeds = (
        [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    )
    t0 = time.perf_counter()
    groups: dict[str, list[Report]] = {}
    for seed in seeds:
        for name, model in {**cnn_runs(args, seed), **mlp_runs(args, seed)}.items():
            groups.setdefault(name, []).append(wcond.inspect(model.eval(), top=0))
    if args.fixed:
        groups["resnet18, Kaiming init (not trained)"] = [
            wcond.inspect(bench_inspect.resnet("resnet18"), top=0)
        ]
        for path in sorted(SAMPLES.glob("*.*")):
            if path.suffix in (".pt", ".safetensors", ".ckpt"):
                groups[f"sample {path.name}"] = [wcond.inspect(path, top=0)]
    print(f"measured in {time.perf_counter() - t0:.0f} s, seeds {seeds}", file=sys.stderr)
    values = collect(groups)
    if args.out:
        args.out.write_text(json.dumps(values))
    print(table(values))


if __name__ == "__main__":
    main()
