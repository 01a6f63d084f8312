"""Conditioning a checkpoint before training: Convolutional Similarity minimization as an iterative initialization.

The CS paper's Algorithm 1 (docs/METRICS.md, References): minimize the sum of CS over
the conv layers for I iterations, then train. The loss is :func:`wcond.metrics.conv_similarity`,
the same function `wcond inspect` reports with. Layers do not interact, so all of them step
together in one optimizer over float32 copies that are cast back to each tensor's dtype; every
other tensor is passed through untouched.

CS is homogeneous of degree 4, so part of any drop comes from smaller filters. Each layer's
result splits the drop into that part and the part from changed directions (the CS of the new
filters rescaled to their old norms), and ``keep_norm=True`` rescales every filter to its
original norm after each step (following the gradient projected onto each filter's sphere) so
that only directions and spectra change.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from wcond import metrics
from wcond.checkpoint.base import Checkpoint, TensorInfo, tensor_info
from wcond.checkpoint.module import module_view
from wcond.checkpoint.open import open_checkpoint
from wcond.defaults import DEVICE, ITERATIONS, LR, MAX_SEED, OPTIMIZER, OPTIMIZERS, ProgressFn
from wcond.engine import Engine, Task, open_on_worker, plan_tasks
from wcond.engine.device import resolve_device
from wcond.errors import CheckpointError, UsageError
from wcond.layers import LayerSpec, find_layers, is_fp8, is_layer

__all__ = ["InitCSResult", "LayerResult", "init_cs"]


_FP8 = (
    "FP8 weights: left unchanged (written back in 8 bits, a CS step would be rounded away; "
    "convert the layer to fp16/bf16/fp32 to condition it)"
)
_KEEP_NORM_1X1 = "1x1 kernel: its CS depends on the filter norms alone, which --keep-norm holds fixed; left unchanged"


@dataclass
class LayerResult:
    """What CS minimization did to one conv layer. Relative quantities are fractions (0.25 = 25%).

    ``cs_drop = drop_from_norms + drop_from_directions``: the directions part is the drop of
    ``cs_rescaled`` (the new filters rescaled to their old norms), the rest came from the norms.
    """

    name: str
    shape: list[int]
    dtype: str
    groups: int = 1
    optimized: bool = True
    cs_before: float | None = None
    cs_after: float | None = None
    cs_drop: float | None = None  # (before - after) / before
    cs_rescaled: float | None = None  # CS of the new filters, each rescaled to its norm before
    drop_from_norms: float | None = None  # (rescaled - after) / before
    drop_from_directions: float | None = None  # (before - rescaled) / before
    cs_norm_before: float | None = None
    cs_norm_after: float | None = None
    norm_before: float | None = None  # Frobenius norm of the layer
    norm_after: float | None = None
    norm_change: float | None = None  # after / before - 1
    max_abs_change: float | None = None  # largest |w_new - w_old| over the layer's entries
    cs_floor: float | None = None  # lowest CS reachable at the original filter norms (METRICS.md)
    floor_gap_closed: float | None = None  # keep_norm: (before - after) / (before - floor)
    notes: list[str] = field(default_factory=list)


@dataclass
class InitCSResult:
    """Settings, one LayerResult per selected conv layer, totals, and (optionally) the CS curve."""

    checkpoint: str
    format: str
    wrapper: str | None
    settings: dict[str, Any]
    layers: list[LayerResult]
    cs_before: float  # sum over the selected layers
    cs_after: float
    seconds: float  # wall time of the optimization loop
    # {"iteration": [0..I], "total": [...], "layers": {key: [...]}}: entry t is the float32 CS after t
    # steps, over the optimized layers only (a 1x1 kernel under keep_norm is not in it).
    history: dict[str, Any] | None = None

    @property
    def optimized(self) -> list[LayerResult]:
        return [r for r in self.layers if r.optimized]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (the per-iteration history is left out; see ``history``)."""
        doc = asdict(self)
        doc.pop("history")
        return doc


def init_cs(
    source: str | Path | Checkpoint | Mapping[str, torch.Tensor] | torch.nn.Module,
    *,
    iterations: int = ITERATIONS,
    lr: float = LR,
    optimizer: str = OPTIMIZER,
    device: str | torch.device = DEVICE,
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    groups: Mapping[str, int] | None = None,
    keep_norm: bool = False,
    seed: int | None = None,
    progress: ProgressFn | None = None,
    history: bool = False,
    engine: Engine | None = None,
) -> tuple[dict[str, torch.Tensor], InitCSResult]:
    """Minimize Convolutional Similarity over a checkpoint's conv layers (CS paper, Algorithm 1).

    Args:
        source: a checkpoint path, an opened Checkpoint, a state dict, or an ``nn.Module`` (read,
            never changed: load the returned tensors into it; its convs give their own groups).
        iterations, lr, optimizer: I optimizer steps of "adam" (the paper's) or "sgd" at this rate.
        device: "auto" (CUDA, then MPS, then CPU), "cpu", "cuda", "mps".
        layers, exclude: glob patterns on tensor keys; only conv kernels (ndim 3-5) are optimized.
        groups: conv groups by key or glob (a state dict does not record them; a module does).
        keep_norm: keep every filter's norm: the gradient is projected onto each filter's sphere and the
            filter rescaled to its original norm after each step; 1x1 kernels are then left unchanged.
        seed: seeds torch (inside a forked RNG state) for a reproducible run.
        progress: called as progress(steps_done, iterations, "CS <current total>") at every iteration.
        history: record the CS of every layer at every iteration in ``result.history``.
        engine: where the layers are optimized: None for this process, or a
            :class:`wcond.engine.RayEngine` whose tasks (a layer, or a group of small ones) read
            their tensors from the source's path; progress then counts finished tasks.

    Returns:
        Every tensor of the source by key in stored order (optimized conv weights replaced, in
        their original dtype and device; all others the very same tensor objects), and the result.

    Example:
        >>> tensors, result = wcond.init_cs(model.state_dict(), iterations=500, keep_norm=True)
        >>> model.load_state_dict(tensors)
    """
    if iterations < 1:
        raise UsageError(
            f"iterations={iterations}: needs at least 1 iteration", params=("iterations",)
        )
    if not (lr > 0 and math.isfinite(lr)):
        raise UsageError(f"lr={lr}: the learning rate must be a positive number", params=("lr",))
    if optimizer not in OPTIMIZERS:
        raise UsageError(
            f"optimizer={optimizer!r}: choose one of {', '.join(OPTIMIZERS)}",
            params=("optimizer",),
        )
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise UsageError(f"seed={seed}: torch seeds run from 0 to 2**64 - 1", params=("seed",))
    local = engine is None or engine.name == "local"
    # Here, an unusable device fails before anything is read; on an engine the workers resolve it.
    dev = resolve_device(device) if local else None
    known_groups: dict[str, int] = {}
    if isinstance(source, torch.nn.Module):
        view = module_view(source)
        tensors, known_groups = view.tensors, view.groups
        name, fmt, wrapper, path = view.name, "module", None, None
    elif isinstance(source, Mapping):
        tensors = {k: t for k, t in source.items() if isinstance(t, torch.Tensor)}
        name, fmt, wrapper, path = "<state_dict>", "state_dict", None, None
    else:
        ck = source if isinstance(source, Checkpoint) else open_checkpoint(source)
        tensors = dict(ck.items())
        name, fmt, wrapper = str(ck.path), ck.format, ".".join(ck.wrapper) or None
        path = str(Path(ck.path).resolve())
    selection: dict[str, Any] = {
        "layers": list(layers),
        "exclude": list(exclude),
        # A module's own conv groups come first: find_layers takes the first pattern that matches.
        "groups": {**known_groups, **(groups or {})},
    }
    specs = _conv_specs(name, {k: tensor_info(t) for k, t in tensors.items()}, **selection)
    options: dict[str, Any] = {
        "iterations": iterations,
        "lr": lr,
        "optimizer": optimizer,
        "keep_norm": keep_norm,
        "seed": seed,
    }
    start = time.perf_counter()
    if dev is not None:
        new, rows, curve = _condition(specs, tensors.__getitem__, dev, progress=progress, **options)
        device_used = str(dev)
    else:
        assert engine is not None  # dev is None only for an engine that is not local
        if path is None:
            raise UsageError(
                "an engine reads the checkpoint where its workers run: pass a path, not a state dict"
            )
        tasks = plan_tasks(path, [(s.key, s.info.numel) for s in specs])
        parts = engine.map(
            _init_cs_task,
            tasks,
            selection,
            {**options, "device": str(device)},
            gpu=str(device).startswith("cuda"),
            progress=progress,
        )
        new, rows, curve = _merge_parts(parts, [s.key for s in specs])
        device_used = str(device)
    seconds = time.perf_counter() - start

    out = dict(tensors)
    out.update(new)
    result = InitCSResult(
        checkpoint=name,
        format=fmt,
        wrapper=wrapper,
        settings={
            "iterations": iterations,
            "lr": lr,
            "optimizer": optimizer,
            "device": device_used,
            "engine": engine.name if engine is not None else "local",
            "keep_norm": keep_norm,
            "seed": seed,
            "layers": list(layers),
            "exclude": list(exclude),
            "groups": dict(groups or {}),
        },
        layers=[rows[s.key] for s in specs],
        cs_before=math.fsum(r.cs_before or 0.0 for r in rows.values()),
        cs_after=math.fsum(r.cs_after or 0.0 for r in rows.values()),
        seconds=seconds,
        history=curve if history else None,
    )
    return out, result


_Parts = tuple[dict[str, torch.Tensor], dict[str, "LayerResult"], "dict[str, Any] | None"]


def _condition(
    specs: Sequence[LayerSpec],
    get: Callable[[str], torch.Tensor],
    dev: torch.device,
    *,
    iterations: int,
    lr: float,
    optimizer: str,
    keep_norm: bool,
    seed: int | None,
    progress: ProgressFn | None = None,
) -> _Parts:
    """Minimize CS over these layers together: the one per-layer step of the local and engine paths.

    Returns the optimized tensors (stored dtype and device) by key, a LayerResult for every
    spec, and the CS curve (None when no layer could be optimized). Layers do not interact and
    Adam/SGD update each entry from its own gradient, so any split of the layers into groups
    gives the same tensors.
    """
    rows: dict[str, LayerResult] = {}
    batches: dict[tuple[tuple[int, ...], int], list[LayerSpec]] = {}
    olds: dict[str, torch.Tensor] = {}
    for spec in specs:
        w = olds[spec.key] = get(spec.key)
        row = LayerResult(spec.key, list(w.shape), str(w.dtype).removeprefix("torch."), spec.groups)
        if spec.group_note:
            row.notes.append(spec.group_note)
        rows[spec.key] = row
        if is_fp8(w.dtype):
            row.optimized = False
            row.notes.append(_FP8)
        elif not bool(torch.isfinite(w).all()):
            row.optimized = False
            row.notes.append("NaN/Inf values: left unchanged")
        elif keep_norm and math.prod(w.shape[2:]) == 1:
            row.optimized = False
            row.notes.append(_KEEP_NORM_1X1)
        else:  # same-shaped layers step as one batch: a few kernel launches instead of per layer
            batches.setdefault((tuple(w.shape), spec.groups), []).append(spec)
    work = [_Work.of(group, olds, dev) for group in batches.values()]
    # The layers left as they are keep their stored weights; their CS still counts in the total
    # the summary prints, so the progress bar shows the same total.
    for key, row in rows.items():
        if not row.optimized:
            _fill(row, olds[key], olds[key], keep_norm)
    fixed = math.fsum(row.cs_after or 0.0 for row in rows.values() if not row.optimized)
    curve = (
        _minimize(work, iterations, lr, optimizer, keep_norm, seed, progress, fixed)
        if work
        else None
    )
    if curve is not None:  # the history's layers in the checkpoint's order
        curve["layers"] = {k: curve["layers"][k] for k in rows if k in curve["layers"]}
    new = {key: item.result(n, like=olds[key]) for item in work for n, key in enumerate(item.keys)}
    for key, row in rows.items():
        if row.optimized:
            _fill(row, olds[key], new[key], keep_norm)
    return new, rows, curve


def _init_cs_task(task: Task, selection: dict[str, Any], options: dict[str, Any]) -> _Parts:
    """An engine task: reopen the checkpoint where the worker runs and condition the task's layers."""
    ck = open_checkpoint(open_on_worker(task.path))
    infos = {k: ck.info(k) for k in ck.keys()}
    by_key = {s.key: s for s in _conv_specs(str(ck.path), infos, **selection)}
    options = dict(options)
    dev = resolve_device(options.pop("device"))
    return _condition([by_key[k] for k in task.keys], ck.get, dev, **options)


def _merge_parts(parts: Sequence[_Parts], order: Sequence[str]) -> _Parts:
    """The tasks' tensors, rows and CS curves as one run's, layers in ``order`` (stored order)."""
    new: dict[str, torch.Tensor] = {}
    rows: dict[str, LayerResult] = {}
    layers: dict[str, list[float]] = {}
    iteration: list[int] = []
    for tensors, part_rows, curve in parts:
        new.update(tensors)
        rows.update(part_rows)
        if curve is not None:
            layers.update(curve["layers"])
            iteration = curve["iteration"]
    rows = {k: rows[k] for k in order}
    layers = {k: layers[k] for k in order if k in layers}
    if not layers:
        return new, rows, None
    total = [math.fsum(v[t] for v in layers.values()) for t in range(len(iteration))]
    return new, rows, {"iteration": iteration, "total": total, "layers": layers}


@dataclass
class _Work:
    """Same-shaped layers optimized together: float32 copies stacked channels-last, (L, out, *kernel, in)."""

    keys: list[str]
    groups: int
    param: torch.Tensor  # leaf tensor, (L, out, *kernel, in)
    target_norms: torch.Tensor  # per-filter norms of the originals, (L * out,), for keep_norm

    @classmethod
    def of(
        cls, specs: list[LayerSpec], tensors: Mapping[str, torch.Tensor], dev: torch.device
    ) -> _Work:
        # Channels last makes the (out, taps, in) view that metrics.conv_similarity's Gram path
        # multiplies contiguous: about twice as fast as the stored layout on CPU. torch.stack
        # copies, so the optimizer never writes into the caller's tensors.
        param = torch.stack(
            [
                tensors[s.key].detach().to(device=dev, dtype=torch.float32).movedim(1, -1)
                for s in specs
            ]
        ).contiguous()
        param.requires_grad_()
        return cls([s.key for s in specs], specs[0].groups, param, _filter_norms(param.detach()))

    @property
    def weight(self) -> torch.Tensor:
        """The parameter seen as (L, out, in, *kernel), sharing its storage."""
        return self.param.movedim(-1, 2)

    def loss(self) -> torch.Tensor:
        """The CS of each layer, (L,)."""
        return metrics.conv_similarity_batch(self.weight, groups=self.groups)

    def project_gradient(self) -> None:
        """Drop each filter's radial gradient component, leaving the part that turns it."""
        assert self.param.grad is not None
        filters = self.target_norms.shape[0]
        g = self.param.grad.reshape(filters, -1)
        w = self.param.detach().reshape(filters, -1)
        radial = (g * w).sum(1, keepdim=True) / (w * w).sum(1, keepdim=True).clamp_min(
            torch.finfo(w.dtype).tiny
        )
        g.sub_(radial * w)

    def restore_norms(self) -> None:
        current = _filter_norms(self.param)
        scale = torch.where(
            current > 0, self.target_norms / current.clamp_min(torch.finfo(current.dtype).tiny), 1.0
        )
        self.param.mul_(scale.view(*self.param.shape[:2], *[1] * (self.param.ndim - 2)))

    def result(self, n: int, like: torch.Tensor) -> torch.Tensor:
        """Layer n of the batch in ``like``'s dtype and device, stored contiguously."""
        return torch.empty_like(like, memory_format=torch.contiguous_format).copy_(
            self.weight[n].detach()
        )


def _filter_norms(w: torch.Tensor) -> torch.Tensor:
    """Norm of every filter of a (L, out, ...) batch, flattened to (L * out,)."""
    return w.reshape(w.shape[0] * w.shape[1], -1).norm(dim=1)


def _conv_specs(
    name: str,
    infos: dict[str, TensorInfo],
    layers: Sequence[str],
    exclude: Sequence[str],
    groups: Mapping[str, int] | None,
) -> list[LayerSpec]:
    """The selected conv kernels, or an error saying why there are none."""
    specs = [
        s for s in find_layers(infos, layers, exclude, dict(groups or {})) if len(s.info.shape) >= 3
    ]
    if specs:
        return specs
    convs = [k for k, i in infos.items() if is_layer(i) and len(i.shape) >= 3]
    if convs:
        listed = ", ".join(convs[:4]) + (", ..." if len(convs) > 4 else "")
        raise UsageError(
            f"{name}: no conv layer matches the patterns layers={list(layers)!r}, "
            f"exclude={list(exclude)!r} (conv weights here: {listed})",
            params=("layers", "exclude"),
        )
    raise CheckpointError(
        f"{name}: no conv weights to condition; init-cs works on Conv1d/2d/3d kernels of shape (out, in, *kernel), "
        "and this checkpoint holds none"
    )


def _make_optimizer(name: str, params: list[torch.Tensor], lr: float) -> torch.optim.Optimizer:
    cls = torch.optim.Adam if name == "adam" else torch.optim.SGD
    try:  # the fused kernels are several times faster; older torch lacks them on some devices
        return cls(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return cls(params, lr=lr)


def _minimize(
    work: list[_Work],
    iterations: int,
    lr: float,
    optimizer: str,
    keep_norm: bool,
    seed: int | None,
    progress: ProgressFn | None,
    fixed: float = 0.0,
) -> dict[str, Any]:
    """Run the optimizer; returns the CS curve (entry t: CS after t steps) per layer and in total.

    ``fixed`` is the CS of the layers left unchanged, added to the total that progress shows.

    The loop never waits for the device: each step's CS values go into a tensor on the device,
    read back every ``_SYNC_EVERY`` steps (every step on the CPU, where reading costs nothing) to
    report progress and stop a diverging run.
    """
    keys = [k for item in work for k in item.keys]
    dev = work[0].param.device
    every = 1 if dev.type == "cpu" else _SYNC_EVERY
    curve = torch.empty(iterations + 1, len(keys), device=dev)
    per_layer: list[list[float]] = []
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        opt = _make_optimizer(optimizer, [item.param for item in work], lr)
        for it in range(iterations + 1):
            opt.zero_grad(set_to_none=True)
            with torch.set_grad_enabled(it < iterations):
                terms = torch.cat([item.loss() for item in work])
            curve[it] = terms.detach()
            if it % every == 0 or it == iterations:
                _report(
                    curve, len(per_layer), it, per_layer, iterations, optimizer, lr, progress, fixed
                )
            if it == iterations:
                break
            terms.sum().backward()
            if keep_norm:
                # Riemannian step on each filter's sphere. The radial part of the gradient only
                # shrinks filters, which the rescaling undoes; left in, it dominates (the lag-0 part
                # of CS is n_i n_j) and Adam's per-coordinate scaling turns it into noise that does
                # not lower CS at all.
                with torch.no_grad():
                    for item in work:
                        item.project_gradient()
            opt.step()
            if keep_norm:
                with torch.no_grad():
                    for item in work:
                        item.restore_norms()
    return {
        "iteration": list(range(iterations + 1)),
        "total": [math.fsum(v) for v in per_layer],
        "layers": {key: [v[k] for v in per_layer] for k, key in enumerate(keys)},
    }


# Steps between reads of the CS values on an accelerator (each read waits for the device).
_SYNC_EVERY = 25


def _report(
    curve: torch.Tensor,
    first: int,
    last: int,
    per_layer: list[list[float]],
    iterations: int,
    optimizer: str,
    lr: float,
    progress: ProgressFn | None,
    fixed: float = 0.0,
) -> None:
    """Read steps first..last of the curve back, call progress for each (the total with the
    unchanged layers' ``fixed`` CS), stop at a non-finite CS."""
    for it, values in enumerate(curve[first : last + 1].cpu().tolist(), start=first):
        per_layer.append(values)
        total = math.fsum(values)
        if progress:
            progress(it, iterations, f"CS {total + fixed:.4g}")
        if not math.isfinite(total):
            raise UsageError(
                f"CS diverged to {total} at iteration {it} with optimizer={optimizer!r} "
                f"lr={lr}; lower lr= (CS is quartic in the weights, so plain SGD needs a "
                "small rate)",
                params=("optimizer", "lr"),
            )


def _fill(row: LayerResult, old: torch.Tensor, new: torch.Tensor, keep_norm: bool) -> None:
    """Before/after numbers of one layer, each from the wcond.metrics function that defines it.

    Computed on the stored tensors (FP8 upcast, as inspect reads it).
    """
    if is_fp8(old.dtype):
        old, new = old.float(), new.float()
    if not bool(torch.isfinite(old).all()):
        return
    g = row.groups
    with torch.no_grad():
        before, after = (
            float(metrics.conv_similarity(old, g)),
            float(metrics.conv_similarity(new, g)),
        )
        old_c, new_c = metrics.as_rows(old), metrics.as_rows(new)  # float32 or float64 copies
        old_n, new_n = old_c.norm(dim=1), new_c.norm(dim=1)
        rescaled = (
            new_c
            * torch.where(new_n > 0, old_n / new_n.clamp_min(torch.finfo(new_n.dtype).tiny), 1.0)[
                :, None
            ]
        )
        row.cs_before, row.cs_after = before, after
        row.cs_rescaled = float(metrics.conv_similarity(rescaled.reshape(new.shape), g))
        if before > 0:
            row.cs_drop = (before - after) / before
            row.drop_from_directions = (before - row.cs_rescaled) / before
            row.drop_from_norms = (row.cs_rescaled - after) / before
        row.cs_norm_before, row.cs_norm_after = _cs_norm(old, g), _cs_norm(new, g)
        row.norm_before, row.norm_after = float(old_c.norm()), float(new_c.norm())
        row.norm_change = row.norm_after / row.norm_before - 1 if row.norm_before else None
        row.max_abs_change = float((new_c - old_c).abs().max())
        row.cs_floor = metrics.conv_similarity_floor(old, g)
        if keep_norm and row.optimized and before > row.cs_floor:
            row.floor_gap_closed = (before - after) / (before - row.cs_floor)


def _cs_norm(w: torch.Tensor, groups: int) -> float | None:
    """conv_similarity_norm, or None where no pair of filters has non-zero norms."""
    value = float(metrics.conv_similarity_norm(w, groups))
    return value if math.isfinite(value) else None
