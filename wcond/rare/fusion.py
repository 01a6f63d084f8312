"""DynamicFusion: wrap a model's layers, fuse their near-parallel vectors after each update, export."""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from wcond import metrics
from wcond.checkpoint.base import tensor_info
from wcond.checkpoint.factorized import MANIFEST_KEY, W_SUFFIX
from wcond.checkpoint.target import check_new_file
from wcond.checkpoint.write import save_checkpoint
from wcond.defaults import AXES, AXIS, TAU_COS, TAU_EUC
from wcond.errors import UsageError
from wcond.layers import matches
from wcond.output import atomic_path
from wcond.rare.screen import PairScreen
from wcond.rare.weight import FactorizedWeight
from wcond.shrink.factorized import MANIFEST, Factorization, paying_parts
from wcond.shrink.pairs import Grouping, compress, fuse_vectors

__all__ = ["LAMBDA_L2", "LAMBDA_RARE", "DynamicFusion", "FusedLayer", "FusionReport"]

# The paper's loss weights (Section 5: lambda1 = 20, lambda2 = 0.1).
LAMBDA_RARE = 20.0
LAMBDA_L2 = 0.1
_COVERED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class FusedLayer:
    """One layer under :class:`DynamicFusion`: where it is, what it may fuse, what it fused."""

    name: str  # the module's name in the model
    key: str  # its weight's key in the model's state dict
    shape: tuple[int, ...]  # the original (dense) weight shape
    axes: tuple[str, ...]  # the axes it may fuse after the protections: "rows", "cols"
    module: nn.Module = field(repr=False)
    # P and Q as composed so far: original k -> coef[k] * W'[index[k]]; roots[p] owns slot p
    rows: Grouping = field(repr=False)
    cols: Grouping = field(repr=False)
    notes: list[str] = field(default_factory=list)
    screens: dict[str, PairScreen] = field(default_factory=dict, repr=False)

    @property
    def param(self) -> nn.Parameter:
        """W', the trainable stored weight."""
        return self.module.parametrizations.weight.original  # type: ignore[union-attr,return-value]

    @property
    def parametrization(self) -> FactorizedWeight:
        return self.module.parametrizations.weight[0]  # type: ignore[union-attr,index,return-value]

    @property
    def stored_shape(self) -> tuple[int, ...]:
        return tuple(self.param.shape)

    @property
    def fused_rows(self) -> int:
        return self.rows.fused

    @property
    def fused_cols(self) -> int:
        return self.cols.fused

    @property
    def params_dense(self) -> int:
        return math.prod(self.shape)

    @property
    def params_stored(self) -> int:
        return self.param.numel()


@dataclass
class FusionReport:
    """What :class:`DynamicFusion` has done so far, per layer and in total."""

    layers: list[dict[str, Any]]
    steps: int  # calls to step()
    checks: int  # of them, the ones that looked for pairs (every_n_steps)
    fusions: int  # pairs fused, all layers and axes
    seconds: float  # spent checking and fusing
    params_dense: int
    params_stored: int
    settings: dict[str, Any]

    @property
    def removed_fraction(self) -> float:
        """Share of the covered layers' weight parameters no longer stored."""
        return 1 - self.params_stored / self.params_dense if self.params_dense else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "steps": self.steps,
            "checks": self.checks,
            "fusions": self.fusions,
            "seconds": self.seconds,
            "params_dense": self.params_dense,
            "params_stored": self.params_stored,
            "removed_fraction": self.removed_fraction,
            "layers": self.layers,
        }


class DynamicFusion:
    """Keep a model's Linear and Conv weights as P W' Q and fuse near-parallel vectors as it trains.

    Args:
        model: any ``nn.Module``; its ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (groups=1) layers
            are covered (``layers``/``exclude`` globs of module names or weight keys narrow that).
            Their forward and ``state_dict()`` keep working; each weight becomes a
            ``torch.nn.utils.parametrize`` parametrization whose trainable tensor is W'.
        optimizer: the optimizer over ``model.parameters()``, made before or after this wrapper
            (until the first fusion W' is the very Parameter the weight was). A fusion makes W'
            a new, smaller Parameter: it takes the old one's place in this optimizer, with its
            state (Adam's moments, SGD's momentum, ...) sliced to the rows/columns that stay.
            Other references to the old Parameter (an EMA copy, a list of your own) go stale.
            With ``frobenius=True`` the new scalars g join it as one more parameter group.
        tau_cos, tau_euc: the near-parallel test (METRICS.md), the paper's defaults.
        axis: "auto" fuses the longer of the axes a layer may fuse (both while it is square,
            which keeps W' near square, as in the paper); or "rows", "cols", "both".
        protect: globs of layers never fused. With ``protect_ends`` (default) the columns of the
            model's first Linear/Conv (the network's inputs) and the rows of its last (its
            outputs, the classes) are never fused, "first" and "last" in the model's module
            order, whatever ``layers`` selects.
        frobenius: the paper's Frobenius normalisation (eq. 16), ``W = k g P W' Q / |W'|_F``; g
            is rescaled at each fusion so that the function does not change.
        every_n_steps: look for pairs at every n-th ``step()`` (1: after every update, as the
            paper does). A check after every update cost about one plain training step on
            the 256-wide MLP of benchmarks/RARE_PAPER.md, every 10th a fifth of one.

    The model must not be wrapped in another parametrization of ``weight`` already.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        tau_cos: float = TAU_COS,
        tau_euc: float = TAU_EUC,
        axis: str = AXIS,
        layers: str | Sequence[str] = (),
        exclude: str | Sequence[str] = (),
        protect: str | Sequence[str] = (),
        protect_ends: bool = True,
        frobenius: bool = False,
        every_n_steps: int = 1,
    ) -> None:
        if axis not in AXES:
            raise UsageError(f"axis={axis!r}: use one of {', '.join(AXES)}", params=("axis",))
        for name, value in (("tau_cos", tau_cos), ("tau_euc", tau_euc)):
            if not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{name}={value!r}: must be finite and not negative")
        if every_n_steps < 1:
            raise UsageError(f"every_n_steps={every_n_steps!r}: must be at least 1")
        self.model = model
        self.tau_cos, self.tau_euc, self.axis = tau_cos, tau_euc, axis
        self.frobenius = frobenius
        self.every_n_steps = every_n_steps
        self.steps = self.checks = self.fusions = 0
        self._warned = False
        self.seconds = 0.0
        self.layers = self._wrap(_globs(layers), _globs(exclude), _globs(protect), protect_ends)
        self.optimizer: torch.optim.Optimizer | None = None
        if optimizer is not None:
            self.attach(optimizer)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Use ``optimizer`` from now on: the one made over ``model.parameters()`` after this wrapper.

        With Frobenius normalisation, the scalars g it does not hold yet join it as one more
        parameter group (with the optimizer's defaults).
        """
        self.optimizer = optimizer
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        gains = [
            layer.parametrization.gain
            for layer in self.layers
            if self.frobenius and id(layer.parametrization.gain) not in held
        ]
        if gains:
            optimizer.add_param_group({"params": gains})

    # ------------------------------------------------------------------ wrapping

    def _wrap(
        self, layers: list[str], exclude: list[str], protect: list[str], protect_ends: bool
    ) -> list[FusedLayer]:
        covered: list[tuple[str, nn.Module]] = [
            (n, m) for n, m in self.model.named_modules() if isinstance(m, _COVERED)
        ]
        # The network's ends are its own first and last layers, whichever layers are selected.
        first, last = (covered[0][0], covered[-1][0]) if covered else (None, None)
        chosen: list[tuple[str, nn.Module]] = []
        for name, module in covered:
            key = f"{name}.weight" if name else "weight"
            if layers and not matches(key, layers):
                continue
            if matches(key, exclude):
                continue
            if parametrize.is_parametrized(module, "weight"):
                raise UsageError(
                    f"layer {name!r}: its weight is already parametrized (weight norm, spectral "
                    "norm, or a DynamicFusion): remove that first or exclude the layer",
                    params=("exclude",),
                )
            if isinstance(module, nn.modules.conv._ConvNd) and module.groups != 1:
                continue  # a grouped conv's columns do not span its filters
            chosen.append((name, module))
        if not chosen:
            raise UsageError(
                f"no nn.Linear or nn.Conv1d/2d/3d layer (groups=1) in {type(self.model).__name__} "
                f"matches layers={layers!r}, exclude={exclude!r}",
                params=("layers", "exclude"),
            )
        out = []
        for name, module in chosen:
            key = f"{name}.weight" if name else "weight"
            w = _weight(module)
            notes: list[str] = []
            axes = ["rows", "cols"] if self.axis in ("auto", "both") else [self.axis]
            if matches(key, protect):
                axes = []
                notes.append("protected: not fused")
            if protect_ends and name == first and "cols" in axes:
                axes.remove("cols")
                notes.append("columns protected: the first layer reads the network's inputs")
            if protect_ends and name == last and "rows" in axes:
                axes.remove("rows")
                notes.append("rows protected: the last layer's rows are the outputs")
            parametrize.register_parametrization(
                module, "weight", FactorizedWeight(w.detach(), self.frobenius), unsafe=True
            )
            rows, cols = (_identity(n) for n in w.shape[:2])
            out.append(
                FusedLayer(name, key, tuple(w.shape), tuple(axes), module, rows, cols, notes)
            )
        return out

    # ------------------------------------------------------------------ fusing

    def step(self) -> int:
        """Call after ``optimizer.step()``: fuse near-parallel pairs at every n-th call.

        Returns the number of pairs fused by this call.
        """
        self.steps += 1
        if (self.steps - 1) % self.every_n_steps:
            return 0
        return self._fuse_all()

    def fuse(self) -> int:
        """Look for near-parallel rows and columns in every covered W' now and fuse them."""
        return self._fuse_all()

    def _fuse_all(self) -> int:
        start = time.perf_counter()
        self.checks += 1
        fused = 0
        with torch.no_grad():
            for layer in self.layers:
                for axis in self._due_axes(layer):
                    fused += self._fuse_axis(layer, axis)
        self.fusions += fused
        self.seconds += time.perf_counter() - start
        if fused and self.optimizer is None and not self._warned:
            self._warned = True
            warnings.warn(
                "DynamicFusion has no optimizer: a fused W' is a new Parameter, which an optimizer "
                "made earlier from model.parameters() does not update; pass optimizer= or call "
                "attach(optimizer)",
                stacklevel=3,  # the caller of step() or fuse()
            )
        return fused

    def _due_axes(self, layer: FusedLayer) -> list[str]:
        """The axes to look at now: with "auto", the longer allowed axis (both when square)."""
        axes = list(layer.axes)
        if self.axis == "auto" and len(axes) == 2:
            rows, cols = layer.param.shape[:2]
            if rows != cols:
                axes = ["rows"] if rows > cols else ["cols"]
        return axes

    def _fuse_axis(self, layer: FusedLayer, axis: str) -> int:
        """Fuse the near-parallel vectors of one axis of one W'; the pairs fused."""
        param = layer.param
        dim = 0 if axis == "rows" else 1
        if param.shape[dim] < 2:
            return 0
        screen = layer.screens.setdefault(axis, PairScreen(self.tau_cos))
        vectors = _vectors(param.detach(), dim)
        i, j = screen.candidates(vectors)
        if not len(i):
            return 0  # most calls end here
        tau_cos, tau_euc = self.tau_cos, self.tau_euc
        pairs = metrics.near_parallel_among(vectors, i, j, tau_cos=tau_cos, tau_euc=tau_euc)
        if not pairs:
            return 0
        w = param.detach().double()
        g = fuse_vectors(_vectors(w, dim), pairs=pairs, tau_cos=tau_cos, tau_euc=tau_euc)
        if not g.fused:
            return 0
        new = compress(w, g, dim)
        fn = layer.parametrization
        if fn.frobenius:
            # k g W'/|W'|: keep the factor the fused W' is multiplied by (the fused W' is W' Q^T,
            # a projection, whose norm is |W'| for an exactly parallel pair and a little less else)
            old_norm, new_norm = float(w.norm()), float(new.norm())
            if old_norm > 0 and new_norm > 0:
                fn.gain.mul_(new_norm / old_norm)
        kept = torch.tensor(g.kept_indices, device=param.device)
        param = self._replace(layer, new.to(param.dtype), dim, kept)
        composed = layer.rows if dim == 0 else layer.cols
        composed = _compose(composed, g)
        if dim == 0:
            layer.rows = composed
        else:
            layer.cols = composed
        fn.set_axis(dim, composed.index, composed.coef, torch.tensor(composed.kept_indices))
        return g.fused

    def _replace(self, layer: FusedLayer, data: Tensor, dim: int, kept: Tensor) -> nn.Parameter:
        """Install the fused W' as a new Parameter, in the module and in the optimizer.

        A new Parameter, not new ``.data`` in the old one: a graph still alive from the last
        step (the previous ``loss``) holds the old one's gradient accumulator, which would expect
        the old shape. Its gradient and optimizer state are those of the rows/columns that stay
        (every state tensor shaped like W' is sliced, scalars such as Adam's step are kept).
        """
        old = layer.param
        new = nn.Parameter(data, requires_grad=old.requires_grad)
        if old.grad is not None:
            new.grad = old.grad.index_select(dim, kept)
        state = None
        if self.optimizer is not None and old in self.optimizer.state:
            state = {
                name: value.index_select(dim, kept.to(value.device))
                if isinstance(value, Tensor) and value.shape == old.shape
                else value
                for name, value in self.optimizer.state[old].items()
            }
        self._install(layer, new, state)
        return new

    def _install(self, layer: FusedLayer, new: nn.Parameter, state: dict[str, Any] | None) -> None:
        """``new`` in the old W''s place: in the module, the optimizer's groups, with ``state``."""
        old = layer.param
        layer.module.parametrizations.weight.original = new  # type: ignore[union-attr]
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["params"] = [new if p is old else p for p in group["params"]]
            self.optimizer.state.pop(old, None)
            if state is not None:
                self.optimizer.state[new] = state

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Resume: give the model the factorization and weights of its ``state_dict()`` saved mid-training.

        Each covered layer's W' and P, Q take the saved shapes (W' as a new Parameter in the
        optimizer, as a fusion would install it), then ``model.load_state_dict(state)`` fills in
        every value. Load the optimizer's own state dict after this.

        Example:
            >>> torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, "ckpt.pt")
            >>> fusion = DynamicFusion(new_model, new_opt, frobenius=True)
            >>> ckpt = torch.load("ckpt.pt")
            >>> fusion.load_state_dict(ckpt["model"]); new_opt.load_state_dict(ckpt["opt"])
        """
        for layer in self.layers:
            head = (
                f"{layer.name}.parametrizations.weight."
                if layer.name
                else "parametrizations.weight."
            )
            saved = state.get(head + "original")
            if saved is None:
                raise UsageError(
                    f"the state dict has no {head + 'original'!r}: it was not saved from a model "
                    "wrapped by DynamicFusion with the same layers",
                    params=("state",),
                )
            if tuple(saved.shape) != layer.stored_shape:
                self._resize(layer, tuple(saved.shape))
            fn = layer.parametrization
            groupings = []
            for dim, prefix in enumerate(("row", "col")):
                index, coef = state[f"{head}0.{prefix}_index"], state[f"{head}0.{prefix}_coef"]
                roots = state[f"{head}0.{prefix}_roots"]
                fn.set_axis(dim, index, coef, roots)
                groupings.append(
                    Grouping(
                        index.cpu().to(torch.int64),
                        coef.cpu().double(),
                        roots.tolist(),
                        len(index) - len(roots),
                    )
                )
            layer.rows, layer.cols = groupings
            layer.screens.clear()
        self.model.load_state_dict(state)

    def _resize(self, layer: FusedLayer, shape: tuple[int, ...]) -> None:
        """W' as a new Parameter of ``shape`` (values to be loaded), in the module and optimizer."""
        old = layer.param
        self._install(
            layer, nn.Parameter(old.new_empty(shape), requires_grad=old.requires_grad), None
        )

    # ------------------------------------------------------------------ losses

    def rare_loss(self) -> Tensor:
        """The paper's eq. 15: sum_i m'n' [RaRe(W'_i) + RaRe(W'_i^T)] / (2c), c = sum_i m'n'.

        Built from :func:`wcond.metrics.rare`, the number ``wcond inspect`` reports as
        ``rare_rows``/``rare_cols``; differentiable in W'.
        """
        ws = [layer.param for layer in self.layers]
        c = sum(w.numel() for w in ws)
        terms = [w.numel() * (metrics.rare(w, "rows") + metrics.rare(w, "cols")) for w in ws]
        return torch.stack(terms).sum() / (2 * c)

    def l2_loss(self) -> Tensor:
        """The paper's eq. 17: the mean over covered layers of |W'|^2 (counters growth by fusing)."""
        return torch.stack([layer.param.pow(2).sum() for layer in self.layers]).mean()

    def regularizer(self, rare: float = LAMBDA_RARE, l2: float = LAMBDA_L2) -> Tensor:
        """``rare * rare_loss() + l2 * l2_loss()``, the paper's eq. 18 without the task loss."""
        return rare * self.rare_loss() + l2 * self.l2_loss()

    # ------------------------------------------------------------------ results

    def report(self) -> FusionReport:
        """Per layer: shapes, pairs fused, parameters stored; and the totals."""
        layers = [
            {
                "name": layer.key,
                "shape": list(layer.shape),
                "stored_shape": list(layer.stored_shape),
                "fused_rows": layer.fused_rows,
                "fused_cols": layer.fused_cols,
                "params_dense": layer.params_dense,
                "params_stored": layer.params_stored,
                "notes": list(layer.notes),
            }
            for layer in self.layers
        ]
        return FusionReport(
            layers=layers,
            steps=self.steps,
            checks=self.checks,
            fusions=self.fusions,
            seconds=self.seconds,
            params_dense=sum(layer.params_dense for layer in self.layers),
            params_stored=sum(layer.params_stored for layer in self.layers),
            settings=self.settings,
        )

    @property
    def settings(self) -> dict[str, Any]:
        return {
            "tau_cos": self.tau_cos,
            "tau_euc": self.tau_euc,
            "axis": self.axis,
            "frobenius": self.frobenius,
            "every_n_steps": self.every_n_steps,
        }

    @torch.no_grad()
    def dense_state_dict(self) -> dict[str, Tensor]:
        """The model's state dict under its original keys and shapes (weights rebuilt, detached).

        What ``model.load_state_dict`` of an unwrapped copy of the model takes.
        """
        return dict(_original_state(self.model, {layer.key: layer for layer in self.layers}))

    @torch.no_grad()
    def factorized_tensors(self, fmt: str = "safetensors") -> dict[str, Tensor]:
        """The model's state dict in wcond's factorized format, for a file of format ``fmt``.

        A layer with fused rows or columns is stored as W' (Frobenius normalisation multiplied
        in) and its fused pairs (docs/FACTORIZED.md) when that makes the file smaller, by the
        size rule ``wcond shrink`` follows; every other tensor as its forward sees it. A layer
        left dense says why in its ``notes``.
        """
        by_key = {layer.key: layer for layer in self.layers}
        dense = dict(_original_state(self.model, by_key))
        factorizations = {}
        for layer in self.layers:
            if layer.fused_rows or layer.fused_cols:
                w = layer.param.detach()
                stored = (w * layer.parametrization.scale(w)).to(w.dtype).cpu()
                rows = layer.rows if layer.fused_rows else None
                cols = layer.cols if layer.fused_cols else None
                factorizations[layer.key] = Factorization(stored, rows, cols, None)
        infos = {k: tensor_info(t) for k, t in dense.items()}
        notes: dict[str, list[str]] = {k: [] for k in factorizations}
        size = sum(i.numel * i.dtype.itemsize for i in infos.values())
        parts, _ = paying_parts(
            fmt, infos, factorizations, notes, metadata={}, archive="model", size_before=size
        )
        for key, lines in notes.items():
            by_key[key].notes += [line for line in lines if line not in by_key[key].notes]
        tensors: dict[str, Tensor] = {}
        for key, value in dense.items():
            tensors.update(parts.get(key, {key: value}))
        return tensors

    def export(self, path: str | Path, *, force: bool = False) -> Path:
        """Write the model as a factorized checkpoint (.safetensors or a torch extension), atomically.

        ``wcond.load_state_dict(path)`` then gives the original architecture's state dict, and
        ``wcond inspect`` / ``wcond expand`` read it. See :meth:`factorized_tensors`.

        Example:
            >>> fusion.export("small.safetensors")
            >>> plain_model.load_state_dict(wcond.load_state_dict("small.safetensors"))
        """
        path = Path(path)
        fmt = check_new_file(path, force)  # before any work
        tensors = self.factorized_tensors(fmt)
        factorized = any(k.endswith(W_SUFFIX) for k in tensors)
        if not factorized:
            save_checkpoint(path, tensors)
        elif fmt == "safetensors":
            save_checkpoint(path, tensors, metadata={MANIFEST_KEY: MANIFEST})
        else:
            with atomic_path(path) as tmp:
                torch.save({**tensors, MANIFEST_KEY: MANIFEST}, tmp)
        return path

    def remove(self) -> nn.Module:
        """Turn every covered layer back into a plain dense weight (P W' Q multiplied out); the model.

        The model then trains and saves as an ordinary one; this wrapper is done.
        """
        for layer in self.layers:
            parametrize.remove_parametrizations(layer.module, "weight", leave_parametrized=True)
        self.layers = []
        return self.model


# ---------------------------------------------------------------------- helpers


def _weight(module: nn.Module) -> Tensor:
    """A covered module's weight as its forward sees it (P W' Q once wrapped)."""
    w = module.weight
    assert isinstance(w, Tensor)
    return w


def _globs(value: str | Sequence[str]) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _identity(n: int) -> Grouping:
    return Grouping(
        torch.arange(n, dtype=torch.int64), torch.ones(n, dtype=torch.float64), list(range(n)), 0
    )


def _compose(old: Grouping, new: Grouping) -> Grouping:
    """P_old then this step's fusion: original k -> old.coef[k] new.coef[j] W''[new.index[j]], j = old.index[k]."""
    j = old.index
    return Grouping(
        new.index[j],
        old.coef * new.coef[j],
        [old.kept_indices[p] for p in new.kept_indices],
        old.fused + new.fused,
        max((a for a in (old.max_angle, new.max_angle) if a is not None), default=None),
    )


def _vectors(w: Tensor, dim: int) -> Tensor:
    """One axis of a weight as vectors, a view where it can be: rows (dim 0) or columns (dim 1)."""
    return w.reshape(w.shape[0], -1) if dim == 0 else w.transpose(0, 1).reshape(w.shape[1], -1)


def _original_state(
    model: nn.Module, layers: dict[str, FusedLayer]
) -> Iterator[tuple[str, Tensor]]:
    """The model's state dict entries under their original keys, in order.

    A covered layer's ``parametrizations.weight.original`` and its parametrization's buffers
    become one ``weight``: the dense weight its forward uses.
    """
    seen: set[str] = set()
    for key, value in model.state_dict(keep_vars=False).items():
        head, sep, tail = key.partition("parametrizations.weight.")
        if sep:
            base = head + "weight"
            if base in layers and base not in seen:
                seen.add(base)
                layer = layers[base]
                yield base, _weight(layer.module).detach()
            continue
        yield key, value.detach()
