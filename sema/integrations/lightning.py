"""``SwitchEMACallback``: Switch EMA inside the Lightning ``Trainer``.

Uses ``lightning.pytorch`` (``pip install lightning``), or the standalone ``pytorch_lightning``
package when ``lightning`` is not installed. The callback's :class:`sema.SwitchEMA` is ``.ema``.

What happens when (the Lightning hooks):

- ``on_fit_start``: the EMA is built. The strategy has moved the model to its device and dtype
  by then; the optimizer already exists, which is fine: ``SwitchEMA`` keeps the ``Parameter``
  objects and only re-points ``param.data`` into its flat buckets. A state restored from a
  checkpoint (``ckpt_path=``) is loaded into it here.
- ``on_train_batch_end``: ``ema.update()`` once per optimizer step (``trainer.global_step``
  moved), so ``accumulate_grad_batches=N`` gives one update per N batches.
- ``on_train_epoch_end``: ``ema.epoch_end()``, the SEMA switch (``switch_every="epoch"``). It runs
  before ``ModelCheckpoint`` saves at the end of the epoch, so the checkpoint holds the switched
  model and the EMA state that goes with it.
- validation (``validate_on="ema"``): the model holds the EMA through ``ema.swapped()`` from
  ``on_validation_start`` to ``on_validation_end``, restored bit for bit afterwards (also when
  validation raises). ``validate_on="live"`` validates the live weights.
- ``state_dict`` / ``load_state_dict``: the EMA state travels in Lightning checkpoints, so a
  resumed ``fit`` continues the same trajectory.
- ``on_train_end`` with ``switch_at_end=True``: ``ema.switch()``, so the model holds the EMA when
  ``fit`` returns (useful with ``switch_every=None``, a plain EMA; with the default policy the
  last epoch already switched).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from sema.integrations import EvaluationSwap, check_callback_args, ensure_ema, log_switch
from sema.switch_ema import SwitchEMA

try:
    import lightning.pytorch as pl
except ImportError:
    try:
        import pytorch_lightning as pl
    except ImportError as exc:
        raise ImportError(
            "sema.integrations.lightning needs Lightning: pip install lightning (or pip install 'sema[lightning]')"
        ) from exc

__all__ = ["SwitchEMACallback"]


class SwitchEMACallback(pl.Callback):
    """Switch EMA for the Lightning ``Trainer``: update after every optimizer step, switch at the
    end of every training epoch, validate on the EMA, checkpoint and resume the EMA state.

    Args:
        decay: the EMA decay, as for :class:`sema.SwitchEMA`.
        validate_on: ``"ema"`` (validation sees the EMA weights, through ``swapped()``) or
            ``"live"`` (the weights being trained).
        switch_at_end: switch the EMA into the model when training ends.
        **ema_kwargs: every other :class:`sema.SwitchEMA` argument (``warmup``, ``switch_every``,
            ``buffers``, ``ema_dtype``, ``backend``, ...).

    Example::

        callback = SwitchEMACallback(decay=0.999, validate_on="ema")
        trainer = lightning.pytorch.Trainer(max_epochs=10, callbacks=[callback])
        trainer.fit(model, train_loader, val_loader)
        export = callback.ema.averaged_state_dict()
    """

    def __init__(
        self,
        decay: float = 0.999,
        *,
        validate_on: str = "ema",
        switch_at_end: bool = False,
        **ema_kwargs: Any,
    ) -> None:
        super().__init__()
        self.ema_kwargs = check_callback_args("SwitchEMACallback", validate_on, {"decay": decay, **ema_kwargs})
        self.validate_on = validate_on
        self.switch_at_end = bool(switch_at_end)
        self.ema: SwitchEMA | None = None
        self._pending_state: dict[str, Any] | None = None
        self._last_global_step = 0
        self._swap = EvaluationSwap()

    @property
    def state_key(self) -> str:
        # Two callbacks with different settings keep separate states in one checkpoint.
        return self._generate_state_key(**{k: self.ema_kwargs[k] for k in sorted(self.ema_kwargs)})

    # --- building the EMA ------------------------------------------------------------------

    def _build(self, module: nn.Module) -> SwitchEMA:
        self.ema = ensure_ema(self.ema, module, self.ema_kwargs)
        if self._pending_state is not None:
            self.ema.load_state_dict(self._pending_state)
            self._pending_state = None
        return self.ema

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Strategies that restore after setup (``restore_checkpoint_after_setup``) hand over the
        # callback state after ``on_fit_start``; it is loaded here.
        self._build(pl_module)
        self._last_global_step = trainer.global_step

    # --- training --------------------------------------------------------------------------

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step > self._last_global_step:  # an optimizer step happened in this batch
            self._last_global_step = trainer.global_step
            self.ema.update()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema.epoch_end() and trainer.is_global_zero:
            log_switch("Lightning", self.ema)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap.end()
        if self.switch_at_end:
            self.ema.switch()

    # --- validation ------------------------------------------------------------------------

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate_on != "ema" or self.ema is None or self.ema.model is not pl_module:
            return  # no EMA of this module (trainer.validate() before any fit): the live weights
        # trainer.validate() after fit: the strategy may have moved the model since; rebuilt then.
        self._build(pl_module)
        self._swap.begin(self.ema)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap.end()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap.end()

    # --- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {} if self._pending_state is None else {"ema": self._pending_state}
        return {"ema": self.ema.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start (or, for some strategies, between
        # on_fit_start and on_train_start): the state is loaded where the EMA is (re)built.
        self._pending_state = state_dict.get("ema")
