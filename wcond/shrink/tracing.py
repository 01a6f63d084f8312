"""Folding a whole model: find its foldable links by tracing (torch.fx), fold them, narrow the modules.

A link is found where a Conv or Linear's output reaches the next Conv or Linear through nothing
but, in this order, an optional BatchNorm, ReLU/LeakyReLU, per-channel pooling, eval-mode
dropout and a flatten, each used once. Everything else (a residual sum, a concatenation, a
normalisation over units, attention, an activation that is not positively homogeneous, a
module called twice) is left alone, and the report says which and why.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import operator
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wcond.checkpoint.factorized import load_state_dict
from wcond.checkpoint.target import check_output
from wcond.checkpoint.write import save_checkpoint
from wcond.defaults import TAU_COS, TAU_EUC
from wcond.errors import CheckpointError, UsageError
from wcond.shrink.folding import Link, fold_links
from wcond.shrink.output import _written_bytes
from wcond.shrink.report import FoldReport, LayerShrink
from wcond.shrink.sizing import file_bytes

__all__ = ["fold", "fold_checkpoint", "fold_model", "import_factory"]

_WIDTH_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "num_features")
_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU)
_ACTIVATION_FNS: tuple[Callable[..., Any], ...] = (F.relu, torch.relu, F.leaky_relu)
# Per-channel and positively homogeneous: p(k x) = k p(x) for k > 0, channel by channel.
_PASSTHROUGH = (
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AdaptiveMaxPool3d,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.Identity,
)
_PASSTHROUGH_FNS: tuple[Callable[..., Any], ...] = (
    F.max_pool1d,
    F.max_pool2d,
    F.max_pool3d,
    F.avg_pool1d,
    F.avg_pool2d,
    F.avg_pool3d,
    F.adaptive_avg_pool1d,
    F.adaptive_avg_pool2d,
    F.adaptive_avg_pool3d,
    F.dropout,
)
_NAMED_FNS: dict[Any, str] = {
    operator.add: "an addition (a residual sum)",
    torch.add: "an addition (a residual sum)",
    operator.iadd: "an addition (a residual sum)",
    torch.cat: "a concatenation",
    torch.concat: "a concatenation",
    torch.stack: "a stack",
    operator.mul: "a product",
    torch.mul: "a product",
    operator.matmul: "a matrix product (attention?)",
    torch.matmul: "a matrix product (attention?)",
    torch.bmm: "a matrix product (attention?)",
    F.softmax: "a softmax (attention?)",
    F.scaled_dot_product_attention: "attention",
    F.layer_norm: "a normalisation over units",
    F.group_norm: "a normalisation over units",
}


def fold_model(
    model: nn.Module,
    example_input: Tensor | tuple[Tensor, ...] | None = None,
    *,
    tau_cos: float = TAU_COS,
    tau_euc: float = TAU_EUC,
) -> tuple[nn.Module, FoldReport]:
    """A narrower copy of ``model`` that computes the same function in eval mode, and what changed.

    The model is traced with torch.fx; each Conv/Linear whose units reach the next Conv/Linear
    through a positively homogeneous, per-unit path (BatchNorm in eval mode, ReLU/LeakyReLU,
    pooling, dropout, flatten) has its positively near-parallel units fused
    (:func:`wcond.shrink.folding.fold_links`): exact for exactly parallel units, a least-squares
    fit for near-parallel ones. The copy keeps the model's class and module names, with
    narrower modules (``out_features``, ``in_channels``, ``num_features``, ... updated).
    ``model`` is not modified.

    Args:
        example_input: run through both models (eval mode, no grad) to measure the largest
            output difference, ``report.max_abs_diff``; None skips the check.

    Returns:
        (new_model, report): ``report.widths`` gives each narrowed module's units before and
        after, ``report.left_alone`` each layer that was not folded and why.

    Example:
        >>> small, report = wcond.fold(model, torch.randn(1, 3, 32, 32))
        >>> report.widths  # {"features.0": [64, 60], ...}
    """
    new = copy.deepcopy(model).eval()
    try:
        graph = torch.fx.symbolic_trace(new).graph
    except Exception as e:  # fx raises many types for untraceable Python (TraceError, TypeError...)
        raise UsageError(
            f"cannot trace {type(model).__name__} with torch.fx ({_first_line(e)}); fold a chain of "
            "named layers from its checkpoint instead (wcond.shrink.fold)"
        ) from e
    modules: dict[str, Any] = dict(new.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    links: list[Link] = []
    left_alone: dict[str, str] = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _LAYERS):
            continue
        link, why = _follow(node, modules, calls)
        if link is None:
            left_alone[node.target] = why
        else:
            links.append(link)

    state = new.state_dict()
    tensors: dict[str, Tensor] = {}
    for link in links:
        for key in link.keys():
            t = state[key].detach()
            tensors[key] = t.double() if t.dtype == torch.float64 else t.float()
    results = fold_links(tensors, links, tau_cos=tau_cos, tau_euc=tau_euc)

    layers: dict[str, LayerShrink] = {}
    widths: dict[str, list[int]] = {}
    for link in links:
        name, nxt = _module_of(link.weight), _module_of(link.next)
        g = results[link.weight].grouping
        for m in (name, nxt):
            if m not in layers:
                w = modules[m].weight
                layers[m] = LayerShrink(m, list(w.shape), list(w.shape), params_before=w.numel())
        rep = layers[name]
        rep.axes = ["rows"]
        if not g.fused:
            continue
        rep.fused_rows, rep.max_angle_deg = g.fused, g.max_angle
        rep.reconstruction_error = results[link.weight].error
        layers[nxt].fused_cols = g.fused * link.block
        widths[name] = [g.index.numel(), g.kept]
        _narrow_outputs(modules[name], tensors, link)
        if link.bn:
            _narrow_batchnorm(modules[link.bn], tensors, link.bn)
    for link in links:
        if results[link.weight].grouping.fused:
            _narrow_inputs(modules[_module_of(link.next)], tensors[link.next])
    for rep in layers.values():
        w = modules[rep.name].weight
        rep.shape_after, rep.params_after = list(w.shape), w.numel()
        rep.changed = rep.shape_after != rep.shape_before

    constructor: dict[str, dict[str, list[int]]] = {}
    old_modules = dict(model.named_modules())
    for name, mod in new.named_modules():
        changed = {
            attr: [getattr(old_modules[name], attr), getattr(mod, attr)]
            for attr in _WIDTH_ATTRS
            if hasattr(mod, attr) and getattr(mod, attr) != getattr(old_modules[name], attr)
        }
        if changed:
            constructor[name] = changed
    params_before = sum(p.numel() for p in model.parameters())
    report = FoldReport(
        model=type(model).__name__,
        settings={"tau_cos": tau_cos, "tau_euc": tau_euc},
        layers=list(layers.values()),
        params_before=params_before,
        params_after=sum(p.numel() for p in new.parameters()),
        widths=widths,
        left_alone=left_alone,
        constructor=constructor,
    )
    if example_input is not None:
        report.max_abs_diff = _max_abs_diff(model, new, example_input)
    return new, report


def _follow(
    node: torch.fx.Node, modules: dict[str, Any], calls: dict[str, int]
) -> tuple[Link | None, str]:
    """The link from a layer's node to the next layer, or None and why there is none."""
    name = str(node.target)
    layer = modules[name]
    if calls[name] > 1:
        return None, f"called {calls[name]} times: its units serve several places"
    if isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d) and layer.groups != 1:
        return None, f"a grouped conv (groups={layer.groups}): its units are not independent"
    bn: str | None = None
    bn_eps = 0.0
    flattened = False
    activated = False
    cur = node
    while True:
        users = list(cur.users)
        if not users or users[0].op == "output":
            return None, "its units are the model's outputs"
        if len(users) > 1:
            what = ", ".join(sorted({_describe(u, modules) for u in users}))
            return None, f"its output goes to {len(users)} places ({what}): a branch or residual"
        u = users[0]
        mod = modules.get(str(u.target)) if u.op == "call_module" else None
        if isinstance(mod, _BATCHNORMS) and bn is None and not activated and not flattened:
            if not (mod.affine and mod.track_running_stats and mod.running_var is not None):
                return None, f"BatchNorm {u.target} has no affine weights or running statistics"
            bn, bn_eps = str(u.target), float(mod.eps)
        elif isinstance(mod, _ACTIVATIONS) or (
            u.op == "call_function" and u.target in _ACTIVATION_FNS
        ):
            activated = True
        elif isinstance(mod, _PASSTHROUGH) or (
            u.op == "call_function" and u.target in _PASSTHROUGH_FNS
        ):
            pass
        elif _is_flatten(u, mod) and isinstance(layer, nn.Conv1d | nn.Conv2d | nn.Conv3d):
            flattened = True
        elif isinstance(mod, _LAYERS) and u.args and u.args[0] is cur:
            return _link_to(name, layer, bn, bn_eps, str(u.target), mod, flattened, calls)
        else:
            return None, f"its output goes into {_describe(u, modules)}"
        cur = u


def _link_to(
    name: str,
    layer: Any,
    bn: str | None,
    bn_eps: float,
    nxt: str,
    nxt_mod: Any,
    flattened: bool,
    calls: dict[str, int],
) -> tuple[Link | None, str]:
    if calls[nxt] > 1:
        return None, f"feeds {nxt}, which is called {calls[nxt]} times"
    if isinstance(nxt_mod, nn.Conv1d | nn.Conv2d | nn.Conv3d) and nxt_mod.groups != 1:
        return None, f"feeds a grouped conv ({nxt}, groups={nxt_mod.groups})"
    out, inputs = int(layer.weight.shape[0]), int(nxt_mod.weight.shape[1])
    block = 1
    if flattened:
        if not isinstance(nxt_mod, nn.Linear) or inputs % out:
            return None, f"flattened into {nxt}, whose {inputs} inputs are not a block per unit"
        block = inputs // out
    elif inputs != out:
        return None, f"feeds {nxt}, which reads {inputs} inputs for {out} units"
    bias = f"{name}.bias" if layer.bias is not None else None
    return Link(f"{name}.weight", bias, f"{nxt}.weight", bn, bn_eps, block), ""


def _is_flatten(u: torch.fx.Node, mod: nn.Module | None) -> bool:
    """A flatten from dim 1 on: nn.Flatten(), torch.flatten(x, 1) or x.flatten(1)."""
    if isinstance(mod, nn.Flatten):
        return mod.start_dim == 1 and mod.end_dim == -1
    if (u.op == "call_function" and u.target is torch.flatten) or (
        u.op == "call_method" and u.target == "flatten"
    ):
        start = u.args[1] if len(u.args) > 1 else u.kwargs.get("start_dim", 0)
        end = u.args[2] if len(u.args) > 2 else u.kwargs.get("end_dim", -1)
        return bool(start == 1 and end == -1)
    return False


def _describe(u: torch.fx.Node, modules: dict[str, Any]) -> str:
    """What an fx node does, in words, for the report."""
    if u.op == "call_module":
        mod = modules[str(u.target)]
        kind = type(mod).__name__
        if isinstance(mod, nn.LayerNorm | nn.GroupNorm | nn.InstanceNorm2d):
            return f"{kind} {u.target} (a normalisation over units)"
        if isinstance(mod, nn.MultiheadAttention):
            return f"{kind} {u.target} (attention)"
        if isinstance(mod, _BATCHNORMS):
            return f"{kind} {u.target} (after the activation: not foldable here)"
        return f"{kind} {u.target}"
    if u.op == "call_function":
        named = _NAMED_FNS.get(u.target)
        return named or f"{getattr(u.target, '__name__', str(u.target))}()"
    if u.op == "call_method":
        return f".{u.target}()"
    return u.op


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _module_of(key: str) -> str:
    return key.removesuffix(".weight")


def _parameter(t: Tensor, like: Tensor) -> nn.Parameter:
    return nn.Parameter(t.to(like.dtype).contiguous(), requires_grad=like.requires_grad)


def _narrow_outputs(layer: Any, tensors: dict[str, Tensor], link: Link) -> None:
    """Give a layer its fused weight (and bias), and the width that goes with it."""
    w = tensors[link.weight]
    layer.weight = _parameter(w, layer.weight)
    if link.bias:
        layer.bias = _parameter(tensors[link.bias], layer.bias)
    if isinstance(layer, nn.Linear):
        layer.out_features = w.shape[0]
    else:
        layer.out_channels = w.shape[0]


def _narrow_inputs(layer: Any, w: Tensor) -> None:
    layer.weight = _parameter(w, layer.weight)
    if isinstance(layer, nn.Linear):
        layer.in_features = w.shape[1]
    else:
        layer.in_channels = w.shape[1]


def _narrow_batchnorm(bn: Any, tensors: dict[str, Tensor], prefix: str) -> None:
    bn.weight = _parameter(tensors[prefix + ".weight"], bn.weight)
    bn.bias = _parameter(tensors[prefix + ".bias"], bn.bias)
    for buf in ("running_mean", "running_var"):
        old = getattr(bn, buf)
        setattr(bn, buf, tensors[f"{prefix}.{buf}"].to(old.dtype).contiguous())
    bn.num_features = bn.weight.shape[0]


@torch.no_grad()
def _max_abs_diff(a: nn.Module, b: nn.Module, x: Tensor | tuple[Tensor, ...]) -> float:
    """The largest |a(x) - b(x)| with both in eval mode; ``a``'s mode is restored."""
    was = a.training
    a.eval()
    try:
        args = x if isinstance(x, tuple) else (x,)
        try:
            ya = a(*args)
        except Exception as e:  # the user's forward: any exception means a wrong input
            raise UsageError(f"example_input: the model fails on it ({_first_line(e)})") from e
        yb = b(*args)
    finally:
        a.train(was)
    ya_t = ya if isinstance(ya, Tensor) else torch.cat([t.flatten() for t in ya])
    yb_t = yb if isinstance(yb, Tensor) else torch.cat([t.flatten() for t in yb])
    diff = float((ya_t.double() - yb_t.double()).abs().max()) if ya_t.numel() else 0.0
    return diff if math.isfinite(diff) else float("inf")


fold = fold_model  # the name the package exports: wcond.fold(model, example_input)


def import_factory(spec: str) -> Callable[..., nn.Module]:
    """The callable ``PKG.MODULE:FACTORY`` names, imported from the user's own code.

    Importing runs that module's code: it is the user's, named explicitly. The working
    directory is searched first, as ``python -m`` would.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(
            f"model={spec!r}: wants PKG.MODULE:FACTORY, e.g. mypkg.models:make_net",
            params=("model",),
        )
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(
            f"model={spec!r}: cannot import {module_name} ({e})", params=("model",)
        ) from e
    except Exception as e:  # the user's module raised while it was imported
        raise UsageError(
            f"model={spec!r}: importing {module_name} raised {type(e).__name__}: {_first_line(e)}",
            params=("model",),
        ) from e
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise UsageError(
            f"model={spec!r}: {module_name} has no factory {attr!r}", params=("model",)
        )
    return factory


def build_model(make: Callable[..., nn.Module], model: object) -> nn.Module:
    """Call a factory with no arguments; a UsageError naming ``model`` (the spec or callable given)
    when it wants arguments, raises, or returns something other than an ``nn.Module``."""
    try:
        inspect.signature(make).bind()
    except TypeError as e:
        raise UsageError(
            f"model={model!r}: a factory is called with no arguments, and this one needs some ({e})",
            params=("model",),
        ) from e
    except ValueError:
        pass  # no signature to read (a builtin): calling it will tell
    try:
        net = make()
    except Exception as e:
        raise UsageError(
            f"model={model!r}: calling it raised {type(e).__name__}: {_first_line(e)}",
            params=("model",),
        ) from e
    if not isinstance(net, nn.Module):
        raise UsageError(
            f"model={model!r}: returned a {type(net).__name__}, not a torch.nn.Module",
            params=("model",),
        )
    return net


def fold_checkpoint(
    source: str | Path,
    output: str | Path | None = None,
    *,
    model: str | Callable[..., nn.Module],
    input_shape: Sequence[int] | None = None,
    tau_cos: float = TAU_COS,
    tau_euc: float = TAU_EUC,
    force: bool = False,
) -> FoldReport:
    """Build the model, load ``source`` into it, fold it (:func:`fold_model`), write its state dict.

    Args:
        model: a factory returning the model (called with no arguments), or ``"PKG.MODULE:FACTORY"``
            naming one in the user's code (see :func:`import_factory`).
        input_shape: the shape of a random input (seeded) to compare the models' outputs on;
            None skips the check.
        output: a plain state dict of the narrow model (.safetensors or a torch extension);
            None reports without writing.

    Example:
        >>> report = fold_checkpoint("cnn.pt", "narrow.pt", model="mynets:make_cnn")
        >>> report.constructor  # {"features.0": {"out_channels": [64, 60]}, ...}
    """
    if output is not None:
        check_output(source, output, force)
    make = import_factory(model) if isinstance(model, str) else model
    net = build_model(make, model)
    state = load_state_dict(source)
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:300]
        raise CheckpointError(f"{source}: does not fit the model {model!r}: {detail}") from e
    example = None
    if input_shape is not None:
        if not input_shape or any(int(n) < 1 for n in input_shape):
            raise UsageError(
                f"input_shape={list(input_shape)!r}: wants positive sizes",
                params=("input_shape",),
            )
        example = torch.randn(*map(int, input_shape), generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                net.eval()(example)
        except Exception as e:  # the user's forward: any exception means a wrong shape or input
            raise UsageError(
                f"input_shape={list(input_shape)!r}: the model fails on such an input "
                f"({_first_line(e)})",
                params=("input_shape",),
            ) from e
    new, report = fold_model(net.eval(), example, tau_cos=tau_cos, tau_euc=tau_euc)
    report.checkpoint = str(source)
    report.input_shape = list(input_shape) if input_shape is not None else None
    report.file_bytes_before = file_bytes([Path(source)]) if Path(source).is_file() else 0
    if output is not None:
        report.output = str(output)
        tensors = {k: v.detach().contiguous() for k, v in new.state_dict().items()}
        report.warnings += save_checkpoint(output, tensors)
        report.file_bytes_after = _written_bytes(output)
    return report
