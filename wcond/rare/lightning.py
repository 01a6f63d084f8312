"""DynamicFusion as a Lightning callback, built on first use so that wcond needs Lightning only for it."""

from __future__ import annotations

from typing import Any

from wcond.errors import UsageError
from wcond.lightning_import import import_lightning
from wcond.rare.fusion import LAMBDA_L2, LAMBDA_RARE, DynamicFusion

__all__ = ["lightning_callback"]


def lightning_callback() -> type:
    pl = import_lightning("wcond.rare.DynamicFusionCallback", "wcond.rare.DynamicFusion")

    class DynamicFusionCallback(pl.Callback):  # type: ignore[misc,name-defined]
        """Lightning callback: :class:`DynamicFusion` on the LightningModule, with the paper's loss.

        At the start of fitting it wraps the module's layers (keyword arguments as
        DynamicFusion's) with the trainer's optimizer (one optimizer); after each backward pass
        it adds the gradient of ``rare * rare_loss() + l2 * l2_loss()`` (0 and 0 leave the loss
        alone), scaled as the trainer scales the task loss (gradient accumulation, a 16-bit
        mixed-precision scaler); after each optimizer step it calls ``step()``. The wrapper is
        ``self.fusion``: ``callback.fusion.export("small.safetensors")`` after ``trainer.fit``.

        Example:
            >>> fusion = DynamicFusionCallback(frobenius=True)
            >>> lightning.Trainer(callbacks=[fusion]).fit(module, data)
            >>> fusion.fusion.export("small.safetensors")
        """

        def __init__(
            self, *, rare: float = LAMBDA_RARE, l2: float = LAMBDA_L2, **fusion_kwargs: Any
        ) -> None:
            super().__init__()
            self.rare, self.l2 = rare, l2
            self.fusion_kwargs = fusion_kwargs
            self.fusion: DynamicFusion | None = None
            self._stepped: int | None = None

        def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
            if self.fusion is not None:
                return  # a second fit() on the same module goes on with the same factorization
            if len(trainer.optimizers) != 1:
                raise UsageError(
                    f"DynamicFusionCallback needs exactly one optimizer; the trainer has "
                    f"{len(trainer.optimizers)}"
                )
            self.fusion = DynamicFusion(pl_module, trainer.optimizers[0], **self.fusion_kwargs)
            self._stepped = trainer.global_step

        def on_after_backward(self, trainer: Any, pl_module: Any) -> None:
            if self.fusion is None or not (self.rare or self.l2):
                return
            scaler = getattr(trainer.precision_plugin, "scaler", None)
            scale = float(scaler.get_scale()) if scaler is not None else 1.0
            reg = self.fusion.regularizer(self.rare, self.l2)
            (reg * (scale / trainer.accumulate_grad_batches)).backward()

        def on_train_batch_end(
            self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            # global_step counts optimizer steps; with gradient accumulation several batches share one.
            if self.fusion is not None and trainer.global_step != self._stepped:
                self._stepped = trainer.global_step
                self.fusion.step()

    DynamicFusionCallback.__module__ = "wcond.rare"
    return DynamicFusionCallback
