"""Per-layer redundancy report of a checkpoint: the numbers behind `wcond inspect`.

Each value is computed by the function in :mod:`wcond.metrics` that defines it; this module
only walks the layers, keeps memory bounded (one layer at a time) and collects the results
into plain dataclasses.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wcond import metrics
from wcond.checkpoint.base import Checkpoint, tensor_info
from wcond.checkpoint.factorized import dense_view
from wcond.checkpoint.module import module_view
from wcond.checkpoint.open import open_checkpoint
from wcond.defaults import DEVICE, TAU_COS, TAU_EUC, TOP, ProgressFn
from wcond.engine import Engine, Task, open_on_worker, plan_tasks
from wcond.engine.device import resolve_device
from wcond.errors import CheckpointError, UsageError, show_key
from wcond.gates import Gate, evaluate_gates
from wcond.layers import (
    LayerSpec,
    find_layers,
    is_fp8,
    is_layer,
    layer_kind,
    no_match_message,
    selected,
    skip_note,
)
from wcond.report import NUMERIC_FIELDS, LayerReport, Report, Summary, resolve_metric

# What inspect reads: a path (file, directory, DCP directory, Hub repo id), an opened
# Checkpoint, a state dict, or an nn.Module.
Source = str | Path | Checkpoint | Mapping[str, torch.Tensor] | torch.nn.Module

__all__ = [
    "NUMERIC_FIELDS",
    "LayerReport",
    "Report",
    "Summary",
    "analyze_tensor",
    "inspect",
    "inspect_many",
]


# Which fields each part of analyze_tensor fills, so that a caller asking for a few (the training
# monitor) pays only for those.
ROW_FIELDS = ("acv_sum", "acv_mean", "acv_floor", "rare_rows", "near_parallel_rows", "dead_rows")
COL_FIELDS = ("rare_cols", "near_parallel_cols", "dead_cols")
NORM_FIELDS = ("norm_loss", "norm_dev_max")
CONV_FIELDS = ("conv_similarity", "conv_similarity_norm", "conv_similarity_floor")


def analyze_tensor(
    name: str,
    w: torch.Tensor,
    *,
    groups: int = 1,
    tau_cos: float = TAU_COS,
    tau_euc: float = TAU_EUC,
    top: int = TOP,
    device: torch.device | str = DEVICE,
    fields: Collection[str] | None = None,
) -> LayerReport:
    """All diagnostics of one weight tensor of shape (out, in, *kernel).

    ``fields`` (names of NUMERIC_FIELDS) limits the work to what those need; the others stay None/0.
    """
    shape = list(w.shape)
    rep = LayerReport(
        name=name,
        kind=layer_kind(shape),
        shape=shape,
        dtype=str(w.dtype).removeprefix("torch."),
        params=w.numel(),
        groups=groups,
    )

    def wanted(part: tuple[str, ...]) -> bool:
        return fields is None or any(f in fields for f in part)

    w = w.to(device=resolve_device(device))
    if is_fp8(w.dtype):
        w = w.float()  # FP8 (e4m3fn, e5m2): few torch kernels take it; each value is exact in fp32
    with torch.no_grad():
        w = metrics.as_float(w)  # fp16/bf16/fp8 upcast once, for rows, cols and CS alike
        # The row norms the cosines need anyway are finite only if every entry is, so the entries
        # are searched one by one only when a norm is not (NaN, Inf, or squares beyond float32).
        row_vectors = metrics.as_rows(w)
        row_norms = metrics.vector_norms(row_vectors)
        peak = None if bool(torch.isfinite(row_norms).all()) else _peak(w)
        if peak is not None and not math.isfinite(peak):
            bad = int((~torch.isfinite(w)).sum())
            rep.nonfinite = bad
            rep.notes.append(f"{bad} NaN/Inf values: metrics not computed")
            return rep
        rows = None
        if wanted(ROW_FIELDS):
            rows = metrics.pair_statistics(
                row_vectors, tau_cos=tau_cos, tau_euc=tau_euc, top_k=top, norms=row_norms
            )
            rep.dead_rows = len(rows.dead)
            rep.acv_sum = float(rows.acv_sum)
            rep.acv_mean = rows.acv_mean
            rep.acv_floor = metrics.acv_floor(rows.live, math.prod(shape[1:]))
            rep.rare_rows = _opt(rows.rare)
            rep.near_parallel_rows = rows.near_parallel
            rep.closest_rows = rows.closest
        if wanted(COL_FIELDS):
            cols = metrics.pair_statistics(
                metrics.as_cols(w), tau_cos=tau_cos, tau_euc=tau_euc, top_k=top
            )
            rep.dead_cols = len(cols.dead)
            rep.rare_cols = _opt(cols.rare)
            rep.near_parallel_cols = cols.near_parallel
            rep.closest_cols = cols.closest
        if wanted(NORM_FIELDS) and rows is not None:
            # From the row norms the cosines already needed (float64 where float32 would overflow).
            assert rows.norms is not None
            rep.norm_loss = _overflow_note(
                float(metrics.norm_loss_of_norms(rows.norms)), "norm_loss", rep.notes
            )
            rep.norm_dev_max = _overflow_note(
                float(metrics.norm_dev_max_of_norms(rows.norms)), "norm_dev_max", rep.notes
            )
        elif wanted(NORM_FIELDS):  # asked for without the cosines (the monitor): the regularizer's
            rep.norm_loss = _overflow_note(float(metrics.norm_loss(w)), "norm_loss", rep.notes)
            rep.norm_dev_max = _overflow_note(
                float(metrics.norm_dev_max(w)), "norm_dev_max", rep.notes
            )
        if w.ndim >= 3 and wanted(CONV_FIELDS):
            # CS and its floor are homogeneous of degree 4: taken on w / 2**e with max|w / 2**e| near
            # 1 and scaled back in float64, so 1e37-sized or subnormal weights neither overflow nor
            # underflow float32. Scaling by a power of two is exact, so for ordinary weights (used
            # unscaled) nothing changes.
            peak = _peak(w) if peak is None else peak
            e = math.frexp(peak)[1] if peak and not 2.0**-16 <= peak <= 2.0**16 else 0
            ws = (
                w if e == 0 else w * 2.0 ** (-e // 2) * 2.0 ** (-e - (-e // 2))
            )  # each factor fits float32
            cs = float(metrics.conv_similarity(ws, groups=groups))
            energies = metrics.filter_energies(ws, groups)  # one pass for both norm terms
            pair_norms = float(metrics.pair_norm_products_of(energies))
            rep.conv_similarity = _rescaled(cs, 4 * e, "conv_similarity", rep.notes)
            rep.conv_similarity_norm = cs / pair_norms if pair_norms else None
            if fields is None or "conv_similarity_floor" in fields:
                rep.conv_similarity_floor = _rescaled(
                    metrics.conv_similarity_floor_of(energies, shape[2:]),
                    4 * e,
                    "conv_similarity_floor",
                    rep.notes,
                )
        if rows is not None and rows.dead:
            n = len(rows.dead)
            rep.notes.append(f"{n} all-zero row{'s' if n > 1 else ''} (left out of cosine metrics)")
    return rep


def _peak(w: torch.Tensor) -> float:
    """max |w| in one pass (NaN when w holds one); 0 for an empty tensor."""
    if not w.numel():
        return 0.0
    lo, hi = torch.aminmax(w.reshape(-1))
    return max(-float(lo), float(hi))


@dataclass
class _Plan:
    """What the driver knows about one checkpoint before any tensor is read."""

    name: str
    format: str
    wrapper: str | None
    path: str | None  # None for an in-memory state dict
    tensors: int
    specs: list[LayerSpec]
    get: Callable[[str], torch.Tensor]
    factored: dict[str, Any]
    skipped: dict[str, str]  # selected tensors that are not analyzed: why
    kinds: dict[str, str] = field(default_factory=dict)  # an nn.Module's layer kinds by key


def _plan(
    source: Source,
    layers: Sequence[str],
    exclude: Sequence[str],
    groups: Mapping[str, int] | None,
) -> _Plan:
    """Open a source (headers only for safetensors) and select its layers, or say why there are none."""
    path: str | None = None
    known_groups: dict[str, int] = {}
    kinds: dict[str, str] = {}
    module_name = None
    if isinstance(source, torch.nn.Module):
        view = module_view(source)
        source, known_groups, kinds, module_name = view.tensors, view.groups, view.kinds, view.name
    if isinstance(source, Mapping):
        infos = {k: tensor_info(t) for k, t in source.items() if isinstance(t, torch.Tensor)}
        get = source.__getitem__
        name, fmt = (module_name, "module") if module_name else ("<state_dict>", "state_dict")
        wrapper = None
    else:
        ck = source if isinstance(source, Checkpoint) else open_checkpoint(source)
        infos = {k: ck.info(k) for k in ck.keys()}
        get = ck.get
        name, fmt, wrapper = str(ck.path), ck.format, ".".join(ck.wrapper) or None
        path = str(Path(ck.path).resolve())
    # A shrunk checkpoint: analyze the dense weights it stands for.
    dense, get, factored = dense_view(infos, get, name)
    # A module's own conv groups come first: find_layers takes the first pattern that matches.
    specs = find_layers(dense, layers, exclude, {**known_groups, **(groups or {})})
    skipped = {
        k: note
        for k, i in dense.items()
        if (note := skip_note(i)) is not None and selected(k, layers, exclude)
    }
    if not specs:
        if any(is_layer(i) for i in dense.values()):
            raise CheckpointError(
                no_match_message(
                    name, [k for k, i in dense.items() if is_layer(i)], layers, exclude
                ),
                params=("layers", "exclude"),
            )
        why = ""
        if skipped:
            key, note = next(iter(skipped.items()))
            why = f"; {len(skipped)} skipped, e.g. {show_key(key)}: {note}"
        raise CheckpointError(
            f"{name}: no analyzable tensors (need dense floating-point tensors with 2 to 5 dims "
            f"and at least 2 rows){why}"
        )
    return _Plan(name, fmt, wrapper, path, len(dense), specs, get, factored, skipped, kinds)


def _given(w: torch.Tensor) -> Callable[[str], torch.Tensor]:
    """A getter that returns the tensor already read (by the prefetcher), whatever the key."""
    return lambda _key: w


def _analyze_spec(
    spec: LayerSpec,
    get: Callable[[str], torch.Tensor],
    factored: Mapping[str, Any],
    options: Mapping[str, Any],
) -> LayerReport:
    """The report of one selected layer: the one per-layer step of the local and the engine paths."""
    rep = analyze_tensor(spec.key, get(spec.key), groups=spec.groups, **options)
    if spec.group_note:
        rep.notes.append(spec.group_note)
    if spec.key in factored:
        factored[spec.key].annotate(rep)
    return rep


def _inspect_task(
    task: Task, selection: dict[str, Any], options: dict[str, Any]
) -> list[LayerReport]:
    """An engine task: reopen the checkpoint where the worker runs, and analyze the task's layers."""
    options = {**options, "device": resolve_device(options["device"])}
    plan = _plan(open_on_worker(task.path), **selection)
    by_key = {s.key: s for s in plan.specs}
    return [_analyze_spec(by_key[k], plan.get, plan.factored, options) for k in task.keys]


def inspect(
    source: Source,
    *,
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    groups: Mapping[str, int] | None = None,
    tau_cos: float = TAU_COS,
    tau_euc: float = TAU_EUC,
    top: int = TOP,
    device: str = DEVICE,
    fail_if: Sequence[str | Gate] = (),
    config: str | Path | None = None,
    progress: ProgressFn | None = None,
    engine: Engine | None = None,
) -> Report:
    """Analyze every selected layer of a checkpoint (path, opened Checkpoint, state dict, or module).

    Args:
        source: a checkpoint path (or Hugging Face repo id), an opened Checkpoint, a state dict, or
            an ``nn.Module`` (whose convs give their own groups and whose Conv/Linear/Embedding
            layers name their kind).
        layers, exclude: glob patterns on tensor keys.
        groups: conv groups by key or glob (a state dict does not record them; a module does).
        tau_cos, tau_euc: near-parallel thresholds (METRICS.md).
        top: how many closest pairs to list per layer and axis.
        device: "auto", "cpu", "cuda", "mps" or any torch device string.
        fail_if: gate expressions such as "acv_mean>0.5".
        config: the settings file these options were read from, recorded in ``settings``.
        progress: called as progress(done, total, key) while layers are read: parameters
            analyzed in this process, tasks finished on an engine.
        engine: where the layers are analyzed: None for this process, or a
            :class:`wcond.engine.RayEngine` (the source must then be a path its workers see).

    Example:
        >>> report = wcond.inspect("model.safetensors", fail_if=["near_parallel_rows>0"])
        >>> [layer.name for layer in report.layers if layer.acv_mean > 0.2]
    """
    return inspect_many(
        [source],
        layers=layers,
        exclude=exclude,
        groups=groups,
        tau_cos=tau_cos,
        tau_euc=tau_euc,
        top=top,
        device=device,
        fail_if=fail_if,
        config=config,
        progress=progress,
        engine=engine,
    )[0]


def inspect_many(
    sources: Sequence[Source],
    *,
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    groups: Mapping[str, int] | None = None,
    tau_cos: float = TAU_COS,
    tau_euc: float = TAU_EUC,
    top: int = TOP,
    device: str = DEVICE,
    fail_if: Sequence[str | Gate] = (),
    config: str | Path | None = None,
    progress: ProgressFn | None = None,
    engine: Engine | None = None,
) -> list[Report]:
    """:func:`inspect` of several checkpoints with the same settings: one Report each, in order.

    On an engine every checkpoint's tasks are submitted together, so a cluster works on all of
    them at once. Arguments as for :func:`inspect`.

    Example:
        >>> first, last = wcond.inspect_many(["run/step_1000.pt", "run/step_9000.pt"])
    """
    gates = [g if isinstance(g, Gate) else Gate.parse(g, resolve_metric) for g in fail_if]
    selection: dict[str, Any] = {"layers": layers, "exclude": exclude, "groups": groups}
    plans = [_plan(source, **selection) for source in sources]
    if engine is None or engine.name == "local":
        dev = resolve_device(device)
        options: dict[str, Any] = {
            "tau_cos": tau_cos,
            "tau_euc": tau_euc,
            "top": top,
            "device": dev,
        }
        per_plan = _analyze_here(plans, options, progress)
        device_used = str(dev)
    else:
        options = {"tau_cos": tau_cos, "tau_euc": tau_euc, "top": top, "device": device}
        per_plan = _analyze_on(engine, plans, selection, options, progress)
        device_used = str(device)
    reports = []
    for plan, layer_reports in zip(plans, per_plan):
        report = Report(
            checkpoint=plan.name,
            format=plan.format,
            wrapper=plan.wrapper,
            settings={
                "tau_cos": tau_cos,
                "tau_euc": tau_euc,
                "top": top,
                "device": device_used,
                "engine": engine.name if engine is not None else "local",
                "layers": list(layers),
                "exclude": list(exclude),
                "groups": dict(groups or {}),
                "config": None if config is None else str(config),
            },
            layers=layer_reports,
            summary=_summarize(layer_reports, plan.tensors),
        )
        report.summary.skipped = plan.skipped
        report.gates = evaluate_gates(gates, {r.name: r.numbers() for r in layer_reports})
        reports.append(report)
    return reports


def _analyze_here(
    plans: list[_Plan], options: dict[str, Any], progress: ProgressFn | None
) -> list[list[LayerReport]]:
    """Every layer in this process, one at a time (the next one read meanwhile); progress counts parameters."""
    total = sum(s.info.numel for plan in plans for s in plan.specs)
    done = 0
    out = []
    for plan in plans:
        reports = []
        prefetch = _Prefetcher(plan.get, [s.key for s in plan.specs])
        with prefetch as tensors, metrics.reuse_buffers():
            for spec, w in zip(plan.specs, tensors):
                if progress:
                    progress(done, total, spec.key)
                rep = _analyze_spec(spec, _given(w), plan.factored, options)
                rep.kind = plan.kinds.get(spec.key, rep.kind)
                reports.append(rep)
                del w  # at most two layers in memory: this one's and the next one's
                done += spec.info.numel
        out.append(reports)
    if progress:
        progress(total, total, "")
    return out


def _analyze_on(
    engine: Engine,
    plans: list[_Plan],
    selection: dict[str, Any],
    options: dict[str, Any],
    progress: ProgressFn | None,
) -> list[list[LayerReport]]:
    """Every checkpoint's layers as engine tasks, submitted together; progress counts tasks."""
    tasks: list[Task] = []
    owner: list[int] = []
    for i, plan in enumerate(plans):
        if plan.path is None:
            raise UsageError(
                "an engine reads the checkpoint where its workers run: pass a path, not a state dict"
            )
        planned = plan_tasks(plan.path, [(s.key, s.info.numel) for s in plan.specs])
        tasks += planned
        owner += [i] * len(planned)
    selection = {**selection, "groups": dict(selection["groups"] or {})}
    results = engine.map(
        _inspect_task,
        tasks,
        selection,
        options,
        gpu=str(options["device"]).startswith("cuda"),
        progress=progress,
    )
    # Tasks group small layers apart from large ones: put every report back in stored order.
    by_key: list[dict[str, LayerReport]] = [{} for _ in plans]
    for i, reports in zip(owner, results):
        by_key[i].update((r.name, r) for r in reports)
    return [[by_key[i][s.key] for s in plan.specs] for i, plan in enumerate(plans)]


class _Prefetcher:
    """Iterates get(key) over keys, reading the next tensor on a thread while the caller computes.

    torch's kernels release the GIL, so the read of layer k+1 (a safetensors copy, or page faults
    of a memory-mapped torch file, forced here one byte per page) overlaps the Grams of layer k.
    An error while reading is raised where that tensor is taken.
    """

    def __init__(self, get: Callable[[str], torch.Tensor], keys: Sequence[str]):
        self._get, self._keys = get, list(keys)
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wcond-read")

    def __enter__(self) -> Iterator[torch.Tensor]:
        return self._iterate()

    def __exit__(self, *exc: object) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def _read(self, key: str) -> torch.Tensor:
        t = self._get(key)
        if t.device.type == "cpu" and t.is_contiguous() and t.numel():
            # A memory-mapped tensor is read when first touched: touch each 4 KiB page now.
            t.reshape(-1).view(torch.uint8)[::4096].sum()
        return t

    def _iterate(self) -> Iterator[torch.Tensor]:
        if not self._keys:
            return
        pending = self._pool.submit(self._read, self._keys[0])
        for nxt in self._keys[1:]:
            current = pending.result()
            pending = self._pool.submit(self._read, nxt)
            yield current
            del current
        yield pending.result()


def _summarize(layers: list[LayerReport], tensors: int) -> Summary:
    def total(metric: str) -> float:
        return float(sum(getattr(r, metric) or 0 for r in layers))

    def worst(metric: str, largest: bool = True, n: int = 5) -> list[str]:
        have = [
            r
            for r in layers
            if getattr(r, metric) is not None and math.isfinite(getattr(r, metric))
        ]
        have.sort(key=lambda r: getattr(r, metric), reverse=largest)
        return [r.name for r in have[:n]]

    near = [r for r in layers if (r.near_parallel_rows or 0) + (r.near_parallel_cols or 0) > 0]
    near.sort(key=lambda r: (r.near_parallel_rows or 0) + (r.near_parallel_cols or 0), reverse=True)
    return Summary(
        layers=len(layers),
        params=sum(r.params for r in layers),
        tensors=tensors,
        skipped_tensors=tensors - len(layers),
        acv_sum=total("acv_sum"),
        conv_similarity=total("conv_similarity")
        if any(r.conv_similarity is not None for r in layers)
        else None,
        norm_loss=total("norm_loss"),
        near_parallel_rows=int(total("near_parallel_rows")),
        near_parallel_cols=int(total("near_parallel_cols")),
        dead_rows=int(total("dead_rows")),
        nonfinite_layers=sum(1 for r in layers if r.nonfinite),
        worst={
            "acv_mean": worst("acv_mean"),
            "conv_similarity_norm": worst("conv_similarity_norm"),
            "near_parallel": [r.name for r in near[:5]],
            "rare_rows": worst("rare_rows", largest=False),
            "norm_dev_max": worst("norm_dev_max"),
        },
    )


def _overflow_note(value: float, metric: str, notes: list[str]) -> float | None:
    """value, or None and a note where it overflowed float64."""
    if math.isfinite(value):
        return value
    notes.append(f"{metric} overflows float64 (weights too large): not reported")
    return None


def _rescaled(value: float, exponent: int, metric: str, notes: list[str]) -> float | None:
    """value * 2**exponent in float64, or None and a note where that overflows."""
    try:
        return math.ldexp(value, exponent)
    except OverflowError:
        notes.append(f"{metric} overflows float64 (weights too large): not reported")
        return None


def _opt(t: torch.Tensor | None) -> float | None:
    return None if t is None else float(t)
