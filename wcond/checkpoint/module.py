"""Models in memory: an ``nn.Module``'s state dict, with what its modules know and a file does not.

A state dict records neither conv groups nor whether a 2-D weight belongs to a Linear or an
Embedding; the module does. :func:`module_view` reads both from the module objects, so
:func:`wcond.inspect` and :func:`wcond.init_cs` need no ``groups=`` for a module and name each
layer's kind instead of inferring it from the weight's shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["ModuleView", "module_view"]


@dataclass(frozen=True)
class ModuleView:
    """A module seen as a checkpoint: its tensors by state-dict key, conv groups and layer kinds.

    Attributes:
        name: how reports name the source, e.g. ``<module ResNet>``.
        tensors: ``model.state_dict()``: the module's own tensors (no copies), detached; a
            parametrized tensor (weight norm, ``wcond.rare.DynamicFusion``) as the module computes
            it, under its plain key.
        groups: conv weight key -> the conv's ``groups``, for every conv of the module.
        kinds: weight key -> "linear", "embedding", "conv2d", "conv_transpose2d", ...
    """

    name: str
    tensors: dict[str, torch.Tensor]
    groups: dict[str, int] = field(default_factory=dict)
    kinds: dict[str, str] = field(default_factory=dict)


def module_view(model: nn.Module) -> ModuleView:
    """The state dict of ``model`` plus the groups and kinds of its Conv, Linear and Embedding layers.

    Example:
        >>> view = module_view(torchvision.models.mobilenet_v2())
        >>> view.groups["features.1.conv.0.0.weight"]
        32
    """
    tensors = _computed_state(model)
    groups: dict[str, int] = {}
    kinds: dict[str, str] = {}
    for prefix, module in model.named_modules():
        key = f"{prefix}.weight" if prefix else "weight"
        own = isinstance(module._parameters.get("weight"), torch.Tensor)
        if key not in tensors or not (own or parametrize.is_parametrized(module, "weight")):
            continue  # no weight of its own, or one the state dict stores under other names
        kind = _kind(module)
        if kind is None:
            continue
        kinds[key] = kind
        if isinstance(module, nn.modules.conv._ConvNd):
            groups[key] = int(module.groups)
    return ModuleView(f"<module {type(model).__name__}>", tensors, groups, kinds)


def _computed_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()``, with each parametrized tensor as the module computes it.

    A parametrization (weight norm, spectral norm, :class:`wcond.rare.DynamicFusion`'s P W' Q)
    stores its own tensors under ``NAME.parametrizations.TENSOR.*``; the module's forward uses
    ``NAME.TENSOR``, which is what is reported, in the place of the first of those entries.
    """
    computed: dict[str, tuple[nn.Module, str]] = {}
    for prefix, module in model.named_modules():
        if parametrize.is_parametrized(module):
            for tensor in module.parametrizations:  # type: ignore[union-attr]
                inner = f"parametrizations.{tensor}."
                computed[f"{prefix}.{inner}" if prefix else inner] = (module, tensor)
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        hit = next((p for p in computed if key.startswith(p)), None)
        if hit is None:
            out[key] = value
            continue
        module, tensor = computed[hit]
        name = hit.removesuffix(f"parametrizations.{tensor}.") + tensor
        if name not in out:
            with torch.no_grad():
                out[name] = getattr(module, tensor).detach()
    return out


def _kind(module: nn.Module) -> str | None:
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"conv_transpose{len(module.kernel_size)}d"
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"conv{len(module.kernel_size)}d"
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    return None
