"""Weight metrics while a model trains: a Lightning callback, and the same for a plain PyTorch loop.

Every number is the one `wcond inspect` reports, from :func:`wcond.analyze.analyze_tensor` on
the model's current weights, without gradients, on the device the weights live on; only the
parts the requested metrics need are computed. Conv groups and layer kinds come from the
module itself. Values are logged as ``wcond/<metric>/<weight key>``, e.g.
``wcond/acv_mean/layer1.0.conv1.weight``; a metric that does not apply to a layer (CS of a
Linear) is left out rather than logged as NaN.

Example (plain PyTorch, TensorBoard):
    >>> monitor = wcond.monitor.WeightMonitor(every_n_steps=200, layers="layer*.conv*")
    >>> for step, (x, y) in enumerate(loader):
    ...     train_step(x, y)
    ...     monitor.step(model, step, writer)  # a torch.utils.tensorboard.SummaryWriter, or None

Example (Lightning: logs through the trainer's loggers, whichever are configured):
    >>> trainer = lightning.Trainer(callbacks=[wcond.monitor.WeightMetrics(every_n_steps=200)])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from wcond.analyze import NUMERIC_FIELDS, analyze_tensor
from wcond.checkpoint.base import tensor_info
from wcond.checkpoint.module import module_view
from wcond.defaults import TAU_COS, TAU_EUC
from wcond.errors import UsageError
from wcond.layers import find_layers
from wcond.lightning_import import import_lightning
from wcond.report import resolve_metrics

# WeightMetrics (the Lightning callback) is public too, but built on first access: not in
# __all__, so that `import *` does not need Lightning.
__all__ = ["DEFAULT_EVERY_N_STEPS", "DEFAULT_METRICS", "WeightMonitor"]

# One per paper: ACV, Convolutional Similarity (scale-free), Norm Loss, RaRe.
DEFAULT_METRICS = ("acv_mean", "conv_similarity_norm", "norm_loss", "rare_rows")
DEFAULT_EVERY_N_STEPS = 200
DEFAULT_PREFIX = "wcond/"


class WeightMonitor:
    """Computes the chosen inspect metrics of a model's weights every ``every_n_steps`` steps.

    Args:
        every_n_steps: :meth:`step` computes and logs when ``step % every_n_steps == 0``.
        metrics: names from `wcond inspect` (its JSON keys), e.g. "acv_mean", "conv_similarity",
            or the table's labels ("acv", "cs_n"); values are logged under the full name.
        layers, exclude: globs on weight keys (a string or a list), as inspect's ``layers=``.
        tau_cos, tau_euc: near-parallel thresholds, for the near_parallel_* counts.
        prefix: prepended to every logged name.
    """

    def __init__(
        self,
        every_n_steps: int = DEFAULT_EVERY_N_STEPS,
        metrics: Sequence[str] = DEFAULT_METRICS,
        layers: str | Sequence[str] = (),
        exclude: str | Sequence[str] = (),
        tau_cos: float = TAU_COS,
        tau_euc: float = TAU_EUC,
        prefix: str = DEFAULT_PREFIX,
    ):
        if every_n_steps < 1:
            raise UsageError(f"every_n_steps={every_n_steps}: must be at least 1")
        given = [metrics] if isinstance(metrics, str) else list(metrics)
        if not given:
            raise UsageError(f"metrics=[]: choose from {', '.join(NUMERIC_FIELDS)}")
        try:
            metrics = resolve_metrics(given)  # the table's labels ("acv", "cs_n") work too
        except UsageError as e:
            raise UsageError(f"metrics={given!r}: {e}") from e
        self.every_n_steps = every_n_steps
        self.metrics = metrics
        self.layers = (layers,) if isinstance(layers, str) else tuple(layers)
        self.exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
        self.tau_cos, self.tau_euc = tau_cos, tau_euc
        self.prefix = prefix
        self.last: dict[str, float] = {}

    def compute(self, model: nn.Module) -> dict[str, float]:
        """``{prefix + metric + "/" + weight key: value}`` for the model's current weights."""
        view = module_view(model)
        infos = {k: tensor_info(t) for k, t in view.tensors.items() if isinstance(t, torch.Tensor)}
        specs = find_layers(infos, self.layers, self.exclude, view.groups)
        if not specs:
            raise UsageError(
                f"{view.name}: no weight matches layers={list(self.layers)!r}, exclude={list(self.exclude)!r}"
            )
        out: dict[str, float] = {}
        with torch.no_grad():
            for spec in specs:
                w = view.tensors[spec.key].detach()
                rep = analyze_tensor(
                    spec.key,
                    w,
                    groups=spec.groups,
                    tau_cos=self.tau_cos,
                    tau_euc=self.tau_euc,
                    top=0,
                    device=w.device,
                    fields=self.metrics,
                )
                for m in self.metrics:
                    v = rep.value(m)
                    if v is not None:
                        out[f"{self.prefix}{m}/{spec.key}"] = v
        self.last = out
        return out

    def due(self, step: int) -> bool:
        return step % self.every_n_steps == 0

    def step(self, model: nn.Module, step: int, writer: Any = None) -> dict[str, float] | None:
        """At a due step: compute, write each value to ``writer`` (a SummaryWriter) if given, return them.

        Returns None (and costs nothing) at other steps.
        """
        if not self.due(step):
            return None
        values = self.compute(model)
        if writer is not None:
            for tag, v in values.items():
                writer.add_scalar(tag, v, global_step=step)
        return values


def __getattr__(name: str) -> Any:
    # The Lightning callback is built on first use, so that wcond needs Lightning only for it.
    if name == "WeightMetrics":
        cls = _lightning_callback()
        globals()["WeightMetrics"] = cls
        return cls
    raise AttributeError(f"module 'wcond.monitor' has no attribute {name!r}")


def _lightning_callback() -> type:
    pl = import_lightning("wcond.monitor.WeightMetrics", "wcond.monitor.WeightMonitor")

    class WeightMetrics(pl.Callback):  # type: ignore[misc,name-defined]
        """Lightning callback logging inspect metrics of the module's weights to the trainer's loggers.

        Logs at the start of training and every ``every_n_steps`` optimizer steps (the trainer's
        ``global_step``), on global rank 0, through every logger the trainer has (TensorBoard,
        CSV, W&B, ...). Arguments as :class:`WeightMonitor`; the latest values are in ``last``.

        Example:
            >>> trainer = lightning.Trainer(
            ...     callbacks=[WeightMetrics(every_n_steps=200, metrics=["acv_mean"], layers="*conv*")]
            ... )
        """

        def __init__(
            self,
            every_n_steps: int = DEFAULT_EVERY_N_STEPS,
            metrics: Sequence[str] = DEFAULT_METRICS,
            layers: str | Sequence[str] = (),
            exclude: str | Sequence[str] = (),
            tau_cos: float = TAU_COS,
            tau_euc: float = TAU_EUC,
            prefix: str = DEFAULT_PREFIX,
        ):
            super().__init__()
            self.monitor = WeightMonitor(
                every_n_steps, metrics, layers, exclude, tau_cos, tau_euc, prefix
            )
            self._logged_step: int | None = None

        @property
        def last(self) -> dict[str, float]:
            return self.monitor.last

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            self._log(trainer, pl_module)

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            # global_step counts optimizer steps; with gradient accumulation several batches share one.
            if self.monitor.due(trainer.global_step) and trainer.global_step != self._logged_step:
                self._log(trainer, pl_module)

        def _log(self, trainer: Any, pl_module: Any) -> None:
            self._logged_step = trainer.global_step
            if not trainer.is_global_zero:
                return  # loggers write on rank 0 only; DDP replicas hold the same weights
            values = self.monitor.compute(pl_module)
            for logger in trainer.loggers:
                logger.log_metrics(values, step=trainer.global_step)

    WeightMetrics.__module__ = __name__
    return WeightMetrics
