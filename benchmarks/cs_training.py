"""Does init-cs pay off, and why? The CS paper's Table 5 setting, scaled to scikit-learn's digits.

Paper (papers/convolutional-similarity.txt, Section 4.2, Tables 4-5, Figures 2-3): on CIFAR-10 a
shallow CNN of Conv(3x3, padding 2)-BatchNorm-LeakyReLU(0.2)-MaxPool(2) blocks trained with plain
SGD at lr 0.01 gains 4.5 points (74.66 -> 79.16 %) from I = 500 Adam steps (lr 1e-3) of CS
minimization before training (Algorithm 1), and 2.5 points from CS as a regularizer (beta = 1e-3,
Algorithm 2); CNN1 with CS beats CNN2, the same network with twice the filters.

Here: scikit-learn's bundled handwritten digits (1,797 8x8 images, offline), a CNN of the paper's
kind scaled to 8x8 inputs (three Conv(3x3, padding 2)-[BN]-LeakyReLU(0.2) blocks, max-pools after
the first two, one Linear), plain SGD at lr 0.01, with or without BatchNorm. Arms, each over the
same seeds (per seed: the same data split, noise, initial weights and batch order in every arm):

  baseline      PyTorch's default initialization
  init-cs       wcond.init_cs(model) with the paper's settings (500 Adam steps at 1e-3)
  init-cs-kn    the same with keep_norm=True (every filter keeps its norm; only directions move)
  norm-matched  the baseline's filters, each rescaled to the norm init-cs gave it: init-cs's
                weight scale without its directions (no CS minimization)
  cs-reg        baseline init, cross-entropy + beta * wcond.metrics.conv_similarity(model)

Measured per run: test accuracy after every epoch (top = best epoch, as the paper reports; also
the last epoch's), the mean per-filter norm of each conv layer, the layers' CS, and the
feature-map similarity on the test inputs: for each conv layer, the mean over test images of
mean_{i<j} |cos(F_i, F_j)|, F_i the layer's i-th output map (no bias) on the inputs the layer
actually receives, before training (BatchNorm on batch statistics, as in the first steps) and after
it (eval mode).

    python benchmarks/cs_training.py --data digits --bn --seeds 10 --epochs 30 --out a.json
    python benchmarks/cs_training.py --data digits-hard --no-bn --seeds 10 --out b.json
    python benchmarks/cs_training.py --table a.json b.json        # the tables again, from JSON
    python benchmarks/cs_training.py --seeds 2 --epochs 2 --width 8   # a smoke run

Benchmark-only dependency: scikit-learn (`pip install scikit-learn`), for the data.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # this checkout's wcond, not an installed one

import wcond  # noqa: E402
from wcond import metrics  # noqa: E402

ARMS = ("baseline", "init-cs", "init-cs-kn", "norm-matched", "cs-reg")


# --------------------------------------------------------------------------- data


def load_data(variant: str, seed: int, args: argparse.Namespace) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_test, y_test), images (N, 1, 8, 8) in [0, 1] (+ noise for -hard).

    digits: a stratified 80/20 split (1,437 / 360). digits-hard: ``--train-per-class`` images of
    each digit to train on, every other image to test on, and Gaussian pixel noise of std
    ``--noise`` drawn once per image (train and test alike).
    """
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x = x.astype("float32") / 16.0
    if variant == "digits":
        xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.2, stratify=y, random_state=seed)
    elif variant == "digits-hard":
        rng = np.random.default_rng(seed)
        train_idx = np.concatenate(
            [
                rng.choice(np.flatnonzero(y == c), args.train_per_class, replace=False)
                for c in range(10)
            ]
        )
        mask = np.zeros(len(y), bool)
        mask[train_idx] = True
        x = x + rng.normal(0.0, args.noise, size=x.shape).astype("float32")
        xtr, ytr, xte, yte = x[mask], y[mask], x[~mask], y[~mask]
    else:
        raise SystemExit(f"--data {variant}: choose digits or digits-hard")

    def t(a: Any) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(a))

    return t(xtr).view(-1, 1, 8, 8), t(ytr).long(), t(xte).view(-1, 1, 8, 8), t(yte).long()


# --------------------------------------------------------------------------- model


def make_cnn(width: int, bn: bool, padding: int) -> nn.Sequential:
    """The paper's CNN1 kind (Table 4) for 8x8 inputs: three conv blocks, pools after two, a Linear.

    Table 4 prints Conv2d(3, 64, 3, 2): kernel 3 and padding 2 (full cross-correlation, where the
    paper's CS -> feature-map identity is exact); only that reading gives its Linear(576, 10).
    """
    layers: list[nn.Module] = []
    side, c_in = 8, 1
    for block in range(3):
        layers.append(nn.Conv2d(c_in, width, 3, padding=padding))
        if bn:
            layers.append(nn.BatchNorm2d(width))
        layers.append(nn.LeakyReLU(0.2))
        side = side + 2 * padding - 2
        if block < 2:
            layers.append(nn.MaxPool2d(2, 2))
            side //= 2
        c_in = width
    layers += [nn.Flatten(), nn.Linear(width * side * side, 10)]
    return nn.Sequential(*layers)


def convs(model: nn.Module) -> list[nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, nn.Conv2d)]


def filter_norms(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().flatten(1).norm(dim=1)


def init_arm(
    arm: str, base: nn.Sequential, args: argparse.Namespace, seed: int
) -> tuple[nn.Sequential, dict[str, Any]]:
    """The arm's model before training, from the seed's baseline model, and what init did."""
    model = copy.deepcopy(base)
    info: dict[str, Any] = {}
    if arm in ("init-cs", "init-cs-kn", "norm-matched"):
        t0 = time.perf_counter()
        tensors, result = wcond.init_cs(
            base,
            iterations=args.iterations,
            lr=args.cs_lr,
            keep_norm=arm == "init-cs-kn",
            seed=seed,
            device="cpu",
        )
        info["init_cs_seconds"] = time.perf_counter() - t0
        info["cs_drop"] = 1 - result.cs_after / result.cs_before
        if arm == "norm-matched":
            # The baseline's directions at init-cs's per-filter norms: init-cs's scale, no CS.
            cs_model = copy.deepcopy(base)
            cs_model.load_state_dict(tensors)
            with torch.no_grad():
                for conv, target in zip(convs(model), convs(cs_model)):
                    scale = filter_norms(target) / filter_norms(conv)
                    conv.weight.mul_(scale.view(-1, 1, 1, 1))
        else:
            model.load_state_dict(tensors)
    return model, info


# --------------------------------------------------------------------------- measurements


@torch.no_grad()
def feature_map_similarity(model: nn.Sequential, x: torch.Tensor, batch_stats: bool) -> list[float]:
    """Per conv layer: mean over images of mean_{i<j} |cos(F_i, F_j)| of its bias-free output maps.

    F is computed from the input the layer receives in the network (hooked), so later layers see
    the earlier layers' conditioned filters too. batch_stats: BatchNorm normalizes with the
    statistics of the test batch (a copy of the model is used, so nothing is updated).
    """
    net = copy.deepcopy(model)
    net.train(batch_stats)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [
        conv.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0]))
        for i, conv in enumerate(convs(net))
    ]
    net(x)
    for h in hooks:
        h.remove()
    out = []
    for i, conv in enumerate(convs(net)):
        fm = F.conv2d(inputs[i], conv.weight, None, conv.stride, conv.padding).flatten(2)
        fm = fm / fm.norm(dim=2, keepdim=True).clamp_min(1e-12)
        cos = fm @ fm.transpose(1, 2)  # (images, C, C)
        c = cos.shape[1]
        off = cos.abs().sum(dim=(1, 2)) - cos.diagonal(dim1=1, dim2=2).abs().sum(1)
        out.append(float((off / (c * (c - 1))).mean()))
    return out


def kernel_stats(model: nn.Module) -> dict[str, list[float]]:
    cs = [float(metrics.conv_similarity(c.weight.detach())) for c in convs(model)]
    cs_n = [float(metrics.conv_similarity_norm(c.weight.detach())) for c in convs(model)]
    norms = [float(filter_norms(c).mean()) for c in convs(model)]
    return {"cs": cs, "cs_norm": cs_n, "filter_norm": norms}


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = sum(
        int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(512), y.split(512))
    )
    return 100.0 * correct / len(y)


def train_run(
    arm: str, seed: int, data: tuple[torch.Tensor, ...], args: argparse.Namespace
) -> dict[str, Any]:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    base = make_cnn(args.width, args.bn, args.padding)
    model, info = init_arm(arm, base, args, seed)
    record: dict[str, Any] = {"arm": arm, "seed": seed, **info}
    record["init"] = kernel_stats(model)
    record["fm_sim_init"] = feature_map_similarity(model, xte, batch_stats=True)
    record["acc_init"] = accuracy(model, xte, yte)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr)
    order = torch.Generator().manual_seed(seed)
    test_acc, train_loss, cs_curve, eval_epochs = [], [], [], []
    t0 = time.perf_counter()
    for epoch in range(1, args.epochs + 1):
        model.train()
        total, n = 0.0, 0
        for idx in torch.randperm(len(ytr), generator=order).split(args.batch):
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            total += loss.item() * len(idx)
            n += len(idx)
            if arm == "cs-reg":
                loss = loss + args.beta * metrics.conv_similarity(model)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        train_loss.append(total / n)
        if epoch % args.eval_every == 0 or epoch in (1, args.early_epoch, args.epochs):
            eval_epochs.append(epoch)
            test_acc.append(accuracy(model, xte, yte))
            cs_curve.append(float(metrics.conv_similarity(model).detach()))
    record["train_seconds"] = time.perf_counter() - t0
    record["eval_epochs"] = eval_epochs
    record["test_acc"] = test_acc  # after each epoch of eval_epochs
    record["train_loss"] = train_loss
    record["cs_total"] = cs_curve
    record["final"] = kernel_stats(model)
    record["fm_sim_final"] = feature_map_similarity(model, xte, batch_stats=False)
    return record


# --------------------------------------------------------------------------- statistics and tables


def ms(values: list[float], fmt: str = "{:.2f}") -> str:
    if len(values) < 2:
        return fmt.format(values[0]) if values else "-"
    return f"{fmt.format(statistics.fmean(values))} ± {fmt.format(statistics.stdev(values))}"


def sign_flip_p(diffs: list[float]) -> float:
    """Two-sided exact paired permutation (sign-flip) p-value of the mean difference."""
    observed = abs(statistics.fmean(diffs))
    if observed == 0:
        return 1.0
    hits = total = 0
    for signs in itertools.product((1, -1), repeat=len(diffs)):
        total += 1
        hits += abs(statistics.fmean(s * d for s, d in zip(signs, diffs))) >= observed - 1e-12
    return hits / total


def paired(a: dict[int, float], b: dict[int, float]) -> str:
    seeds = sorted(set(a) & set(b))
    d = [a[s] - b[s] for s in seeds]
    if len(d) < 2:
        return "-"
    wins = sum(x > 0 for x in d)
    losses = sum(x < 0 for x in d)
    p = sign_flip_p(d) if len(d) <= 16 else float("nan")
    ties = len(d) - wins - losses
    return f"{statistics.fmean(d):+.2f} ± {statistics.stdev(d):.2f} ({wins}/{ties}/{losses}, p={p:.3f})"


def seed_values(runs: list[dict[str, Any]], key: str, early: int) -> dict[int, float]:
    """Test accuracy per seed: "top" (best evaluated epoch), "last", or after epoch ``early``."""
    out = {}
    for r in runs:
        if key == "top":
            out[r["seed"]] = max(r["test_acc"])
        elif key == "last":
            out[r["seed"]] = r["test_acc"][-1]
        else:
            out[r["seed"]] = r["test_acc"][r["eval_epochs"].index(early)]
    return out


def compare(specs: list[str]) -> str:
    """Paired (by seed: same data split) differences between FILE:ARM runs, e.g. two widths."""
    sides = []
    for spec in specs:
        path, _, arm = spec.rpartition(":")
        doc = json.loads(Path(path).read_text())
        runs = [r for r in doc["runs"] if r["arm"] == arm]
        if not runs:
            raise SystemExit(f"--compare {spec}: no {arm} runs in {path}")
        a = doc["args"]
        sides.append((f"{arm} (width {a['width']}, {a['data']}, bn={a['bn']})", runs, a))
    early = min(a["early_epoch"] for _, _, a in sides)
    lines = [
        f"| run | top test acc | acc after {early} epochs | top − first row, paired | after {early} − first row |",
        "|---|---|---|---|---|",
    ]
    ref_top = seed_values(sides[0][1], "top", early)
    ref_early = seed_values(sides[0][1], "early", early)
    for i, (name, runs, _) in enumerate(sides):
        top, e = seed_values(runs, "top", early), seed_values(runs, "early", early)
        d_top = paired(top, ref_top) if i else ""
        d_early = paired(e, ref_early) if i else ""
        lines.append(
            f"| {name} | {ms(list(top.values()))} | {ms(list(e.values()))} | {d_top} | {d_early} |"
        )
    return "\n".join(lines) + "\n"


def tables(doc: dict[str, Any]) -> str:
    a = doc["args"]
    runs = doc["runs"]
    early = min(a["early_epoch"], a["epochs"])
    arms = [
        arm
        for arm in ARMS + tuple(sorted({r["arm"] for r in runs} - set(ARMS)))
        if any(r["arm"] == arm for r in runs)
    ]
    by_arm = {arm: [r for r in runs if r["arm"] == arm] for arm in arms}

    def per_seed(arm: str, key: str) -> dict[int, float]:
        return seed_values(by_arm[arm], key, early)

    data = a["data"]
    if data == "digits-hard":
        data += f" ({a['train_per_class']} training images per digit, noise {a['noise']:g})"
    title = (
        f"{data}, width {a['width']}, {'BatchNorm' if a['bn'] else 'no BatchNorm'}, "
        f"{a['epochs']} epochs, {len({r['seed'] for r in runs})} seeds"
    )
    lines = [f"### {title}", ""]
    lines.append(
        f"| arm | top test acc | last-epoch acc | acc after {early} epochs | top − baseline, paired "
        f"(wins/ties/losses, p) | after {early} − baseline, paired |"
    )
    lines.append("|---|---|---|---|---|---|")
    for arm in arms:
        top, last, e = per_seed(arm, "top"), per_seed(arm, "last"), per_seed(arm, "early")
        vs = (
            ""
            if arm == "baseline" or "baseline" not in by_arm
            else paired(top, per_seed("baseline", "top"))
        )
        vs_e = (
            ""
            if arm == "baseline" or "baseline" not in by_arm
            else paired(e, per_seed("baseline", "early"))
        )
        lines.append(
            f"| {arm} | {ms(list(top.values()))} | {ms(list(last.values()))} | {ms(list(e.values()))} | {vs} | {vs_e} |"
        )
    if "init-cs" in by_arm and "norm-matched" in by_arm:
        top_d = paired(per_seed("init-cs", "top"), per_seed("norm-matched", "top"))
        early_d = paired(per_seed("init-cs", "early"), per_seed("norm-matched", "early"))
        lines += [
            "",
            f"init-cs − norm-matched, paired: top {top_d}; after {early} epochs {early_d}",
        ]
    n_layers = len(runs[0]["init"]["cs"])
    lines += [
        "",
        "| arm | mean filter norm at init, per conv | cs_norm at init | FM |cos| at init, per conv "
        "| FM |cos| after training | CS, all convs: init → end | acc at init | init-cs s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in arms:
        rs = by_arm[arm]

        def col(get: Any, rs: list[dict[str, Any]] = rs, fmt: str = "{:.3f}") -> str:
            return " / ".join(ms([get(r)[i] for r in rs], fmt) for i in range(n_layers))

        secs = [r["init_cs_seconds"] for r in rs if "init_cs_seconds" in r]
        lines.append(
            f"| {arm} | {col(lambda r: r['init']['filter_norm'])} | {col(lambda r: r['init']['cs_norm'])} "
            f"| {col(lambda r: r['fm_sim_init'])} | {col(lambda r: r['fm_sim_final'])} "
            f"| {ms([sum(r['init']['cs']) for r in rs], '{:.3g}')} → {ms([r['cs_total'][-1] for r in rs], '{:.3g}')} "
            f"| {ms([r['acc_init'] for r in rs], '{:.1f}')} | {ms(secs, '{:.1f}') if secs else ''} |"
        )
    evaluated = set(runs[0]["eval_epochs"])
    marks = sorted(
        {m for m in (1, 2, 3, 5, 10, 20, 40, 60, 80, 100) if m in evaluated} | {a["epochs"]}
    )
    lines += [
        "",
        "Mean test accuracy / mean training loss (the epoch's running mean) by epoch:",
        "",
        "| arm | " + " | ".join(f"ep {m}" for m in marks) + " |",
        "|---|" + "---|" * len(marks),
    ]
    for arm in arms:
        rs = by_arm[arm]
        cells = [
            f"{statistics.fmean(r['test_acc'][r['eval_epochs'].index(m)] for r in rs):.2f} / "
            f"{statistics.fmean(r['train_loss'][m - 1] for r in rs):.3f}"
            for m in marks
        ]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    train_s = [r["train_seconds"] for r in runs]
    lines += ["", f"Training time per run: {ms(train_s, '{:.1f}')} s (one torch thread)."]
    return "\n".join(lines) + "\n"


def init_lrs(args: argparse.Namespace, lrs: list[float]) -> str:
    """What init-cs does to seed 0's filters at several Adam learning rates (no training)."""
    torch.manual_seed(0)
    base = make_cnn(args.width, args.bn, args.padding)
    lines = [
        "| init-cs lr | mean filter norm, per conv | entry RMS / lr, per conv "
        "| CS drop due to directions (% of CS before), per conv |",
        "|---|---|---|---|",
        f"| (none) | {' / '.join(f'{float(filter_norms(c).mean()):.4f}' for c in convs(base))} | | |",
    ]
    for lr in lrs:
        tensors, result = wcond.init_cs(
            base, iterations=args.iterations, lr=lr, seed=0, device="cpu"
        )
        model = copy.deepcopy(base)
        model.load_state_dict(tensors)
        norms = " / ".join(f"{float(filter_norms(c).mean()):.4f}" for c in convs(model))
        rms = " / ".join(
            f"{float(c.weight.detach().pow(2).mean().sqrt()) / lr:.2f}" for c in convs(model)
        )
        dirs = " / ".join(
            f"{100 * (layer.drop_from_directions or 0.0):.2f}%" for layer in result.layers
        )
        lines.append(f"| {lr:g} | {norms} | {rms} | {dirs} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}"
    )
    ap.add_argument("--seeds", type=int, default=10, help="seeds 0..N-1 (or --seed-list)")
    ap.add_argument("--seed-list", default=None, help="comma-separated seeds, instead of --seeds")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--early-epoch", type=int, default=5, help="the convergence column's epoch")
    ap.add_argument(
        "--eval-every",
        type=int,
        default=1,
        help="test accuracy every N epochs (and at 1, early, last)",
    )
    ap.add_argument("--data", default="digits", choices=("digits", "digits-hard"))
    ap.add_argument(
        "--train-per-class", type=int, default=20, help="digits-hard: training images per digit"
    )
    ap.add_argument("--noise", type=float, default=0.3, help="digits-hard: std of the pixel noise")
    ap.add_argument("--width", type=int, default=64, help="filters per conv layer")
    ap.add_argument(
        "--bn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="BatchNorm after each conv",
    )
    ap.add_argument(
        "--padding", type=int, default=2, help="2 = full cross-correlation, as the paper's Table 4"
    )
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01, help="plain SGD (no momentum), as the paper")
    ap.add_argument("--iterations", type=int, default=500, help="init-cs steps (the paper's I)")
    ap.add_argument(
        "--cs-lr", type=float, default=1e-3, help="init-cs Adam learning rate (the paper's)"
    )
    ap.add_argument("--beta", type=float, default=1e-3, help="cs-reg weight (the paper's)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--out", type=Path, default=None, help="write every run's curves and measurements as JSON"
    )
    ap.add_argument(
        "--table",
        type=Path,
        nargs="+",
        default=None,
        help="only print the tables of these JSON files",
    )
    ap.add_argument(
        "--compare",
        nargs="+",
        default=None,
        metavar="FILE:ARM",
        help="only compare these runs, paired by seed",
    )
    ap.add_argument(
        "--init-lrs",
        default=None,
        metavar="LR,LR",
        help="only show what init-cs does at these learning rates",
    )
    args = ap.parse_args()

    if args.init_lrs:
        torch.set_num_threads(args.threads)
        print(init_lrs(args, [float(x) for x in args.init_lrs.split(",")]))
        return

    if args.compare:
        print(compare(args.compare))
        return
    if args.table:
        for path in args.table:
            print(tables(json.loads(path.read_text())))
        return
    torch.set_num_threads(args.threads)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = sorted(set(arms) - set(ARMS))
    if unknown:
        raise SystemExit(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(ARMS)}")
    seeds = (
        [int(s) for s in args.seed_list.split(",")] if args.seed_list else list(range(args.seeds))
    )
    doc: dict[str, Any] = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "runs": [],
    }
    doc["args"]["seeds"] = seeds
    doc["torch"] = torch.__version__
    start = time.perf_counter()
    for seed in seeds:
        data = load_data(args.data, seed, args)
        for arm in arms:
            record = train_run(arm, seed, data, args)
            doc["runs"].append(record)
            print(
                f"seed {seed} {arm:13s} top {max(record['test_acc']):6.2f} last {record['test_acc'][-1]:6.2f} "
                f"fm|cos| {record['fm_sim_init'][0]:.3f} norms {record['init']['filter_norm'][0]:.3f} "
                f"({record['train_seconds']:.1f} s)",
                flush=True,
            )
            if args.out:  # after every run, so that a cut-short benchmark keeps what it did
                args.out.write_text(json.dumps(doc) + "\n")
    doc["seconds"] = time.perf_counter() - start
    if args.out:
        args.out.write_text(json.dumps(doc) + "\n")
    print(f"train: {len(data[1])} images, test: {len(data[3])}; {doc['seconds']:.0f} s in all\n")
    print(tables(doc))


if __name__ == "__main__":
    main()
