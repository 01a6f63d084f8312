"""Per-layer redundancy report of a checkpoint: the numbers behind `wcond inspect`.

Each value is computed by the function in :mod:`wcond.metrics` that defines it; this module
only walks the layers, keeps memory bounded (one layer at a time) and collects the results
into plain dataclasses.
"""

from __future__ import annotations

import concurrent.futures
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from wcond import metrics
from wcond.device import resolve_device
from wcond.errors import CheckpointError
from wcond.gates import Gate, GateResult, evaluate_gates
from wcond.layers import find_layers, is_layer, layer_kind
from wcond.load import Checkpoint, TensorInfo, open_checkpoint
from wcond.shrink import dense_view

__all__ = ["LayerReport", "Report", "Summary", "analyze_tensor", "inspect"]

ProgressFn = Callable[[int, int, str], None]

# Keys of LayerReport that hold one number each: the ones gates and diffs can name.
NUMERIC_FIELDS = (
    "acv_sum",
    "acv_mean",
    "acv_floor",
    "conv_similarity",
    "conv_similarity_norm",
    "conv_similarity_floor",
    "norm_loss",
    "norm_dev_max",
    "rare_rows",
    "rare_cols",
    "near_parallel_rows",
    "near_parallel_cols",
    "dead_rows",
    "dead_cols",
    "nonfinite",
    "params",
)


@dataclass
class LayerReport:
    """The diagnostics of one layer. ``None`` marks a value that does not apply (CS of a matrix)."""

    name: str
    kind: str
    shape: list[int]
    dtype: str
    params: int
    groups: int = 1
    acv_sum: float | None = None
    acv_mean: float | None = None
    acv_floor: float | None = None
    conv_similarity: float | None = None
    conv_similarity_norm: float | None = None
    conv_similarity_floor: float | None = None
    norm_loss: float | None = None
    norm_dev_max: float | None = None
    rare_rows: float | None = None
    rare_cols: float | None = None
    near_parallel_rows: int | None = None
    near_parallel_cols: int | None = None
    dead_rows: int = 0
    dead_cols: int = 0
    nonfinite: int = 0
    closest_rows: list[metrics.Pair] = field(default_factory=list)
    closest_cols: list[metrics.Pair] = field(default_factory=list)
    factorized: dict[str, int] | None = (
        None  # stored by `wcond shrink`: {"params_stored", "params_dense"}
    )
    notes: list[str] = field(default_factory=list)

    def value(self, metric: str) -> float | None:
        v = getattr(self, metric)
        return None if v is None else float(v)


@dataclass
class Summary:
    """Totals over the analyzed layers and the most redundant ones."""

    layers: int
    params: int
    tensors: int
    skipped_tensors: int
    acv_sum: float
    conv_similarity: float | None  # None when no conv layer was analyzed
    norm_loss: float
    near_parallel_rows: int
    near_parallel_cols: int
    dead_rows: int
    nonfinite_layers: int
    worst: dict[str, list[str]]


@dataclass
class Report:
    """What `wcond inspect` reports: settings, one LayerReport per layer, a Summary, gate verdicts."""

    checkpoint: str
    format: str
    wrapper: str | None
    settings: dict[str, Any]
    layers: list[LayerReport]
    summary: Summary
    gates: list[GateResult] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(not g.passed for g in self.gates)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; non-finite floats become None."""
        return _finite(asdict(self))


def analyze_tensor(
    name: str,
    w: torch.Tensor,
    *,
    groups: int = 1,
    tau_cos: float = 1e-4,
    tau_euc: float = 0.1,
    top: int = 3,
    device: torch.device | str = "cpu",
) -> LayerReport:
    """All diagnostics of one weight tensor of shape (out, in, *kernel)."""
    shape = list(w.shape)
    rep = LayerReport(
        name=name,
        kind=layer_kind(shape),
        shape=shape,
        dtype=str(w.dtype).removeprefix("torch."),
        params=w.numel(),
        groups=groups,
    )
    w = w.to(device=device)
    with torch.no_grad():
        w = metrics.as_float(w)  # fp16/bf16/fp8 upcast once, for rows, cols and CS alike
        lo, hi = torch.aminmax(w.reshape(-1))  # one pass: NaN and Inf show in lo or hi
        peak = max(-float(lo), float(hi))
        if not math.isfinite(peak):
            bad = int((~torch.isfinite(w)).sum())
            rep.nonfinite = bad
            rep.notes.append(f"{bad} NaN/Inf values: metrics not computed")
            return rep
        rows = metrics.pair_statistics(
            metrics.as_rows(w), tau_cos=tau_cos, tau_euc=tau_euc, top_k=top
        )
        cols = metrics.pair_statistics(
            metrics.as_cols(w), tau_cos=tau_cos, tau_euc=tau_euc, top_k=top
        )
        rep.dead_rows, rep.dead_cols = len(rows.dead), len(cols.dead)
        rep.acv_sum = float(rows.acv_sum)
        rep.acv_mean = rows.acv_mean
        rep.acv_floor = metrics.acv_floor(rows.live, math.prod(shape[1:]))
        rep.rare_rows = _opt(rows.rare)
        rep.rare_cols = _opt(cols.rare)
        rep.near_parallel_rows, rep.near_parallel_cols = rows.near_parallel, cols.near_parallel
        rep.closest_rows, rep.closest_cols = rows.closest, cols.closest
        # From the row norms the cosines already needed (float64 where float32 would overflow).
        assert rows.norms is not None
        rep.norm_loss = _overflow_note(
            float(metrics.norm_loss_of_norms(rows.norms)), "norm_loss", rep.notes
        )
        rep.norm_dev_max = _overflow_note(
            float(metrics.norm_dev_max_of_norms(rows.norms)), "norm_dev_max", rep.notes
        )
        if w.ndim >= 3:
            # CS and its floor are homogeneous of degree 4: taken on w / 2**e with max|w / 2**e| near
            # 1 and scaled back in float64, so 1e37-sized or subnormal weights neither overflow nor
            # underflow float32. Scaling by a power of two is exact, so for ordinary weights (used
            # unscaled) nothing changes.
            e = math.frexp(peak)[1] if peak and not 2.0**-16 <= peak <= 2.0**16 else 0
            ws = (
                w if e == 0 else w * 2.0 ** (-e // 2) * 2.0 ** (-e - (-e // 2))
            )  # each factor fits float32
            cs = float(metrics.conv_similarity(ws, groups=groups))
            pair_norms = float(metrics.pair_norm_products(ws, groups))
            rep.conv_similarity = _rescaled(cs, 4 * e, "conv_similarity", rep.notes)
            rep.conv_similarity_norm = cs / pair_norms if pair_norms else None
            rep.conv_similarity_floor = _rescaled(
                metrics.conv_similarity_floor(ws, groups=groups),
                4 * e,
                "conv_similarity_floor",
                rep.notes,
            )
        if rows.dead:
            n = len(rows.dead)
            rep.notes.append(f"{n} all-zero row{'s' if n > 1 else ''} (left out of cosine metrics)")
    return rep


def inspect(
    source: str | Path | Checkpoint | Mapping[str, torch.Tensor],
    *,
    layers: Sequence[str] = (),
    exclude: Sequence[str] = (),
    groups: Mapping[str, int] | None = None,
    tau_cos: float = 1e-4,
    tau_euc: float = 0.1,
    top: int = 3,
    device: str = "cpu",
    fail_if: Sequence[str | Gate] = (),
    progress: ProgressFn | None = None,
) -> Report:
    """Analyze every selected layer of a checkpoint (path, opened Checkpoint, or state dict).

    Args:
        layers, exclude: glob patterns on tensor keys.
        groups: conv groups by key or glob (a state dict does not record them).
        tau_cos, tau_euc: near-parallel thresholds (METRICS.md).
        top: how many closest pairs to list per layer and axis.
        device: "auto", "cpu", "cuda", "mps" or any torch device string.
        fail_if: gate expressions such as "acv_mean>0.5".
        progress: called as progress(bytes_done, bytes_total, key) while layers are read.

    Example:
        >>> report = wcond.inspect("model.safetensors", fail_if=["near_parallel_rows>0"])
        >>> [layer.name for layer in report.layers if layer.acv_mean > 0.2]
    """
    gates = [g if isinstance(g, Gate) else Gate.parse(g) for g in fail_if]
    dev = resolve_device(device)
    if isinstance(source, Mapping):
        infos = {
            k: TensorInfo(tuple(t.shape), t.dtype)
            for k, t in source.items()
            if isinstance(t, torch.Tensor)
        }
        get = source.__getitem__
        name, fmt, wrapper = "<state_dict>", "state_dict", None
    else:
        ck = source if isinstance(source, Checkpoint) else open_checkpoint(source)
        infos = {k: ck.info(k) for k in ck.keys()}
        get = ck.get
        name, fmt, wrapper = str(ck.path), ck.format, ".".join(ck.wrapper) or None
    infos, get, factored = dense_view(
        infos, get
    )  # a shrunk checkpoint: analyze the dense weights it stands for
    specs = find_layers(infos, layers, exclude, dict(groups or {}))
    if not specs:
        if any(is_layer(i) for i in infos.values()):
            raise CheckpointError(f"{name}: no layer matches the --layers/--exclude patterns")
        raise CheckpointError(
            f"{name}: no analyzable tensors (need floating-point tensors with 2 to 5 dims and at least 2 rows)"
        )
    total = sum(s.info.numel for s in specs)
    done = 0
    reports: list[LayerReport] = []
    with _Prefetcher(get, [s.key for s in specs]) as tensors, metrics.reuse_buffers():
        for spec, w in zip(specs, tensors):
            if progress:
                progress(done, total, spec.key)
            rep = analyze_tensor(
                spec.key,
                w,
                groups=spec.groups,
                tau_cos=tau_cos,
                tau_euc=tau_euc,
                top=top,
                device=dev,
            )
            del w  # at most two layers in memory: this one's and the next one's
            if spec.group_note:
                rep.notes.append(spec.group_note)
            if spec.key in factored:
                factored[spec.key].annotate(rep)
            reports.append(rep)
            done += spec.info.numel
    if progress:
        progress(total, total, "")
    report = Report(
        checkpoint=name,
        format=fmt,
        wrapper=wrapper,
        settings={
            "tau_cos": tau_cos,
            "tau_euc": tau_euc,
            "top": top,
            "device": str(dev),
            "layers": list(layers),
            "exclude": list(exclude),
            "groups": dict(groups or {}),
        },
        layers=reports,
        summary=_summarize(reports, len(infos)),
    )
    report.gates = evaluate_gates(gates, reports)
    return report


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


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj
