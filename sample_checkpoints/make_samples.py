"""Write the four small sample checkpoints wcond's docs and tests use, into this directory.

Regenerate with::

    python sample_checkpoints/make_samples.py

Needs only torch and safetensors. Seeds are fixed, so a rerun writes a byte-identical
``mlp.safetensors`` and ``redundant_mlp.safetensors`` on any machine (init and plain Python
arithmetic only; the script checks this itself, and sorts the metadata keys because
safetensors 0.8 writes them in random order). The two pickles go through forward passes (and
``lightning_cnn.ckpt`` through training), whose float sums depend on the CPU's kernels: a rerun
on another machine or torch build gives tensors equal within rounding (up to ~6e-8 here), except
``lightning_cnn.ckpt``'s conv1 bias and bn1 running mean (up to ~6e-3: a bias right before
BatchNorm has no gradient but rounding noise, so Adam's normalised steps drift it), and other
bytes. tests/test_samples.py checks both.

small_cnn.pt
    ``torch.save(model.state_dict())`` (an OrderedDict) of a 2-D CNN for 3x8x8 inputs:
    conv1 Conv2d(3, 16, 3) -> bn1 BatchNorm2d(16) -> conv2 Conv2d(16, 32, 3) ->
    bn2 BatchNorm2d(32) -> conv3 Conv2d(32, 32, 1) -> fc Linear(32*4*4, 10).
    Default PyTorch init, then two planted redundancies:
      - conv1 filter 5 = 0.5 * conv1 filter 2 (bias too): rows 2 and 5 exactly parallel;
      - conv2 filter 7 = -conv2 filter 3 (bias too): rows 3 and 7 exactly anti-parallel.
    Three forward passes in train mode on seeded noise then give the BatchNorm layers
    non-trivial running stats and num_batches_tracked = 3 (int64 scalars).

mlp.safetensors
    A 64 -> 128 -> 128 -> 10 MLP (fc1, fc2, fc3; weights and biases, float32) with
    metadata {"format": "pt", "source": "wcond sample"}. Default init, then:
      - fc1 row 17 = 1.5 * fc1 row 4 + noise of relative size 1e-3 orthogonal to it:
        a near-parallel pair (1 - cos ~ 5e-7, D_euc ~ 6e-4, well inside tau_cos = 1e-4
        and tau_euc = 0.1) that is not exactly parallel (RaRe > 0);
      - fc2 row 33 and fc2 bias 33 set to 0: one dead row.

redundant_mlp.safetensors
    The sample on which ``wcond shrink`` pays: a 32 -> 64 -> 64 -> 10 MLP (fc1, fc2, fc3;
    float32, same metadata), default init, then near-parallel copies planted, not trained:
    16 of fc1's rows, 16 of fc2's rows and 16 of fc2's columns are each set to a copy of another
    row (column) of the same layer, scaled by +-0.5..2 (alternating sign), plus noise orthogonal
    to it of relative size 1e-5, 1e-4 or 1e-3 in turn (1 - |cos| up to ~5e-7, the angle up to
    ~0.06 deg; each copy's source is not itself a copy). A copied row's bias is the source's
    bias times the same scale. ``wcond shrink`` (defaults) fuses all 48 pairs, removing a third
    of the values, and writes a file about 28% smaller than this dense one; fc1's columns (the
    inputs) and fc3's rows (the outputs) hold none, as shrink protects them by default.

lightning_cnn.ckpt
    A PyTorch Lightning style checkpoint of a Conv1d model for 3-channel 1-D signals:
    conv1 Conv1d(3, 16, 5) -> bn1 BatchNorm1d(16) -> conv2 Conv1d(16, 16, 3) ->
    global average pool -> head Linear(16, 4), trained 120 Adam steps (lr 1e-3) on
    seeded noise. Keys: epoch, global_step, pytorch-lightning_version, state_dict
    (every key prefixed "model."), optimizer_states (one Adam state dict whose params
    0..7 are conv1.weight, conv1.bias, bn1.weight, bn1.bias, conv2.weight, conv2.bias,
    head.weight, head.bias, each with step = 120., exp_avg, exp_avg_sq), lr_schedulers
    (empty), hyper_parameters {"lr": 0.001, "width": 16}. After training, model.conv2
    filter 9 is set to 2.0 * filter 1 (weights only, not the bias): one exactly parallel
    pair of conv1d rows. Only plain containers, primitives and tensors, so it loads with
    ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import tempfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
SAFETENSORS_METADATA = {"format": "pt", "source": "wcond sample"}
# redundant_mlp.safetensors: near-parallel copies planted per layer and axis, and their noise
# (relative to the row), cycled: 1 - |cos| is about noise**2 / 2, all far inside TAU_COS = 1e-4.
PLANTED = 16
NOISE = (1e-5, 1e-4, 1e-3)


class SmallCNN(nn.Module):
    """Conv2d/BatchNorm2d stack with a 1x1 conv and a linear head, for 3x8x8 inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.bn2 = nn.BatchNorm2d(32)
        self.conv3 = nn.Conv2d(32, 32, 1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.relu(self.conv3(x))
        return self.fc(x.flatten(1))


class MLP(nn.Module):
    """64 -> 128 -> 128 -> 10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class WideMLP(nn.Module):
    """32 -> 64 -> 64 -> 10 with ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class SignalCNN(nn.Module):
    """Conv1d classifier for 3-channel signals of any length >= 7."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv1d(3, width, 5)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3)
        self.head = nn.Linear(width, 4)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=2))


def _detached(state: dict[str, Tensor]) -> OrderedDict[str, Tensor]:
    """Own, contiguous copies, so each tensor pickles with its own small storage."""
    return OrderedDict((k, v.detach().clone().contiguous()) for k, v in state.items())


def make_small_cnn() -> OrderedDict[str, Tensor]:
    torch.manual_seed(0)
    model = SmallCNN()
    with torch.no_grad():
        model.conv1.weight[5] = 0.5 * model.conv1.weight[2]
        model.conv1.bias[5] = 0.5 * model.conv1.bias[2]
        model.conv2.weight[7] = -model.conv2.weight[3]
        model.conv2.bias[7] = -model.conv2.bias[3]
        model.train()
        for _ in range(3):  # running stats and num_batches_tracked, as after a little training
            model(torch.randn(8, 3, 8, 8))
    return _detached(model.state_dict())


def _near_copy(row: Tensor, scale: float, relative: float, gen: torch.Generator) -> Tensor:
    """``scale * row`` plus noise of relative size ``relative`` orthogonal to it (float32).

    Reductions in plain Python (math.fsum), not torch: a BLAS dot product may sum in another
    order on another CPU, and these bytes should not depend on the machine.
    """
    base = [scale * x for x in row.double().tolist()]
    noise = torch.randn(len(base), generator=gen, dtype=torch.float64).tolist()
    along = math.fsum(n * b for n, b in zip(noise, base)) / math.fsum(b * b for b in base)
    noise = [n - along * b for n, b in zip(noise, base)]  # orthogonal to the row
    size = (
        relative
        * math.sqrt(math.fsum(b * b for b in base))
        / math.sqrt(math.fsum(n * n for n in noise))
    )
    return torch.tensor([b + size * n for b, n in zip(base, noise)], dtype=torch.float32)


def make_mlp() -> dict[str, Tensor]:
    torch.manual_seed(1)
    model = MLP()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        model.fc1.weight[17] = _near_copy(model.fc1.weight[4], 1.5, 1e-3, gen)
        model.fc2.weight[33] = 0.0
        model.fc2.bias[33] = 0.0
    return dict(_detached(model.state_dict()))


def make_redundant_mlp() -> dict[str, Tensor]:
    """The MLP of ``redundant_mlp.safetensors``: default init, then near-parallel copies planted."""
    torch.manual_seed(5)
    model = WideMLP()
    gen = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for layer, axis in ((model.fc1, 0), (model.fc2, 0), (model.fc2, 1)):
            w = layer.weight if axis == 0 else layer.weight.T  # a view: writes land in the weight
            order = torch.randperm(w.shape[0], generator=gen).tolist()
            sources, targets = order[:PLANTED], order[PLANTED : 2 * PLANTED]
            for i, (src, dst) in enumerate(zip(sources, targets)):
                magnitude = 0.5 + 1.5 * torch.rand((), generator=gen, dtype=torch.float64).item()
                scale = magnitude if i % 2 == 0 else -magnitude  # parallel and anti-parallel
                w[dst] = _near_copy(w[src], scale, NOISE[i % len(NOISE)], gen)
                if axis == 0:
                    layer.bias[dst] = scale * layer.bias[src]
    return dict(_detached(model.state_dict()))


def make_lightning_cnn() -> dict[str, object]:
    torch.manual_seed(3)
    width, lr, steps = 16, 1e-3, 120
    model = SignalCNN(width)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(32, 3, 24, generator=gen)
    y = torch.randint(0, 4, (32,), generator=gen)
    model.train()
    for step in range(steps):
        batch = slice(8 * (step % 4), 8 * (step % 4) + 8)
        loss = nn.functional.cross_entropy(model(x[batch]), y[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        model.conv2.weight[9] = 2.0 * model.conv2.weight[1]
    state = _detached({f"model.{k}": v for k, v in model.state_dict().items()})
    opt_state = opt.state_dict()
    opt_state = {
        "state": {i: dict(_detached(s)) for i, s in opt_state["state"].items()},
        "param_groups": [dict(g) for g in opt_state["param_groups"]],
    }
    return {
        "epoch": 3,
        "global_step": steps,
        "pytorch-lightning_version": "2.4.0",
        "state_dict": state,
        "optimizer_states": [opt_state],
        "lr_schedulers": [],
        "hyper_parameters": {"lr": lr, "width": width},
    }


# Every sample file, and the safetensors ones (byte-identical on every run) with their makers.
SAMPLES = ("small_cnn.pt", "mlp.safetensors", "redundant_mlp.safetensors", "lightning_cnn.ckpt")
SAFETENSORS_SAMPLES: dict[str, Callable[[], dict[str, Tensor]]] = {
    "mlp.safetensors": make_mlp,
    "redundant_mlp.safetensors": make_redundant_mlp,
}


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    """Write to a temp file beside ``path`` and rename, so a failed run leaves no half file.

    The temp file has the same name (in a temp folder) because torch.save names the zip
    archive's top folder after the file.
    """
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".tmp-") as tmp_dir:
        tmp = Path(tmp_dir) / path.name
        write(tmp)
        tmp.replace(path)


def save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    """safetensors.torch.save with its __metadata__ keys sorted, written via a temp file.

    safetensors 0.8 writes __metadata__ in Rust HashMap order, which changes from call to
    call (safetensors/safetensors#584), so two saves of the same tensors differ in bytes.
    Re-emitting the header JSON in the same compact form with sorted metadata keys (same
    length, same padding) makes the file canonical; the tensor entries are already sorted.
    """
    data = save(tensors, metadata=metadata)
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    if len(text) > n:
        raise SystemExit(f"re-serialized safetensors header grew from {n} to {len(text)} bytes")
    canonical = data[:8] + text + b" " * (n - len(text)) + data[8 + n :]
    _write_atomically(path, lambda tmp: tmp.write_bytes(canonical))
    with safe_open(str(path), framework="pt") as f:  # still a valid file with the same content
        if f.metadata() != metadata or sorted(f.keys()) != sorted(tensors):
            raise SystemExit(f"{path.name}: canonical header does not read back")
        for k in f.keys():
            if not torch.equal(f.get_tensor(k), tensors[k]):
                raise SystemExit(f"{path.name}: tensor {k} does not read back")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(out_dir: Path = HERE) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    small_cnn = make_small_cnn()
    _write_atomically(out_dir / "small_cnn.pt", lambda tmp: torch.save(small_cnn, tmp))
    save_safetensors(make_mlp(), out_dir / "mlp.safetensors", SAFETENSORS_METADATA)
    save_safetensors(
        make_redundant_mlp(), out_dir / "redundant_mlp.safetensors", SAFETENSORS_METADATA
    )
    lightning = make_lightning_cnn()
    _write_atomically(out_dir / "lightning_cnn.ckpt", lambda tmp: torch.save(lightning, tmp))

    # A second build must give the same safetensors bytes; otherwise the seeds leak somewhere.
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in SAFETENSORS_SAMPLES.items():
            again = Path(tmp) / name
            save_safetensors(make(), again, SAFETENSORS_METADATA)
            if _sha256(again) != _sha256(out_dir / name):
                raise SystemExit(f"{name} is not reproducible: two builds differ")

    for name in SAMPLES:
        path = out_dir / name
        if path.suffix != ".safetensors":
            torch.load(path, weights_only=True)  # the safe loader must accept every pickle here
        size = path.stat().st_size
        if size > 200_000:
            raise SystemExit(f"{name} is {size} bytes; samples must stay under 200 KB")
        print(f"{name:26s} {size:7d} bytes  sha256 {_sha256(path)[:16]}")


if __name__ == "__main__":
    main()
