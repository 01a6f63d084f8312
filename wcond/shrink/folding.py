"""Folding: removing positively parallel units along a chain of layers, a plain narrower state dict.

A *link* is one layer feeding the next through a positively homogeneous, per-unit path: an
optional BatchNorm (eval statistics), ReLU or LeakyReLU, per-channel pooling, eval-mode dropout,
and a flatten into a Linear. :func:`fold_links` folds links on plain tensors; :func:`fold` does it
for a checkpoint and a chain named on the command line, :func:`wcond.shrink.tracing.fold_model`
for a model whose links it finds by tracing.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from wcond import metrics
from wcond._version import __version__
from wcond.checkpoint.base import Checkpoint, TensorInfo
from wcond.checkpoint.factorized import FOLD_MANIFEST_KEY, spread
from wcond.checkpoint.target import output_format
from wcond.defaults import DEVICE, TAU_COS, TAU_EUC, ProgressFn
from wcond.engine.device import resolve_device
from wcond.errors import CheckpointError, UsageError
from wcond.layers import is_layer
from wcond.shrink.output import _formats, _open_source, _write, _written_bytes
from wcond.shrink.pairs import Grouping, compress, fuse_vectors
from wcond.shrink.report import LayerShrink, ShrinkReport
from wcond.shrink.sizing import file_bytes

__all__ = ["Link", "LinkResult", "fold", "fold_links"]


@dataclass(frozen=True)
class Link:
    """Layer ``weight`` feeding layer ``next``: the first's units can go, the second's columns fold.

    ``bn`` is the prefix of the BatchNorm on the first layer's output (its ``.weight``, ``.bias``,
    ``.running_mean`` and ``.running_var``), ``block`` how many inputs of ``next`` each unit feeds
    (a conv's channel flattened into a Linear: its H*W positions).
    """

    weight: str
    bias: str | None
    next: str
    bn: str | None = None
    bn_eps: float = 1e-5
    block: int = 1

    def keys(self) -> list[str]:
        """Every tensor key the link reads or rewrites."""
        bn = [self.bn + s for s in _BN_SUFFIXES] if self.bn else []
        return [self.weight, *([self.bias] if self.bias else []), *bn, self.next]


_BN_SUFFIXES = (".weight", ".bias", ".running_mean", ".running_var")


@dataclass
class LinkResult:
    """What folding one link did: the grouping of the first layer's units and the fit's error."""

    grouping: Grouping
    error: float | None  # |E - P E'|_F / |E|_F of the effective rows [w, b] (BN folded in)


def fold_links(
    tensors: dict[str, Tensor],
    links: Sequence[Link],
    *,
    tau_cos: float,
    tau_euc: float,
    source: str = "",
) -> dict[str, LinkResult]:
    """Fold each link in order, rewriting ``tensors`` (float32/float64) in place; results by weight key.

    A unit's *effective* row is its weight and bias with the BatchNorm folded in:
    s = gamma / sqrt(var + eps), w * s and (b - mu) * s + beta. Two units whose effective rows are
    positively near-parallel fuse (:func:`wcond.shrink.pairs.fuse_vectors`); the removed unit's
    entries leave the layer, its bias and every BN tensor, and the next layer's columns (or column
    block) fold as ``sum_k coef_k col_k``. The kept unit keeps its BN statistics: its weight is the
    fused effective row divided by s, and the BN's beta absorbs the fused bias.
    """
    results: dict[str, LinkResult] = {}
    for link in links:
        w = tensors[link.weight]
        rows = metrics.as_rows(w)
        n = rows.shape[0]
        b = tensors[link.bias] if link.bias else rows.new_zeros(n)
        if link.bn:
            gamma, beta, mu, var = (tensors[link.bn + s] for s in _BN_SUFFIXES)
            scale = gamma / torch.sqrt(var + link.bn_eps)
            eff_w, eff_b = rows * scale[:, None], (b - mu) * scale + beta
        else:
            scale = None
            eff_w, eff_b = rows, b
        ext = torch.cat([eff_w, eff_b[:, None]], dim=1)
        if not bool(torch.isfinite(ext).all()):
            raise CheckpointError(f"{source}{link.weight!r} holds NaN/Inf values; cannot fold it")
        if scale is not None:
            # a unit the BN scales by 0 cannot be rebuilt from a fused row: never fuse it
            ext = torch.where((scale == 0)[:, None], torch.zeros_like(ext), ext)
        g = fuse_vectors(ext, tau_cos=tau_cos, tau_euc=tau_euc, positive=True)
        if not g.fused:
            results[link.weight] = LinkResult(g, 0.0)
            continue
        fused = compress(ext, g, 0)
        err = float((ext - spread(fused, g.index, g.coef, 0)).norm()) / float(ext.norm())
        kept = torch.tensor(g.kept_indices, device=w.device)
        fw, fb = fused[:, :-1], fused[:, -1]
        if scale is not None and link.bn:
            s_k = scale[kept]
            tensors[link.weight] = (fw / s_k[:, None]).reshape(g.kept, *w.shape[1:])
            b_k = b[kept]
            if link.bias:
                tensors[link.bias] = b_k
            for suffix in (".weight", ".running_mean", ".running_var"):
                tensors[link.bn + suffix] = tensors[link.bn + suffix][kept]
            tensors[link.bn + ".bias"] = fb - (b_k - mu[kept]) * s_k
        else:
            tensors[link.weight] = fw.reshape(g.kept, *w.shape[1:])
            if link.bias:
                tensors[link.bias] = fb
        nxt = tensors[link.next]
        if link.block > 1:  # a flattened conv: each unit owns a block of the next layer's columns
            blocks = nxt.reshape(nxt.shape[0], n, link.block, *nxt.shape[2:])
            tensors[link.next] = compress(blocks, g, 1).reshape(
                nxt.shape[0], g.kept * link.block, *nxt.shape[2:]
            )
        else:
            tensors[link.next] = compress(nxt, g, 1)
        results[link.weight] = LinkResult(g, err)
    return results


def fold(
    source: str | Path,
    output: str | Path | None = None,
    *,
    chain: Sequence[str],
    tau_cos: float = TAU_COS,
    tau_euc: float = TAU_EUC,
    bn_eps: float = 1e-5,
    force: bool = False,
    device: str = DEVICE,
    progress: ProgressFn | None = None,
) -> ShrinkReport:
    """Remove positively parallel units along a chain of layers; write a plain, narrower state dict.

    ``chain`` names the layers in the order data flows, by module (``net.0``) or weight key
    (``net.0.weight``), with a BatchNorm that normalizes a layer's output named right after it
    (``conv1,bn1,conv2,bn2,fc``). Each layer must feed the next through a positively homogeneous,
    per-unit path: that BatchNorm (eval statistics), ReLU or LeakyReLU, per-channel max or average
    pooling, eval-mode dropout, and for a conv feeding a Linear a flatten. relu(k z) = k relu(z)
    for k > 0 is what makes this exact. wcond cannot see the model's forward from a checkpoint
    (:func:`wcond.fold` can): it refuses a BatchNorm of a layer's width beside it that the chain
    does not name, and a next layer whose inputs do not match.

    Where the effective rows (BN folded in, bias appended) of units i, j are positively
    near-parallel, unit i is removed and the next layer's column i is added to column j times k
    (least-squares fit for near-parallel units). Tensors keep their keys; build the model with
    the widths in ``report.widths``. ``report.resolved`` says which tensors each name stood for.

    Example:
        >>> report = fold("mlp.pt", "narrow.pt", chain=["fc1", "fc2", "fc3"])
        >>> report.widths  # {"fc1.weight": [128, 121], "fc2.weight": [128, 126]}
    """
    ck, infos = _open_source(source, output, force)
    links, layers, resolved = _plan(ck, infos, list(chain), bn_eps)
    dev = resolve_device(device)
    current: dict[str, Tensor] = {}
    for link in links:
        for key in link.keys():
            if key not in current:
                t = ck.get(key).to(dev)
                current[key] = t if t.dtype == torch.float64 else t.float()
    reports = {
        k: LayerShrink(k, list(infos[k].shape), list(infos[k].shape), params_before=infos[k].numel)
        for k in layers
    }
    if progress:
        progress(0, 1, layers[0])
    results = fold_links(current, links, tau_cos=tau_cos, tau_euc=tau_euc, source=f"{ck.path}: ")
    if progress:
        progress(1, 1, "")
    widths: dict[str, list[int]] = {}
    manifest_layers: dict[str, dict[str, Any]] = {}
    for link in links:
        g, rep = results[link.weight].grouping, reports[link.weight]
        rep.axes = ["rows"]
        widths[link.weight] = [g.index.numel(), g.kept]
        if not g.fused:
            continue
        rep.fused_rows, rep.max_angle_deg = g.fused, g.max_angle
        rep.reconstruction_error = results[link.weight].error
        reports[link.next].fused_cols = g.fused * link.block
        reports[link.next].notes.append(
            f"input columns folded with {link.weight}'s removed units (exact given those units)"
        )
        if link.bn:
            rep.notes.append(f"BatchNorm {link.bn} folded in: its removed units' entries went too")
        manifest_layers[link.weight] = {
            "width_before": g.index.numel(),
            "width_after": g.kept,
            "removed": g.removed,
            "kept": g.kept_indices,
        }
    reports[layers[-1]].reconstruction_error = None  # its rows are the chain's outputs: never fused

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
        settings={"tau_cos": tau_cos, "tau_euc": tau_euc, "chain": layers, "device": str(dev)},
        layers=list(reports.values()),
        params_before=params_before,
        params_after=params_before - removed,
        bytes_before=ck.num_bytes,
        bytes_after=ck.num_bytes
        - sum(
            infos[k].numel * infos[k].dtype.itemsize - t.numel() * t.element_size()
            for k, t in out_tensors.items()
        ),
        widths=widths,
        resolved=resolved,
        file_bytes_before=file_bytes(ck.files),
    )
    if output is not None:
        changed = {k: t for k, t in out_tensors.items() if t.shape != infos[k].shape}
        tensors = {key: changed[key] if key in changed else ck.get(key) for key in infos}
        manifest = {
            "format": 1,
            "wcond_version": __version__,
            "mode": "fold",
            "chain": layers,
            "settings": report.settings,
            "layers": manifest_layers,
        }
        entries = {FOLD_MANIFEST_KEY: json.dumps(manifest)}
        if output_format(output) == "torch" and not ck.wrapper:
            # In a bare state dict an extra entry would break model.load_state_dict(torch.load(OUT)).
            entries = {}
            report.warnings.append(
                f"{output}: a bare torch state dict has no place for the removed indices (they "
                "are in this report); write .safetensors to keep them in the file's metadata"
            )
        report.warnings += _write(ck, output, tensors, entries)
        report.file_bytes_after = _written_bytes(output)
        report.formats = _formats(ck, output)
    return report


def _plan(
    ck: Checkpoint, infos: Mapping[str, TensorInfo], chain: list[str], bn_eps: float
) -> tuple[list[Link], list[str], dict[str, list[str]]]:
    """The links a chain names, its layers' weight keys, and the tensors each name resolved to."""
    if len(set(chain)) != len(chain):
        raise UsageError(f"chain={chain!r}: names a layer twice", params=("chain",))
    resolved: dict[str, list[str]] = {}
    steps: list[tuple[str, str]] = []  # ("layer", weight key) or ("bn", module prefix)
    for item in chain:
        kind, name = _resolve(ck, infos, item)
        steps.append((kind, name))
        if kind == "layer":
            bias = _bias_key(name, infos)
            resolved[item] = [name, *([bias] if bias else [])]
        else:
            resolved[item] = [name + s for s in _BN_SUFFIXES]
    layers = [name for kind, name in steps if kind == "layer"]
    if len(layers) < 2:
        raise UsageError(
            f"chain={chain!r}: needs at least two layers, in the order data flows",
            params=("chain",),
        )
    if steps[0][0] == "bn":
        raise UsageError(f"chain: BatchNorm {steps[0][1]!r} comes first; name it after its layer")
    links: list[Link] = []
    for n, (kind, name) in enumerate(steps):
        if kind != "layer" or name == layers[-1]:
            continue
        bn = steps[n + 1][1] if steps[n + 1][0] == "bn" else None
        nxt = next(nm for k, nm in steps[n + 1 :] if k == "layer")
        named_bns = {nm for k, nm in steps if k == "bn"}
        links.append(_link(ck, infos, name, bn, nxt, bn_eps, named_bns))
    return links, layers, resolved


def _resolve(ck: Checkpoint, infos: Mapping[str, TensorInfo], item: str) -> tuple[str, str]:
    """A chain entry as ("layer", weight key) or ("bn", module prefix); module names or keys."""
    if item in infos:
        if is_layer(infos[item]):
            return "layer", item
        raise UsageError(
            f"chain: {item!r} (shape {list(infos[item].shape)}) is not a weight matrix or conv kernel"
        )
    if all(item + s in infos for s in _BN_SUFFIXES):
        return "bn", item
    if item + ".weight" in infos and is_layer(infos[item + ".weight"]):
        return "layer", item + ".weight"
    close = [k for k in infos if k.startswith(item)][:4]
    hint = f"; it holds {', '.join(map(repr, close))}" if close else ""
    raise UsageError(f"chain: {ck.path} has no layer or BatchNorm named {item!r}{hint}")


def _link(
    ck: Checkpoint,
    infos: Mapping[str, TensorInfo],
    a: str,
    bn: str | None,
    b: str,
    bn_eps: float,
    named_bns: set[str],
) -> Link:
    """Check that layer ``a`` (with BatchNorm ``bn``) can feed layer ``b``; the link between them."""
    out_a, shape_b = infos[a].shape[0], infos[b].shape
    block = 1
    if shape_b[1] != out_a:
        if len(infos[a].shape) >= 3 and len(shape_b) == 2 and shape_b[1] % out_a == 0:
            block = shape_b[1] // out_a  # a conv's channels flattened into a Linear
        else:
            raise UsageError(
                f"chain: {b!r} reads {shape_b[1]} inputs but {a!r} produces {out_a} units; each "
                "layer must feed the next directly (a flatten from a conv into a Linear is fine; "
                "no grouped conv or concatenation between)"
            )
    if bn is not None:
        bad = [bn + s for s in _BN_SUFFIXES if infos[bn + s].shape != (out_a,)]
        if bad:
            raise UsageError(f"chain: BatchNorm {bn!r} does not have {out_a} units like {a!r}")
    else:
        for k, info in infos.items():
            if (
                k.endswith(".running_mean")
                and info.shape == (out_a,)
                and _parent(k) == _parent(a)
                and k.removesuffix(".running_mean") not in named_bns
            ):
                name = k.removesuffix(".running_mean")
                raise UsageError(
                    f"chain: {name!r} looks like a BatchNorm on the {out_a} units of {a!r}; name it "
                    f"in the chain right after the layer if it normalizes that layer's output"
                )
    return Link(a, _bias_key(a, infos), b, bn, bn_eps, block)


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
