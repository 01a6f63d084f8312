"""Does shrinking pay off on a trained network? The RaRe paper's Table 1 setting, scaled to load_digits.

Paper (the RaRe paper, docs/METRICS.md, References): a 784-500x5-10 ReLU MLP with 20% dropout on Fashion-MNIST,
Adam 1e-3; with its RaRe loss (lambda1 = 20), L2 decay (lambda2 = 0.1), Frobenius normalisation
and pairs fused after every update ("dynamic low-rank approximation", tau_cos 1e-4, tau_euc 0.1)
it reports 30.65 +- 0.97 % fewer parameters at 90.65 +- 0.15 % accuracy (baseline 90.45).

Here: scikit-learn's bundled handwritten digits (1,797 8x8 images, offline) with a 64-64x5-10
MLP, the same width-to-input ratio class of network (square hidden layers, as the paper's).
Benchmark-only dependency: `pip install scikit-learn`. Arms, each over --seeds seeds:

  baseline        cross-entropy + dropout
  baseline+fold   the baseline, then wcond.fold (exact removal of positively parallel units)
                  and wcond.shrink (factorized storage) on its checkpoint
  rare+FN         trained with lambda1 * L_RaRe (wcond.metrics.rare, rows and columns, the
                  paper's m'n' weighting) + lambda2 * L2 and Frobenius normalisation, then folded
                  and shrunk once at the end
  rare+FN+fold    the same loss, with wcond.fold applied during training whenever a hidden
                  layer holds a positively near-parallel pair after an update (the paper fuses
                  after every update), the optimizer rebuilt for the narrower model
  rare+FN+DLRA    the paper's Algorithm 1 through wcond.rare.DynamicFusion: each Linear kept as
                  P W' Q, the same loss on W', pairs of either sign fused in place after every
                  update with the Adam moments carried over; exported in wcond's factorized
                  format (DynamicFusion.export)
  rare+FN+DLRA/N  the same, checking for pairs every N updates (every_n_steps=N)
  rare+FN+DLRA-fresh, rare+FN+DLRA+pos   ablations: a fresh Adam after each fusion (as the fold
                  arm has), or positively parallel pairs only (as folding through a ReLU needs)

    python benchmarks/rare_paper.py --epochs 40 --batch 64 \
        --arms baseline,rare+FN,rare+FN+fold,rare+FN+DLRA,rare+FN+DLRA/10
    python benchmarks/rare_paper.py --epochs 40 --batch 64 --width 256 --depth 4
    python benchmarks/rare_paper.py --epochs 150 --batch 64 --width 256 --depth 4 --arms baseline,rare+FN+DLRA
    python benchmarks/rare_paper.py --seeds 1 --epochs 15   # a smoke run
    python benchmarks/rare_paper.py --cost --width 256 --depth 4   # the helper's cost per step
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # this checkout's wcond, not an installed one

import wcond  # noqa: E402
from wcond import metrics  # noqa: E402
from wcond.checkpoint.write import save_checkpoint  # noqa: E402
from wcond.rare import DynamicFusion  # noqa: E402
from wcond.rare import fusion as fusion_module  # noqa: E402
from wcond.shrink import fuse_vectors, shrink  # noqa: E402

DLRA = "rare+FN+DLRA"


class FNLinear(nn.Linear):
    """Frobenius normalisation (the paper's eq. 16): W_used = k W / |W|_F * g, g trainable."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__(n_in, n_out)
        self.register_buffer("k", self.weight.detach().norm())
        self.g = nn.Parameter(torch.ones(()))

    def used_weight(self) -> torch.Tensor:
        return self.k * self.weight / self.weight.norm() * self.g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.used_weight(), self.bias)


def make_mlp(widths: list[int], fn: bool) -> nn.Sequential:
    """Linear-ReLU-Dropout(0.2) blocks; the output layer has no dropout after it."""
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(widths, widths[1:])):
        layers.append(FNLinear(a, b) if fn else nn.Linear(a, b))
        if i < len(widths) - 2:
            layers += [nn.ReLU(), nn.Dropout(0.2)]
    return nn.Sequential(*layers)


def mlp_widths(model: nn.Sequential) -> list[int]:
    """Input width of each Linear, then the last one's output width (what make_mlp takes)."""
    linears = [m for m in model if isinstance(m, nn.Linear)]
    return [m.in_features for m in linears] + [linears[-1].out_features]


def bake(model: nn.Sequential) -> nn.Sequential:
    """The same function with plain nn.Linear layers (Frobenius normalisation multiplied in)."""
    plain = make_mlp(mlp_widths(model), fn=False)
    with torch.no_grad():
        for src, dst in zip(model, plain):
            if isinstance(src, nn.Linear):
                w = src.used_weight() if isinstance(src, FNLinear) else src.weight
                dst.weight.copy_(w)
                dst.bias.copy_(src.bias)
    return plain


def unbake(plain: nn.Sequential) -> nn.Sequential:
    """Frobenius-normalised layers holding ``plain``'s weights (k = their norm, g = 1)."""
    fn = make_mlp(mlp_widths(plain), fn=True)
    with torch.no_grad():
        for src, dst in zip(plain, fn):
            if isinstance(src, nn.Linear):
                dst.weight.copy_(src.weight)
                dst.bias.copy_(src.bias)
                dst.k.copy_(src.weight.norm())
    return fn


def rare_loss(model: nn.Module) -> torch.Tensor:
    """The paper's eq. 17: sum_i m'n' [RaRe(W') + RaRe(W'^T)] / (2c), c = sum_i m'n'."""
    ws = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    c = sum(w.numel() for w in ws)
    terms = [w.numel() * (metrics.rare(w, "rows") + metrics.rare(w, "cols")) for w in ws]
    return torch.stack(terms).sum() / (2 * c)


@torch.no_grad()
def has_pair(model: nn.Module, args: argparse.Namespace) -> bool:
    """Whether a hidden layer holds a positively near-parallel pair of units ([w, b] rows)."""
    layers = [m for m in model if isinstance(m, nn.Linear)][:-1]  # the output layer's are classes
    for m in layers:
        w = m.used_weight() if isinstance(m, FNLinear) else m.weight
        rows = torch.cat([w, m.bias[:, None]], dim=1)
        pairs = metrics.near_parallel_pairs(rows, tau_cos=args.tau_cos, tau_euc=args.tau_euc)
        if any(p.cos > 0 for p in pairs):
            return True
    return False


def l2_loss(model: nn.Module) -> torch.Tensor:
    ws = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    return torch.stack([w.pow(2).sum() for w in ws]).mean()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return 100.0 * float((model(x).argmax(1) == y).float().mean())


def params(model: nn.Module) -> int:
    return sum(
        m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, nn.Linear)
    )


def train(
    arm: str,
    data: tuple[torch.Tensor, ...],
    seed: int,
    args: argparse.Namespace,
) -> tuple[nn.Sequential, int, DynamicFusion | None]:
    """Train one arm; returns the model (baked, except DLRA's), units folding removed, the fusion."""
    x_tr, y_tr, _, _ = data
    torch.manual_seed(seed)
    dlra = arm.startswith(DLRA)  # DLRA/N: checking every N steps; -fresh, +pos: ablations
    fn = arm.startswith("rare") and not dlra  # DLRA: Frobenius normalisation in DynamicFusion
    model = make_mlp(widths(args), fn=fn)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    fusion = None
    if dlra:
        every = int(arm.partition("/")[2] or 1)
        # +pos fuses positively parallel pairs only, as folding through a ReLU must
        fusion_module.fuse_vectors = partial(fuse_vectors, positive=arm == DLRA + "+pos")
        fusion = DynamicFusion(
            model,
            opt,
            tau_cos=args.tau_cos,
            tau_euc=args.tau_euc,
            frobenius=True,
            every_n_steps=every,
        )
    gen = torch.Generator().manual_seed(seed)
    removed = 0
    for _ in range(args.epochs):
        model.train()
        for idx in torch.randperm(len(x_tr), generator=gen).split(args.batch):
            loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
            if fusion is not None:
                loss = loss + fusion.regularizer(args.lambda1, args.lambda2)
            elif fn:
                loss = loss + args.lambda1 * rare_loss(model) + args.lambda2 * l2_loss(model)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if fusion is not None:
                if fusion.step() and arm == DLRA + "-fresh":  # ablation: state dropped, as fold
                    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
                    fusion.attach(opt)
            # The paper fuses after every update: check cheaply, fold only when a pair is there.
            elif arm == "rare+FN+fold" and has_pair(model, args):
                before = params(model)
                plain, _ = wcond.fold(bake(model), tau_cos=args.tau_cos, tau_euc=args.tau_euc)
                if params(plain) < before:
                    removed += before - params(plain)
                    model = unbake(plain)
                    opt = torch.optim.Adam(model.parameters(), lr=1e-3)  # new shapes: fresh state
    return (model if fusion is not None else bake(model)), removed, fusion


def evaluate(
    model: nn.Sequential,
    data: tuple[torch.Tensor, ...],
    args: argparse.Namespace,
    tmp: Path,
    fusion: DynamicFusion | None,
) -> dict:
    """Accuracy; the file each arm ships and what it stores, against the full network's checkpoint.

    DLRA ships ``fusion.export``; the other arms ship ``wcond.fold`` then ``wcond.shrink`` of the
    trained model. "acc_file" is the accuracy of the model loaded from that file (the original
    architecture for DLRA, the folded one otherwise). Removed weights and bytes are counted
    against the full-width network and its safetensors file, the same for every arm.
    """
    _, _, x_te, y_te = data
    dense = tmp / "dense.safetensors"
    small = tmp / "small.safetensors"
    plain = make_mlp(widths(args), fn=False)
    save_checkpoint(dense, {k: v.contiguous() for k, v in plain.state_dict().items()})
    full_weights = sum(m.weight.numel() for m in plain.modules() if isinstance(m, nn.Linear))
    if fusion is not None:
        fusion.export(small, force=True)
        plain.load_state_dict(wcond.load_state_dict(small))
        acc_file, diff = accuracy(plain, x_te, y_te), 0.0
        report = fusion.report()
        stored = report.params_stored + sum(
            m.bias.numel() for m in model.modules() if isinstance(m, nn.Linear)
        )
        w_removed = report.removed_fraction
    else:
        folded, fold_report = wcond.fold(model, x_te, tau_cos=args.tau_cos, tau_euc=args.tau_euc)
        folded_file = tmp / "folded.safetensors"
        save_checkpoint(folded_file, {k: v.contiguous() for k, v in folded.state_dict().items()})
        shrunk = shrink(folded_file, small, tau_cos=args.tau_cos, tau_euc=args.tau_euc, force=True)
        acc_file, diff, stored = (
            accuracy(folded, x_te, y_te),
            fold_report.max_abs_diff or 0.0,
            shrunk.params_after,
        )
        w_removed = (params(plain) - stored) / full_weights
    return {
        "acc": accuracy(model, x_te, y_te),
        "acc_file": acc_file,
        "params": params(plain),
        "params_stored": stored,
        "w_removed": 100.0 * w_removed,
        "diff": diff,
        "bytes_dense": dense.stat().st_size,
        "bytes_file": small.stat().st_size,
        "fusion_seconds": fusion.seconds if fusion is not None else 0.0,
    }


def load_data(seed: int) -> tuple[torch.Tensor, ...]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    i_tr, i_te = train_test_split(
        list(range(len(y))), test_size=0.2, random_state=seed, stratify=digits.target
    )
    return x[i_tr], y[i_tr], x[i_te], y[i_te]


def ms(values: list[float], fmt: str = "{:.2f}") -> str:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


def widths(args: argparse.Namespace) -> list[int]:
    return [64] + [args.width] * args.depth + [10]


def step_cost(args: argparse.Namespace) -> None:
    """What DynamicFusion adds to a training step, in the regime it is used in.

    A plain step (forward, cross-entropy, backward, Adam) of the baseline arm against, in the
    DLRA arm's own training (the RaRe loss pulling pairs together, pairs fused as they come),
    the time of each ``fusion.step()`` call and of the P W' Q forward/backward it adds. Steps are
    timed one by one, interleaved, over ``--cost-epochs`` epochs of seed 0's data.
    """
    x_tr, y_tr, _, _ = load_data(0)

    def run(dlra: bool, every: int = 1, frobenius: bool = True) -> tuple[float, float, int]:
        torch.manual_seed(0)
        model = make_mlp(widths(args), fn=False)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        fusion = None
        if dlra:
            fusion = DynamicFusion(model, opt, frobenius=frobenius, every_n_steps=every)
        gen = torch.Generator().manual_seed(0)
        steps, train, fuse = 0, 0.0, 0.0
        for _ in range(args.cost_epochs):
            for idx in torch.randperm(len(x_tr), generator=gen).split(args.batch):
                t0 = time.perf_counter()
                loss = nn.functional.cross_entropy(model(x_tr[idx]), y_tr[idx])
                opt.zero_grad()
                loss.backward()
                t1 = time.perf_counter()
                if fusion is not None:  # the paper's loss, timed apart ("RaRe loss aside")
                    fusion.regularizer(args.lambda1, args.lambda2).backward()
                t2 = time.perf_counter()
                opt.step()
                t3 = time.perf_counter()
                if fusion is not None:
                    fusion.step()
                t4 = time.perf_counter()
                train += (t1 - t0) + (t3 - t2)
                fuse += t4 - t3
                steps += 1
        fused = fusion.fusions if fusion is not None else 0
        return train / steps, fuse / steps, fused

    plain, _, _ = run(False)
    wrapped, fuse, fused = run(True)
    bare, _, _ = run(True, frobenius=False)
    _, fuse10, fused10 = run(True, every=10)
    print(
        f"network {'-'.join(map(str, widths(args)))}, batch {args.batch}, "
        f"{args.cost_epochs} epochs of digits, torch threads {args.threads}"
    )
    print(f"plain step (forward, backward, Adam):              {1e3 * plain:.3f} ms")
    print(
        f"the DLRA arm's step without its RaRe loss (P W' Q, FN): {1e3 * wrapped:.3f} ms "
        f"({wrapped / plain:.2f}x)"
    )
    print(
        f"the same without Frobenius normalisation (P W' Q):   {1e3 * bare:.3f} ms "
        f"({bare / plain:.2f}x)"
    )
    print(
        f"DynamicFusion.step() after it, every step:          {1e3 * fuse:.3f} ms "
        f"({fuse / plain:.2f}x a plain step; {fused} pairs fused)"
    )
    print(
        f"DynamicFusion.step(), every_n_steps=10, per call:   {1e3 * fuse10:.3f} ms "
        f"({fuse10 / plain:.2f}x; {fused10} pairs fused)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--width", type=int, default=64, help="hidden units per layer")
    ap.add_argument("--depth", type=int, default=5, help="hidden layers")
    ap.add_argument("--lambda1", type=float, default=20.0)
    ap.add_argument("--lambda2", type=float, default=0.1)
    ap.add_argument("--tau-cos", type=float, default=1e-4)
    ap.add_argument("--tau-euc", type=float, default=0.1)
    ap.add_argument("--arms", default=f"baseline,rare+FN,rare+FN+fold,{DLRA}")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cost", action="store_true", help="only time a step against the helper")
    ap.add_argument("--cost-epochs", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.cost:
        step_cost(args)
        return
    arms = args.arms.split(",")
    results: dict[str, list[dict]] = {a: [] for a in arms}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        for seed in range(args.seeds):
            data = load_data(seed)
            for arm in arms:
                t0 = time.perf_counter()
                model, removed_in_training, fusion = train(arm, data, seed, args)
                train_seconds = time.perf_counter() - t0
                r = evaluate(model, data, args, Path(d), fusion)
                r["removed_in_training"] = removed_in_training
                r["seconds_per_epoch"] = train_seconds / args.epochs
                results[arm].append(r)
                print(
                    f"seed {seed} {arm:13s} acc {r['acc']:.2f} (file {r['acc_file']:.2f}) params "
                    f"{r['params']:,} -> stored {r['params_stored']:,} (W' -{r['w_removed']:.1f}%) "
                    f"bytes {r['bytes_dense']:,} -> {r['bytes_file']:,} (max|diff| {r['diff']:.1e}) "
                    f"{r['seconds_per_epoch']:.2f} s/epoch, fusing {r['fusion_seconds'] / args.epochs:.3f} s/epoch",
                    file=sys.stderr,
                    flush=True,
                )
    full = sum(a * b + b for a, b in zip(widths(args), widths(args)[1:]))
    print(f"network {'-'.join(map(str, widths(args)))}: {full:,} parameters")
    print(
        "| arm | accuracy (%) | accuracy from the file (%) | weights removed (%) | params stored "
        "| file bytes: dense → shipped | file vs dense | s/epoch (fusing) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for arm in arms:
        rs = results[arm]
        ratio = [100.0 * (r["bytes_file"] / r["bytes_dense"] - 1) for r in rs]
        files = " → ".join(
            ms([float(r[k]) for r in rs], "{:,.0f}") for k in ("bytes_dense", "bytes_file")
        )
        print(
            f"| {arm} | {ms([r['acc'] for r in rs])} | {ms([r['acc_file'] for r in rs])} "
            f"| {ms([r['w_removed'] for r in rs])} "
            f"| {ms([float(r['params_stored']) for r in rs], '{:,.0f}')} | {files} | {ms(ratio, '{:+.1f}')}% "
            f"| {ms([r['seconds_per_epoch'] for r in rs])} "
            f"({ms([r['fusion_seconds'] / args.epochs for r in rs], '{:.3f}')}) |"
        )
    worst = max(r["diff"] for rs in results.values() for r in rs)
    print(f"\nlargest |output change| from folding: {worst:.1e}")
    print(
        f"wall time: {time.perf_counter() - start:.0f} s, {args.seeds} seeds, "
        f"{args.epochs} epochs, batch {args.batch}, torch threads {args.threads}"
    )


if __name__ == "__main__":
    main()
