"""Overhead of wcond.monitor on a ResNet-18: one metrics call against one training step of the same model.

The model is torchvision's ResNet-18 written out here (torchvision is not a dependency): 20 conv
weights, a 1000x512 fc, 11.7M parameters. A training step is forward + cross-entropy + backward
+ SGD step on a random batch; a monitor call is ``WeightMonitor.compute(model)`` (what the
Lightning callback and ``WeightMonitor.step`` run when due) with the default metrics
(acv_mean, conv_similarity_norm, norm_loss, rare_rows) and with every inspect metric. The three
take turns, round after round, so that load from elsewhere on the machine hits them alike; the
median of each is reported, with the ratio and the overhead when the monitor runs every N steps.

Usage: python benchmarks/bench_monitor.py [--batch 32] [--size 224] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from wcond.analyze import NUMERIC_FIELDS
from wcond.monitor import DEFAULT_METRICS, WeightMonitor


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision.models.resnet18's layers and state-dict keys."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for i, cout in enumerate((64, 128, 256, 512), start=1):
            stride = 1 if i == 1 else 2
            setattr(
                self,
                f"layer{i}",
                nn.Sequential(BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)),
            )
            cin = cout
        self.fc = nn.Linear(512, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = ResNet18().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 1000, (args.batch,), device=device)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        _sync(device)

    default = WeightMonitor(metrics=DEFAULT_METRICS)
    full = WeightMonitor(metrics=NUMERIC_FIELDS)
    cases: dict[str, Callable[[], object]] = {
        "training step": train_step,
        "monitor, default metrics": lambda: (default.compute(model), _sync(device)),
        "monitor, every inspect metric": lambda: (full.compute(model), _sync(device)),
    }
    for fn in cases.values():  # warm-up
        fn()
    runs: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.rounds):
        for label, fn in cases.items():
            t = time.perf_counter()
            fn()
            runs[label].append(time.perf_counter() - t)
    step = statistics.median(runs["training step"])
    n_logged = len(default.compute(model))
    print(
        f"ResNet-18 ({sum(p.numel() for p in model.parameters()):,} parameters), batch {args.batch}x3x"
        f"{args.size}x{args.size}, {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{platform.machine()}; {args.rounds} rounds, medians; default metrics log {n_logged} values"
    )
    print()
    print("| call | s (median) | min..max | / training step | overhead every 100 / 500 steps |")
    print("|---|---:|---:|---:|---:|")
    for label, r in runs.items():
        med = statistics.median(r)
        ratio = med / step
        every = (
            ""
            if label == "training step"
            else f"{100 * ratio / 100:.2f}% / {100 * ratio / 500:.3f}%"
        )
        print(f"| {label} | {med:.3f} | {min(r):.3f}..{max(r):.3f} | {ratio:.3f} | {every} |")


if __name__ == "__main__":
    main()
