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
- validation, test and predict (``validate_on``, ``test_on``, ``predict_on`` set to ``"ema"``,
  or ``"ema:<k>"`` for EMA ``k`` with several decays): the model holds that EMA through
  ``ema.swapped(index=k)`` from ``on_<stage>_start`` to ``on_<stage>_end``, restored bit for bit
  afterwards (also when the stage raises). ``"live"`` runs the stage on the live weights.
  ``trainer.test(model, ckpt_path=...)`` and the like take the EMA from that checkpoint.
- ``state_dict`` / ``load_state_dict``: the EMA state travels in Lightning checkpoints, so a
  resumed ``fit`` continues the same trajectory.
- ``on_save_checkpoint`` with ``checkpoint_weights="ema"`` (or ``"ema:<k>"``): the checkpoint's
  ``state_dict`` holds the weights of that EMA (so ``Model.load_from_checkpoint(path)`` gives the
  averaged model) and the live weights go to ``checkpoint["sema_live_state_dict"]``;
  ``on_load_checkpoint`` puts them back into the model, so resuming (``ckpt_path=``) continues bit
  for bit either way.
- ``on_train_end`` with ``switch_at_end=True``: ``ema.switch()`` (EMA 0), so the model holds the
  EMA when ``fit`` returns (useful with ``switch_every=None``, a plain EMA; with the default
  policy the last epoch already switched).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sema.integrations import EvaluationSwap, check_callback_args, ensure_ema, log_switch, weights_index
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

LIVE_STATE_KEY = "sema_live_state_dict"
CHECKPOINT_WEIGHTS = ("live", "ema")
WEIGHTS_CHOICES = ("validate_on", "test_on", "predict_on", "checkpoint_weights")

__all__ = ["CHECKPOINT_WEIGHTS", "LIVE_STATE_KEY", "SwitchEMACallback"]


class SwitchEMACallback(pl.Callback):
    """Switch EMA for the Lightning ``Trainer``: update after every optimizer step, switch at the
    end of every training epoch, validate on the EMA, checkpoint and resume the EMA state.

    Args:
        decay: the EMA decay, as for :class:`sema.SwitchEMA`; a tuple ``(d0, d1, ...)`` keeps one
            EMA per decay, all updated in one pass (EMA 0 is the one switched into the model).
        validate_on: ``"ema"`` (validation sees EMA 0, through ``swapped()``), ``"ema:<k>"``
            (EMA ``k`` of several decays: ``"ema:1"`` is ``d1``'s) or ``"live"`` (the weights
            being trained). Checked against the number of decays when the callback is made.
        test_on: the same for ``trainer.test``; ``"live"`` by default, as before this option.
        predict_on: the same for ``trainer.predict``; ``"live"`` by default.
        checkpoint_weights: ``"live"`` (default): the checkpoint's ``state_dict`` holds the live
            weights. ``"ema"`` (EMA 0) or ``"ema:<k>"`` (EMA ``k``): it holds that EMA's weights
            (cast to the param dtypes), and the live weights go to
            ``checkpoint["sema_live_state_dict"]``, from which this callback restores them when a
            run resumes. Checkpoints written with ``save_weights_only=True`` call no
            callback hook in Lightning and keep the live weights.
        switch_at_end: switch the EMA into the model when training ends.
        **ema_kwargs: every other :class:`sema.SwitchEMA` argument (``warmup``, ``switch_every``,
            ``buffers``, ``ema_dtype``, ``backend``, ...).

    Example::

        callback = SwitchEMACallback(decay=(0.999, 0.9999), validate_on="ema:1")
        trainer = lightning.pytorch.Trainer(max_epochs=10, callbacks=[callback])
        trainer.fit(model, train_loader, val_loader)       # switches EMA 0, validates on EMA 1
        export = callback.ema.averaged_state_dict(index=1)
    """

    def __init__(
        self,
        decay: float | Sequence[float] = 0.999,
        *,
        validate_on: str = "ema",
        test_on: str = "live",
        predict_on: str = "live",
        checkpoint_weights: str = "live",
        switch_at_end: bool = False,
        **ema_kwargs: Any,
    ) -> None:
        super().__init__()
        self.ema_kwargs = check_callback_args("SwitchEMACallback", validate_on, {"decay": decay, **ema_kwargs})
        self.validate_on = validate_on
        self.test_on = test_on
        self.predict_on = predict_on
        self.checkpoint_weights = checkpoint_weights
        for name in WEIGHTS_CHOICES:
            self._index(name)
        self.switch_at_end = bool(switch_at_end)
        self.ema: SwitchEMA | None = None
        self._pending_state: dict[str, Any] | None = None
        self._last_global_step = 0
        self._swap = EvaluationSwap()

    def _index(self, name: str) -> int | None:
        """The EMA index that the choice ``name`` (``validate_on``, ...) names; None: live weights."""
        return weights_index("SwitchEMACallback", name, getattr(self, name), self.ema_kwargs)

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

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._index("checkpoint_weights") is None:
            return
        weight_averaging = getattr(pl.callbacks, "WeightAveraging", ())
        rivals = [
            type(cb).__name__
            for cb in trainer.callbacks
            if cb is not self
            and (
                (isinstance(cb, SwitchEMACallback) and cb._index("checkpoint_weights") is not None)
                or isinstance(cb, weight_averaging)
            )
        ]
        if rivals:
            raise ValueError(
                "SwitchEMACallback(checkpoint_weights='ema') writes the checkpoint's state_dict, and so do "
                f"{', '.join(rivals)} in this trainer; keep checkpoint_weights='ema' on one callback only"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._build(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Strategies that restore after setup (``restore_checkpoint_after_setup``) hand over the
        # callback state after ``on_fit_start``; it is loaded here.
        self._build(pl_module)
        self._last_global_step = trainer.global_step

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        # ema_device='cpu' or overlap=True: the step must not write params the update has not read.
        # Here, not in an optimizer pre-step hook: Lightning runs forward and backward inside
        # optimizer.step(closure), and they should run beside the update.
        if self.ema is not None:
            self.ema.wait()

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

    # --- validation, test, predict ---------------------------------------------------------

    def _begin_stage(self, on: str, pl_module: pl.LightningModule) -> None:
        index = self._index(on)
        if index is None:
            return
        if (self.ema is None or self.ema.model is not pl_module) and self._pending_state is None:
            return  # no EMA of this module (evaluated before any fit, no checkpoint): the live weights
        # After fit the strategy may have moved the model (rebuilt then); a checkpoint given to
        # trainer.validate/test/predict(ckpt_path=...) brings its EMA state (loaded then).
        self._build(pl_module)
        self._swap.begin(self.ema, index)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin_stage("validate_on", pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap.end()

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin_stage("test_on", pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap.end()

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin_stage("predict_on", pl_module)

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap.end()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap.end()

    # --- checkpoints -----------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        # A state loaded from a checkpoint and not yet built into the EMA is the newer one
        # (trainer.test(ckpt_path=...) with test_on="live" loads it and builds nothing).
        if self._pending_state is not None:
            return {"ema": self._pending_state}
        return {} if self.ema is None else {"ema": self.ema.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before on_fit_start (or, for some strategies, between
        # on_fit_start and on_train_start): the state is loaded where the EMA is (re)built.
        self._pending_state = state_dict.get("ema")

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        index = self._index("checkpoint_weights")
        if index is None or self.ema is None or self.ema.model is not pl_module:
            return
        if LIVE_STATE_KEY in checkpoint:
            raise RuntimeError(
                f"SwitchEMACallback: checkpoint[{LIVE_STATE_KEY!r}] is already set; another callback wrote the "
                "state_dict; keep checkpoint_weights='ema' on one callback only"
            )
        live = checkpoint["state_dict"]
        averaged = self._build(pl_module).averaged_state_dict(index=index)
        unknown = sorted(set(averaged) - set(live))
        if unknown:
            raise RuntimeError(
                f"SwitchEMACallback(checkpoint_weights='ema'): the strategy's checkpoint state_dict lacks "
                f"{unknown[:5]} of the model's state_dict; use checkpoint_weights='live' with this strategy "
                "and export callback.ema.averaged_state_dict() instead"
            )
        checkpoint[LIVE_STATE_KEY] = live
        checkpoint["state_dict"] = {name: averaged.get(name, value) for name, value in live.items()}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning has loaded checkpoint["state_dict"] (here the EMA) into the model already;
        # the live weights replace it, whatever this callback's checkpoint_weights says.
        live = checkpoint.get(LIVE_STATE_KEY)
        if live is not None:
            trainer.strategy.load_model_state_dict({"state_dict": live}, strict=pl_module.strict_loading)
