#!/usr/bin/env python3
"""Timing and memory of `wcond inspect` (issue 2's performance targets), with generated checkpoints.

    python benchmarks/bench_inspect.py resnet50       # vs a bare torch.load; target <= 1.3x
    python benchmarks/bench_inspect.py tinyllama      # ~1.1B fp16, sharded; vs its GEMM floor, <= 1.25x
    python benchmarks/bench_inspect.py embedding      # 32000 x 4096 fp32: bounded memory
    python benchmarks/bench_inspect.py weightwatcher  # vs WeightWatcher analyze(), ResNet-18
    python benchmarks/bench_inspect.py all

Checkpoints are written under benchmarks/_data/ (gitignored) from fixed seeds and reused when
present; ``--clean`` deletes the large ones afterwards. Whole-process timings run the real
command in a subprocess (interpreter start and imports included); the report goes to a
discarded stdout. Every section prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from fnmatch import fnmatch
from pathlib import Path

# wcond sets its OpenMP default (a short spin) before torch loads: importing it first gives the
# in-process and GEMM-floor figures the threading of the whole-process runs, which inherit it.
import wcond  # noqa: E402  # isort: skip

import torch  # noqa: E402
from torch import nn  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import DATA, ROOT, load_average, machine, table, time_call, time_processes, time_v  # noqa: E402

VENV_WW = ROOT / "benchmarks" / "_venv_ww"
SEED = 0


def wcond_cmd(python: str = sys.executable) -> list[str]:
    """`python -m wcond`, run from the repository root: the checkout's own wcond, whatever is installed."""
    return [python, "-m", "wcond"]


# --------------------------------------------------------------------------- ResNet (torchvision's layout)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (y + (self.downsample(x) if self.downsample else x)).relu()


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, downsample: nn.Module | None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu())).relu()
        y = self.bn3(self.conv3(y))
        return (y + (self.downsample(x) if self.downsample else x)).relu()


class ResNet(nn.Module):
    """torchvision's ResNet, same state-dict keys and shapes (torchvision is not installed here)."""

    def __init__(
        self, block: type[BasicBlock] | type[Bottleneck], depths: list[int], classes: int = 1000
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        for n, (width, depth) in enumerate(zip((64, 128, 256, 512), depths), 1):
            blocks: list[nn.Module] = []
            for b in range(depth):
                stride = 2 if b == 0 and n > 1 else 1
                down = None
                if b == 0 and (stride != 1 or cin != width * block.expansion):
                    down = nn.Sequential(
                        nn.Conv2d(cin, width * block.expansion, 1, stride, bias=False),
                        nn.BatchNorm2d(width * block.expansion),
                    )
                blocks.append(block(cin, width, stride, down))
                cin = width * block.expansion
            setattr(self, f"layer{n}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)
        # Kaiming-normal weights (torchvision's conv init; fc too, so every layer is random-normal).
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.bn1(self.conv1(x)).relu())
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


RESNETS = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet50": (Bottleneck, [3, 4, 6, 3])}


def resnet(name: str) -> ResNet:
    block, depths = RESNETS[name]
    torch.manual_seed(SEED)
    return ResNet(block, depths)


def resnet_checkpoint(name: str) -> Path:
    """benchmarks/_data/<name>.pt: the state dict of a seeded ResNet (torch.save, zip format)."""
    path = DATA / f"{name}.pt"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save(resnet(name).state_dict(), tmp)
        tmp.rename(path)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB)")
    return path


# --------------------------------------------------------------------------- a: ResNet-50 vs bare torch.load


def bench_resnet50(repeat: int) -> None:
    path = resnet_checkpoint("resnet50")
    rel = str(path.relative_to(ROOT))
    sd = torch.load(path)
    params = sum(t.numel() for t in sd.values() if t.is_floating_point())
    py = sys.executable
    wcond_label = "wcond inspect path -f json > /dev/null"
    one_thread_label = "OMP_NUM_THREADS=1 wcond inspect path -f json > /dev/null"
    runs = {
        "python -c 'import torch'": [py, "-c", "import torch"],
        "python -c 'import torch; torch.load(path)'": [
            py,
            "-c",
            f"import torch; torch.load({rel!r})",
        ],
        wcond_label: [*wcond_cmd(), "inspect", rel, "-f", "json"],
        one_thread_label: [*wcond_cmd(), "inspect", rel, "-f", "json"],
    }
    # What the second core buys.
    whole = time_processes(
        runs, repeat, envs={one_thread_label: dict(os.environ, OMP_NUM_THREADS="1")}
    )
    bare = whole["python -c 'import torch; torch.load(path)'"].median
    in_proc = {
        "torch.load(path)": time_call(lambda: torch.load(path), repeat),
        "wcond.open_checkpoint(path) (load only)": time_call(
            lambda: wcond.open_checkpoint(path), repeat
        ),
        "wcond.inspect(path)": time_call(lambda: wcond.inspect(path), repeat),
    }
    print(
        f"\n### ResNet-50-shaped fp32 checkpoint ({params / 1e6:.1f}M params, "
        f"{path.stat().st_size / 2**20:.0f} MiB, {len(sd)} tensors), {repeat} runs each\n"
    )
    rows = [
        [f"`{label}`", f"{t.median:.2f}", f"{t.min:.2f}", f"{t.median / bare:.2f}x"]
        for label, t in whole.items()
    ]
    rows += [
        [f"in process: `{label}`", f"{t.median:.3f}", f"{t.min:.3f}", ""]
        for label, t in in_proc.items()
    ]
    print(table(["whole process (s)", "median", "min", "vs bare load"], rows))
    ratio = whole[wcond_label].median / bare
    # Rounds ran back to back, so each round's ratio compares runs made under the same load.
    paired = statistics.median(
        w / b
        for w, b in zip(
            whole[wcond_label].runs, whole["python -c 'import torch; torch.load(path)'"].runs
        )
    )
    breakdown(path, repeat)
    print(
        f"\ntarget wcond <= 1.3x bare load: {ratio:.2f}x (median of per-round ratios "
        f"{paired:.2f}x) -> {'met' if ratio <= 1.3 else 'MISSED'}"
    )


_PHASES = """
import gc, sys, time, json
t0 = time.perf_counter()
gc.disable()  # as the CLI imports torch: the cycle collector paused, then torch's objects frozen
import torch
gc.enable()
gc.freeze()
t1 = time.perf_counter()
import wcond.cli, wcond.render
t2 = time.perf_counter()
ck = wcond.open_checkpoint(sys.argv[1])
t3 = time.perf_counter()
report = wcond.inspect(ck, device="cpu")
t4 = time.perf_counter()
text = wcond.render.json.to_json(report)
t5 = time.perf_counter()
print(json.dumps({"import torch": t1 - t0, "import wcond (CLI, beyond torch)": t2 - t1,
    "read (open_checkpoint: torch.load, mmap)": t3 - t2, "metrics (inspect)": t4 - t3,
    "render (JSON)": t5 - t4}))
"""


def breakdown(path: Path, repeat: int) -> None:
    """Where a whole `wcond inspect` process spends its time: phase by phase, in fresh processes."""
    runs: dict[str, list[float]] = {}
    start: list[float] = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        start.append(time.perf_counter() - t)
        done = subprocess.run(
            [sys.executable, "-c", _PHASES, str(path)], check=True, capture_output=True, text=True
        )
        for k, v in json.loads(done.stdout).items():
            runs.setdefault(k, []).append(v)
    rows = [["interpreter start and exit (`python -c pass`)", f"{statistics.median(start):.3f}"]]
    rows += [[k, f"{statistics.median(v):.3f}"] for k, v in runs.items()]
    print(f"\nphases of one inspect, fresh process each run, median of {repeat}:\n")
    print(table(["phase", "seconds"], rows))


# --------------------------------------------------------------------------- b: TinyLlama-shaped sharded fp16


def tinyllama_shapes() -> Iterator[tuple[str, tuple[int, ...]]]:
    """TinyLlama-1.1B's tensors in Hugging Face's order: (key, shape)."""
    vocab, hidden, layers, inter, heads, kv_heads = 32000, 2048, 22, 5632, 32, 4
    kv = hidden // heads * kv_heads  # 256: grouped-query attention
    yield "model.embed_tokens.weight", (vocab, hidden)
    for i in range(layers):
        p = f"model.layers.{i}."
        yield p + "self_attn.q_proj.weight", (hidden, hidden)
        yield p + "self_attn.k_proj.weight", (kv, hidden)
        yield p + "self_attn.v_proj.weight", (kv, hidden)
        yield p + "self_attn.o_proj.weight", (hidden, hidden)
        yield p + "mlp.gate_proj.weight", (inter, hidden)
        yield p + "mlp.up_proj.weight", (inter, hidden)
        yield p + "mlp.down_proj.weight", (hidden, inter)
        yield p + "input_layernorm.weight", (hidden,)
        yield p + "post_attention_layernorm.weight", (hidden,)
    yield "model.norm.weight", (hidden,)
    yield "lm_head.weight", (vocab, hidden)


def tinyllama_checkpoint(shard_bytes: int = 10**9) -> Path:
    """benchmarks/_data/tinyllama/: fp16 shards of at most ``shard_bytes`` plus the index, written last."""
    from safetensors.torch import save_file

    root = DATA / "tinyllama"
    index = root / "model.safetensors.index.json"
    if index.exists():
        return root
    root.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for key, shape in tinyllama_shapes():
        nbytes = math.prod(shape) * 2
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    gen = torch.Generator().manual_seed(SEED)
    weight_map, total = {}, 0
    t = time.perf_counter()
    for n, shard in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}  # one shard in memory at a time
        for key, shape in shard:
            if len(shape) == 1:  # RMSNorm gains: near 1
                tensors[key] = (1 + 0.05 * torch.randn(shape, generator=gen)).half()
            else:
                tensors[key] = (0.02 * torch.randn(shape, generator=gen)).half()
            weight_map[key] = name
            total += tensors[key].numel() * 2
        save_file(tensors, str(root / name), metadata={"format": "pt"})
        del tensors
        print(f"wrote {root / name} ({time.perf_counter() - t:.0f} s)", flush=True)
    index.write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    return root


def gram_shapes(shapes: Iterator[tuple[str, tuple[int, ...]]]) -> dict[tuple[int, int], int]:
    """The Grams inspect needs, as {(vectors, length): count}: rows (m, n) and columns (n, m) of each matrix."""
    need: dict[tuple[int, int], int] = {}
    for _, shape in shapes:
        if len(shape) < 2:
            continue
        m, n = shape[0], math.prod(shape[1:])
        for g in ((m, n), (shape[1], math.prod(shape) // shape[1])):
            need[g] = need.get(g, 0) + 1
    return need


def gemm_floor(
    need: dict[tuple[int, int], int], panel: int = 512, whole: bool = False
) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds, GFLOP): the upper triangles of the Grams alone, at GEMM speed.

    The rate is measured on each Gram's own shape at torch's full thread count: a panel of
    ``panel`` unit vectors times all N of them (the kernel a symmetric rank-k update runs). A
    triangle costs N^2 d / 2 multiply-adds (N vectors of length d), so the floor is
    sum count * N^2 d / rate: what a perfect SYRK at GEMM speed would take, with no reading, no
    normalization and no statistics. CPU seconds (all threads) are rated the same way; on a shared
    machine they move less with other people's load than wall seconds do.

    By default each rate is the best of two panels after a warm-up: a burst. With ``whole``, the
    panels are run for the whole volume (count * N / (2 * panel) of them per shape), so the floor
    is timed at the rate the machine sustains over a run as long as the command's.
    """
    wall = cpu = total_flop = 0.0
    for (n_vec, d), count in need.items():
        x = torch.nn.functional.normalize(torch.randn(n_vec, d), dim=1)
        rows = min(panel, n_vec)
        out = torch.empty(rows, n_vec)
        torch.matmul(x[:rows], x.T, out=out)  # warm-up
        flop = count * n_vec * n_vec * d  # 2 * (N^2 d / 2) per triangle
        panel_flop = 2 * rows * n_vec * d
        if whole:
            reps = max(1, round(flop / panel_flop))
            t, c = time.perf_counter(), time.process_time()
            for _ in range(reps):
                torch.matmul(x[:rows], x.T, out=out)
            best_wall, best_cpu = (time.perf_counter() - t) / reps, (time.process_time() - c) / reps
        else:
            best_wall = best_cpu = math.inf
            for _ in range(2):
                t, c = time.perf_counter(), time.process_time()
                torch.matmul(x[:rows], x.T, out=out)
                best_wall = min(best_wall, time.perf_counter() - t)
                best_cpu = min(best_cpu, time.process_time() - c)
        wall += flop / panel_flop * best_wall
        cpu += flop / panel_flop * best_cpu
        total_flop += flop
        del x, out
    return wall, cpu, total_flop / 1e9


def bench_tinyllama(layers: list[str]) -> None:
    root = tinyllama_checkpoint()
    out = DATA / "tinyllama_report.json"
    out.unlink(missing_ok=True)
    files = sorted(root.glob("*.safetensors"))
    shapes = [
        (k, s) for k, s in tinyllama_shapes() if not layers or any(fnmatch(k, p) for p in layers)
    ]
    params = sum(math.prod(s) for _, s in shapes)
    cmd = [*wcond_cmd(), "inspect", str(root.relative_to(ROOT)), "-f", "json"]
    cmd += ["-o", str(out.relative_to(ROOT)), "--device", "cpu"]
    for p in layers:
        cmd += ["--layers", p]
    need = gram_shapes(iter(shapes))
    # The floor before and after the command, so that a change of load during it shows.
    load0 = load_average()
    f_wall0, f_cpu0, gflop = gemm_floor(need)
    s_wall0, s_cpu0, _ = gemm_floor(need, whole=True)
    in_wall = in_cpu = math.nan
    if layers:  # a few layers: in process too, without interpreter start and imports
        import wcond

        t, c = time.perf_counter(), time.process_time()
        wcond.inspect(root, layers=layers, device="cpu")
        in_wall, in_cpu = time.perf_counter() - t, time.process_time() - c
    m = time_v(cmd)
    s_wall1, s_cpu1, _ = gemm_floor(need, whole=True)
    f_wall1, f_cpu1, _ = gemm_floor(need)
    load1 = load_average()
    report = json.loads(out.read_text())
    f_wall, f_cpu = (f_wall0 + f_wall1) / 2, (f_cpu0 + f_cpu1) / 2
    s_wall, s_cpu = (s_wall0 + s_wall1) / 2, (s_cpu0 + s_cpu1) / 2
    what = f"layers {' '.join(layers)}: " if layers else ""
    print(
        f"\n### TinyLlama-shaped fp16 checkpoint ({what}{params / 1e9:.3f}B params, {len(files)} "
        f"shards, {sum(f.stat().st_size for f in files) / 2**30:.2f} GiB), one run under /usr/bin/time -v\n"
    )
    label = " ".join(cmd[1:]).replace(sys.executable, "python")
    rows = [
        [
            f"`python {label}`",
            f"{m.wall_s:.1f}",
            f"{m.user_s:.0f} + {m.sys_s:.0f}",
            f"{m.max_rss_mb / 1024:.2f}",
            len(report["layers"]),
        ]
    ]
    print(table(["command", "wall (s)", "user + sys CPU (s)", "peak RSS (GiB)", "layers"], rows))
    print(
        f"\nGEMM floor ({gflop:.0f} GFLOP of Gram triangles at the float32 GEMM rate measured on "
        f"the same shapes, {torch.get_num_threads()} threads), before and after the command:\n"
        f"- from bursts (best of two panels per shape): wall {f_wall0:.1f} s, {f_wall1:.1f} s; "
        f"CPU {f_cpu0:.1f} s, {f_cpu1:.1f} s\n"
        f"- sustained (the whole volume of panels run): wall {s_wall0:.1f} s, {s_wall1:.1f} s; "
        f"CPU {s_cpu0:.1f} s, {s_cpu1:.1f} s\n"
        f"- load average {load0} -> {load1}"
    )
    cpu_s = m.user_s + m.sys_s
    for what, fw, fc in (("burst", f_wall, f_cpu), ("sustained", s_wall, s_cpu)):
        print(
            f"whole process / {what} floor: wall {m.wall_s / fw:.2f}x, CPU {cpu_s / fc:.2f}x "
            f"(CPU {cpu_s:.1f} s); target <= 1.25x: "
            f"{'met' if max(cpu_s / fc, m.wall_s / fw) <= 1.25 else 'MISSED'}"
        )
    if layers:
        print(
            f"in process, `wcond.inspect(root, layers=..., device='cpu')`: wall {in_wall:.1f} s, "
            f"CPU {in_cpu:.1f} s; / burst floor: wall {in_wall / f_wall:.2f}x, CPU "
            f"{in_cpu / f_cpu:.2f}x; / sustained floor: wall {in_wall / s_wall:.2f}x, CPU "
            f"{in_cpu / s_cpu:.2f}x"
        )


# --------------------------------------------------------------------------- c: one large embedding


def embedding_checkpoint() -> Path:
    from safetensors.torch import save_file

    path = DATA / "embedding_32000x4096.safetensors"
    if not path.exists():
        DATA.mkdir(parents=True, exist_ok=True)
        gen = torch.Generator().manual_seed(SEED)
        tmp = path.with_suffix(".tmp")
        save_file({"embed_tokens.weight": 0.02 * torch.randn(32000, 4096, generator=gen)}, str(tmp))
        tmp.rename(path)
        print(f"wrote {path}")
    return path


def bench_embedding() -> None:
    path = embedding_checkpoint()
    rel = str(path.relative_to(ROOT))
    # A bare load that also reads every value once (a lazily mapped file costs nothing until read).
    load = f"from safetensors.torch import load_file; float(load_file({rel!r})['embed_tokens.weight'].sum())"
    runs = {
        f'`python -c "{load}"` (bare load + one pass, for scale)': [sys.executable, "-c", load],
        f"`wcond inspect {rel} -f json > /dev/null`": [*wcond_cmd(), "inspect", rel, "-f", "json"],
    }
    n = 32000
    print(
        f"\n### 32000 x 4096 fp32 embedding ({path.stat().st_size / 2**20:.0f} MiB), "
        "one run each under /usr/bin/time -v\n"
    )
    rows = []
    for label, cmd in runs.items():
        m = time_v(cmd)
        rows.append(
            [label, f"{m.wall_s:.1f}", f"{m.user_s:.0f} + {m.sys_s:.0f}", f"{m.max_rss_mb:.0f}"]
        )
    print(table(["command", "wall (s)", "user + sys CPU (s)", "peak RSS (MiB)"], rows))
    print(f"\nthe full {n} x {n} fp32 cosine matrix alone would take {n * n * 4 / 2**20:.0f} MiB")


# --------------------------------------------------------------------------- d: WeightWatcher


def ensure_ww_venv() -> str:
    """benchmarks/_venv_ww with torch==2.13.0, weightwatcher and wcond (editable); its python."""
    py = VENV_WW / "bin" / "python"
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", str(VENV_WW)], check=True)
        pip = [str(py), "-m", "pip", "install", "-q"]
        # torch first and pinned again beside weightwatcher, so no other torch is pulled in.
        subprocess.run([*pip, "torch==2.13.0"], check=True)
        subprocess.run([*pip, "torch==2.13.0", "weightwatcher"], check=True)
        subprocess.run([*pip, "-e", str(ROOT), "--no-deps"], check=True)
        subprocess.run([*pip, "typer", "rich", "safetensors", "numpy"], check=True)
    return str(py)


def ww_analyze(path: Path) -> object:
    """What a WeightWatcher user runs: build the model, load the checkpoint, analyze()."""
    import weightwatcher as ww

    model = resnet("resnet18")
    model.load_state_dict(torch.load(path))
    return ww.WeightWatcher(model=model).analyze()


def ww_inner(path: Path, repeat: int) -> None:
    """Run inside the venv: in-process timings of both tools on the same loaded weights."""
    import weightwatcher as ww

    model = resnet("resnet18")
    model.load_state_dict(torch.load(path))
    sd = model.state_dict()
    details = ww.WeightWatcher(
        model=model
    ).analyze()  # the untimed warm-up calls, kept for their output
    report = wcond.inspect(sd)
    timings = {
        "ww.WeightWatcher(model=model).analyze()": time_call(
            lambda: ww.WeightWatcher(model=model).analyze(), repeat, 0
        ),
        "wcond.inspect(model.state_dict())": time_call(lambda: wcond.inspect(sd), repeat, 0),
        "wcond.inspect(path)": time_call(lambda: wcond.inspect(path), repeat),
    }
    print(
        json.dumps(
            {
                "ww_layers": len(details),
                "ww_columns": [c for c in details.columns],
                "wcond_layers": len(report.layers),
                "timings": {k: t.runs for k, t in timings.items()},
            }
        )
    )


def bench_weightwatcher(repeat: int) -> None:
    py = ensure_ww_venv()
    path = resnet_checkpoint("resnet18")
    rel = str(path.relative_to(ROOT))
    me = str(Path(__file__).relative_to(ROOT))
    versions = subprocess.run(
        [
            py,
            "-c",
            "import torch, weightwatcher, numpy; "
            "print(torch.__version__, weightwatcher.__version__, numpy.__version__)",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    whole = time_processes(
        {
            f"`python {me} ww-analyze {rel}` (build model, load, analyze())": [
                py,
                me,
                "ww-analyze",
                rel,
            ],
            f"`wcond inspect {rel} -f json > /dev/null`": [
                *wcond_cmd(py),
                "inspect",
                rel,
                "-f",
                "json",
            ],
        },
        repeat,
    )
    done = subprocess.run(
        [py, me, "ww-inner", rel, "--repeat", str(repeat)], capture_output=True, text=True
    )
    if done.returncode:
        sys.exit(f"in-process WeightWatcher run failed:\n{done.stderr[-3000:]}")
    inner = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"\n### WeightWatcher {versions[1]} vs wcond, ResNet-18-shaped fp32 checkpoint "
        f"(torch {versions[0]}, numpy {versions[2]}, both in benchmarks/_venv_ww), {repeat} runs each\n"
    )
    med = {k: sorted(v)[len(v) // 2] for k, v in inner["timings"].items()}
    rows = [[label, f"{t.median:.2f}", f"{t.min:.2f}"] for label, t in whole.items()]
    rows += [
        [f"in process: `{k}`", f"{med[k]:.3f}", f"{min(v):.3f}"]
        for k, v in inner["timings"].items()
    ]
    print(table(["run", "median (s)", "min (s)"], rows))
    w_whole, c_whole = (t.median for t in whole.values())
    w_in = med["ww.WeightWatcher(model=model).analyze()"]
    c_in = med["wcond.inspect(model.state_dict())"]
    print(
        f"\nratio WeightWatcher / wcond: whole process {w_whole / c_whole:.1f}x, "
        f"in process (analyze() vs inspect(state_dict)) {w_in / c_in:.1f}x"
    )
    print(f"layers analyzed: WeightWatcher {inner['ww_layers']}, wcond {inner['wcond_layers']}")
    print(f"WeightWatcher columns: {', '.join(inner['ww_columns'])}")


# --------------------------------------------------------------------------- main


def clean() -> None:
    """Delete the large generated checkpoints (the scripts regenerate them)."""
    for p in (
        DATA / "tinyllama",
        DATA / "embedding_32000x4096.safetensors",
        DATA / "tinyllama_report.json",
        DATA / "resnet50.pt",
        DATA / "resnet18.pt",
    ):
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "what",
        choices=[
            "resnet50",
            "tinyllama",
            "embedding",
            "weightwatcher",
            "all",
            "clean",
            "ww-analyze",
            "ww-inner",
        ],
    )
    ap.add_argument("path", nargs="?", help=argparse.SUPPRESS)  # for the ww-* children
    ap.add_argument(
        "--repeat", type=int, default=5, help="runs per timing (median and min reported)"
    )
    ap.add_argument(
        "--clean", action="store_true", help="delete the generated checkpoints afterwards"
    )
    ap.add_argument(
        "--layers",
        action="append",
        default=[],
        help="tinyllama: only these keys (glob, repeatable), with the floor of the same shapes",
    )
    args = ap.parse_args()
    if args.what == "ww-analyze":
        ww_analyze(Path(args.path))
        return
    if args.what == "ww-inner":
        ww_inner(Path(args.path), args.repeat)
        return
    if args.what == "clean":
        clean()
        return
    print(f"machine: {machine()}; load average at start {load_average()}")
    benches: dict[str, Callable[[], None]] = {
        "resnet50": lambda: bench_resnet50(args.repeat),
        "tinyllama": lambda: bench_tinyllama(args.layers),
        "embedding": bench_embedding,
        "weightwatcher": lambda: bench_weightwatcher(args.repeat),
    }
    for name, run in benches.items():
        if args.what in (name, "all"):
            run()
    print(f"\nload average at end {load_average()}")
    if args.clean:
        clean()


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
