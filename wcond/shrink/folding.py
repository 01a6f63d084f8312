"""Folding: removing positively parallel units along a chain of layers, a plain narrower state dict."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wcond import metrics
from wcond._version import __version__
from wcond.defaults import DEVICE, TAU_COS, TAU_EUC, ProgressFn
from wcond.device import resolve_device
from wcond.errors import CheckpointError, UsageError
from wcond.layers import is_layer
from wcond.load import Checkpoint, TensorInfo
from wcond.load_factorized import FOLD_MANIFEST_KEY, _spread
from wcond.save import output_format
from wcond.shrink.output import _formats, _nbytes, _open_source, _write, _written_bytes
from wcond.shrink.pairs import _compress, fuse_vectors
from wcond.shrink.report import LayerShrink, ShrinkReport
from wcond.shrink.sizing import file_bytes

__all__ = ["fold"]


def fold(
    source: str | Path,
    output: str | Path | None = None,
    *,
    chain: Sequence[str],
    tau_cos: float = TAU_COS,
    tau_euc: float = TAU_EUC,
    force: bool = False,
    device: str = DEVICE,
    progress: ProgressFn | None = None,
) -> ShrinkReport:
    """Remove positively parallel units along a chain of layers; write a plain, narrower state dict.

    ``chain`` lists weight keys in the order data flows; each layer must feed the next directly
    through a positively homogeneous, per-unit activation (ReLU, LeakyReLU; max or average pooling
    and eval-mode dropout are fine too): relu(k z) = k relu(z) for k > 0 is what makes this exact.
    Nothing that mixes or shifts units (BatchNorm, LayerNorm, residual sums) may sit between; wcond
    cannot see the model's forward, so it only refuses a BatchNorm of that width beside the layer.

    Where rows i, j of a layer, with the bias ``<key minus .weight>.bias`` appended, are positively
    near-parallel, [w_i, b_i] ~ k [w_j, b_j] with k > 0, unit i is removed and the next layer's
    column i is added to column j times k (least-squares fit for near-parallel units). Tensors keep
    their keys; the model class is rebuilt with the widths in ``report.widths``.

    Example:
        >>> report = fold("mlp.pt", "narrow.pt", chain=["fc1.weight", "fc2.weight", "fc3.weight"])
        >>> report.widths  # {"fc1.weight": [128, 121], "fc2.weight": [128, 126]}
    """
    chain = list(chain)
    if len(chain) < 2:
        raise UsageError(
            f"chain={chain!r}: needs at least two layer keys, in the order data flows",
            params=("chain",),
        )
    if len(set(chain)) != len(chain):
        raise UsageError(f"chain={chain!r}: names a layer twice", params=("chain",))
    ck, infos = _open_source(source, output, force)
    _check_chain(ck, infos, chain)
    dev = resolve_device(device)

    biases = [b for b in (_bias_key(k, infos) for k in chain[:-1]) if b]
    current: dict[str, Tensor] = {}
    for key in chain + biases:
        t = ck.get(key).to(dev)
        current[key] = t if t.dtype == torch.float64 else t.float()
    reports = {
        k: LayerShrink(k, list(infos[k].shape), list(infos[k].shape), params_before=infos[k].numel)
        for k in chain
    }
    widths: dict[str, list[int]] = {}
    manifest_layers: dict[str, dict[str, Any]] = {}
    total = len(chain) - 1
    for n, (a, b) in enumerate(zip(chain, chain[1:])):
        if progress:
            progress(n, total, a)
        rep = reports[a]
        rep.axes = ["rows"]
        bias = _bias_key(a, infos)
        w = current[a]
        rows = metrics.as_rows(w)
        ext = torch.cat([rows, current[bias][:, None]], dim=1) if bias else rows
        if not bool(torch.isfinite(ext).all()):
            raise CheckpointError(f"{ck.path}: {a!r} holds NaN/Inf values; cannot fold it")
        g = fuse_vectors(ext, tau_cos=tau_cos, tau_euc=tau_euc, positive=True)
        widths[a] = [w.shape[0], g.kept]
        if not g.fused:
            continue
        fused_ext = _compress(ext, g, 0)
        err = float((ext - _spread(fused_ext, g.index, g.coef, 0)).norm()) / float(
            ext.norm()
        )  # > 0: it had pairs
        current[a] = _compress(w, g, 0)
        if bias:
            current[bias] = _compress(current[bias], g, 0)
        current[b] = _compress(
            current[b], g, 1
        )  # next layer: column j gets sum_k coef_k * column k
        rep.fused_rows, rep.reconstruction_error, rep.max_angle_deg = g.fused, err, g.max_angle
        reports[b].fused_cols = g.fused
        reports[b].notes.append(
            f"input columns folded with {a}'s removed units (exact given those units)"
        )
        manifest_layers[a] = {
            "width_before": w.shape[0],
            "width_after": g.kept,
            "removed": g.removed,
            "kept": g.kept_indices,
        }
    if progress:
        progress(total, total, "")
    reports[chain[-1]].reconstruction_error = None  # its rows are the chain's outputs: never fused

    out_tensors = {k: t.to(infos[k].dtype).cpu() for k, t in current.items()}
    for k, rep in reports.items():
        rep.shape_after = list(out_tensors[k].shape)
        rep.params_after = out_tensors[k].numel()
        rep.changed = rep.shape_after != rep.shape_before
    params_before = sum(i.numel for i in infos.values())
    removed = sum(infos[k].numel - t.numel() for k, t in out_tensors.items())
    report = ShrinkReport(
        checkpoint=str(ck.path),
        output=str(output) if output is not None else None,
        mode="fold",
        settings={"tau_cos": tau_cos, "tau_euc": tau_euc, "chain": chain, "device": str(dev)},
        layers=list(reports.values()),
        params_before=params_before,
        params_after=params_before - removed,
        bytes_before=ck.num_bytes,
        bytes_after=ck.num_bytes
        - sum(_nbytes(infos[k]) - t.numel() * t.element_size() for k, t in out_tensors.items()),
        widths=widths,
        file_bytes_before=file_bytes(ck.files),
    )
    if output is not None:
        changed = {k: t for k, t in out_tensors.items() if t.shape != infos[k].shape}
        tensors = {key: changed[key] if key in changed else ck.get(key) for key in infos}
        manifest = {
            "format": 1,
            "wcond_version": __version__,
            "mode": "fold",
            "chain": chain,
            "settings": report.settings,
            "layers": manifest_layers,
        }
        entries = {FOLD_MANIFEST_KEY: json.dumps(manifest)}
        if output_format(output) == "torch" and not ck.wrapper:
            # In a bare state dict an extra entry would break model.load_state_dict(torch.load(OUT)).
            entries = {}
            report.warnings.append(
                f"{output}: a bare torch state dict has no place for the removed indices (they are in this report); "
                "write .safetensors to keep them in the file's metadata"
            )
        report.warnings += _write(ck, output, tensors, entries)
        report.file_bytes_after = _written_bytes(output)
        report.formats = _formats(ck, output)
    return report


def _bias_key(key: str, infos: Mapping[str, TensorInfo]) -> str | None:
    """``<module>.bias`` of a ``<module>.weight`` when it exists with one entry per output unit."""
    if not key.endswith(".weight"):
        return None
    bias = key.removesuffix(".weight") + ".bias"
    info = infos.get(bias)
    return bias if info is not None and info.shape == (infos[key].shape[0],) else None


def _parent(key: str) -> str:
    """The module holding a tensor's module: 'features' for 'features.1.running_mean', '' for 'bn1.weight'."""
    return key.rsplit(".", 2)[0] if key.count(".") >= 2 else ""


def _check_chain(ck: Checkpoint, infos: Mapping[str, TensorInfo], chain: Sequence[str]) -> None:
    for key in chain:
        if key not in infos:
            hint = f"; did you mean {key + '.weight'!r}?" if key + ".weight" in infos else ""
            raise UsageError(f"chain: {ck.path} has no tensor named {key!r}{hint}")
        if not is_layer(infos[key]):
            raise UsageError(
                f"chain: {key!r} (shape {list(infos[key].shape)}) is not a weight matrix or conv kernel"
            )
    for a, b in zip(chain, chain[1:]):
        out_a, in_b = infos[a].shape[0], infos[b].shape[1]
        if out_a != in_b:
            raise UsageError(
                f"chain: {b!r} reads {in_b} inputs but {a!r} produces {out_a} units; each layer must feed the next "
                "directly (no flatten, grouped conv or concatenation between)"
            )
        for k, info in infos.items():
            if (
                k.endswith((".running_mean", ".running_var"))
                and info.shape == (out_a,)
                and _parent(k) == _parent(a)
            ):
                raise UsageError(
                    f"chain: {k!r} looks like a BatchNorm on the {out_a} units of {a!r}; folding needs "
                    "each layer to feed the next through ReLU/LeakyReLU with nothing between. "
                    "Fold the BatchNorm into the layer first, or shrink without folding"
                )
