"""``SwitchEMACallback``: Switch EMA inside the Hugging Face ``transformers.Trainer``.

Needs ``transformers`` (``pip install transformers accelerate``). The callback's
:class:`sema.SwitchEMA` is ``.ema``.

What happens when (the ``TrainerCallback`` events):

- ``on_train_begin``: the EMA is built. The trainer has put the model on its device and created
  the optimizer by then, which is fine: ``SwitchEMA`` keeps the ``Parameter`` objects and only
  re-points ``param.data`` into its flat buckets. When training resumes
  (``trainer.train(resume_from_checkpoint=...)``), the EMA state saved beside the checkpoint
  is loaded.
- ``on_step_end``: ``ema.update()``, once per optimizer step (gradient accumulation included:
  micro-batches end in ``on_substep_end``).
- ``on_epoch_end``: ``ema.epoch_end()``, the SEMA switch (``switch_every="epoch"``); the
  epoch-end checkpoint is written after it, so it holds the switched model.
- evaluation during training (``validate_on="ema"``, or ``"ema:<k>"`` for EMA ``k`` with several
  decays): when the trainer is about to evaluate (``control.should_evaluate`` after
  ``on_step_end``/``on_epoch_end``), a one-shot forward pre-hook on the model enters
  ``ema.swapped(index=k)`` at the first evaluation forward; ``on_evaluate`` restores the live
  weights bit for bit, before any checkpoint is written. So only the evaluation sees the EMA:
  callbacks and logging in between see the live weights. ``trainer.evaluate()`` called by hand
  sees the live weights; wrap it in ``with callback.ema.swapped(index=k):`` for the EMA.
- ``on_save``: the EMA state goes to ``<checkpoint>/sema_switch_ema.pt`` (by the processes that
  write checkpoints, ``args.should_save``).
- ``on_train_end`` with ``switch_at_end=True``: ``ema.switch()`` (EMA 0), so the model holds the
  EMA when ``train()`` returns and ``trainer.save_model()`` writes the averaged model (for a
  ``PeftModel``, the averaged adapter). With ``load_best_model_at_end=True`` the trainer has just loaded the best
  checkpoint's live weights: the EMA saved beside that checkpoint is loaded and switched in. The
  live weights at the end are not kept in memory; the checkpoints written during training hold
  them (with the EMA state beside them, so resuming from one stays bit-identical).

Resuming: the callback does not see the path given to ``trainer.train(resume_from_checkpoint=...)``.
It takes the EMA state from ``resume_from_checkpoint`` given to the callback, else from
``TrainingArguments.resume_from_checkpoint``, else from ``<output_dir>/checkpoint-<global step>``
(what ``resume_from_checkpoint=True`` and paths inside ``output_dir`` resolve to). The state
records its global step and is refused when that is not the step the trainer resumes at.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sema.integrations import EvaluationSwap, check_callback_args, ensure_ema, log_switch, weights_index
from sema.switch_ema import SwitchEMA

try:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
except ImportError as exc:
    raise ImportError(
        "sema.integrations.transformers needs Hugging Face transformers: pip install transformers accelerate "
        "(or pip install 'sema[transformers]')"
    ) from exc

EMA_STATE_NAME = "sema_switch_ema.pt"
STATE_FORMAT = "sema.integrations.transformers.SwitchEMACallback"

__all__ = ["EMA_STATE_NAME", "SwitchEMACallback"]


def _read_saved_state(folder: str | os.PathLike[str], global_step: int | None) -> tuple[dict[str, Any] | None, str]:
    """The EMA state this callback saved in checkpoint ``folder``, or ``None`` and why not (a
    missing file, another format, or a state saved at another step than ``global_step``)."""
    path = os.path.join(os.fspath(folder), EMA_STATE_NAME)
    if not os.path.isfile(path):
        return None, f"{path} (missing)"
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("format") != STATE_FORMAT:
        return None, f"{path} (not written by this callback)"
    if global_step is not None and saved.get("global_step") != global_step:
        return None, f"{path} (saved at global step {saved.get('global_step')})"
    return saved["ema"], ""


class SwitchEMACallback(TrainerCallback):
    """Switch EMA for ``transformers.Trainer``: update after every optimizer step, switch at the
    end of every epoch, evaluate on the EMA, save and resume the EMA state with checkpoints.

    Args:
        decay: the EMA decay, as for :class:`sema.SwitchEMA`; a tuple ``(d0, d1, ...)`` keeps one
            EMA per decay, all updated in one pass (EMA 0 is the one switched into the model).
        validate_on: ``"ema"`` (evaluation during training sees EMA 0), ``"ema:<k>"`` (EMA ``k``
            of several decays: ``"ema:1"`` is ``d1``'s) or ``"live"``. Checked against the number
            of decays when the callback is made.
        switch_at_end: switch the EMA into the model when training ends (that of the best
            checkpoint with ``load_best_model_at_end=True``), so ``trainer.save_model()`` writes
            the averaged weights. The live weights are then only in the training checkpoints.
        resume_from_checkpoint: the checkpoint folder to take the EMA state from when training
            resumes, where it is not ``<output_dir>/checkpoint-<step>`` (see the module doc).
        **ema_kwargs: every other :class:`sema.SwitchEMA` argument (``warmup``, ``switch_every``,
            ``buffers``, ``ema_dtype``, ``backend``, ...).

    Example::

        callback = SwitchEMACallback(decay=(0.999, 0.9999), validate_on="ema:1")  # switches EMA 0
        trainer = transformers.Trainer(model=model, args=args, train_dataset=train, eval_dataset=val,
                                       callbacks=[callback])
        trainer.train()                       # or trainer.train(resume_from_checkpoint=True)
        export = callback.ema.averaged_state_dict(index=1)
    """

    def __init__(
        self,
        decay: float | Sequence[float] = 0.999,
        *,
        validate_on: str = "ema",
        switch_at_end: bool = False,
        resume_from_checkpoint: str | os.PathLike[str] | None = None,
        **ema_kwargs: Any,
    ) -> None:
        self.ema_kwargs = check_callback_args("SwitchEMACallback", validate_on, {"decay": decay, **ema_kwargs})
        self.validate_on = validate_on
        self.switch_at_end = bool(switch_at_end)
        self.resume_from_checkpoint = resume_from_checkpoint
        self.ema: SwitchEMA | None = None
        self._swap = EvaluationSwap()
        self._armed: torch.utils.hooks.RemovableHandle | None = None
        self._attached: list[torch.utils.hooks.RemovableHandle] = []

    def _detach(self) -> None:
        for handle in self._attached:
            handle.remove()
        self._attached = []

    # --- building and resuming -------------------------------------------------------------

    def on_train_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        **kwargs: Any,
    ) -> None:
        if model is None:
            raise RuntimeError("SwitchEMACallback: the trainer passed no model to on_train_begin")
        self._end_evaluation_swap()
        self.ema = ensure_ema(self.ema, model, self.ema_kwargs)
        # ema_device='cpu' or overlap=True: each optimizer step waits for the update to have read the params.
        self._detach()
        if optimizer is not None:
            self._attached = [self.ema.attach(optimizer)]
        if state.global_step > 0:  # a resumed run: the trainer state came from a checkpoint
            self.ema.load_state_dict(self._load_resume_state(args, state))
        if getattr(args, "eval_on_start", False):  # the trainer evaluates right after this event
            self._arm_evaluation_swap(model)

    def _load_resume_state(self, args: TrainingArguments, state: TrainerState) -> dict[str, Any]:
        candidates = [
            self.resume_from_checkpoint,
            args.resume_from_checkpoint if isinstance(args.resume_from_checkpoint, (str, os.PathLike)) else None,
            os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"),
        ]
        tried = []
        for folder in candidates:
            if folder is None:
                continue
            saved, problem = _read_saved_state(folder, state.global_step)
            if saved is not None:
                return saved
            tried.append(problem)
        raise FileNotFoundError(
            f"SwitchEMACallback: training resumes at global step {state.global_step} but no EMA state of that "
            f"step was found; tried: {'; '.join(tried)}. Pass the checkpoint folder as "
            "SwitchEMACallback(resume_from_checkpoint=...)"
        )

    # --- training --------------------------------------------------------------------------

    def on_step_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        self.ema.update()
        # The default flow callback, which runs before user callbacks, has set should_evaluate
        # by now when the trainer evaluates right after this event.
        if control.should_evaluate:
            self._arm_evaluation_swap(model)

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        model: nn.Module | None = None,
        **kwargs: Any,
    ) -> None:
        if self.ema.epoch_end() and state.is_world_process_zero:
            log_switch("transformers", self.ema)
        if control.should_evaluate:
            self._arm_evaluation_swap(model)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._detach()
        self._end_evaluation_swap()
        if not self.switch_at_end:
            return
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best is not None:
            # The trainer has loaded the best checkpoint's live weights; its EMA goes with them.
            step = os.path.basename(os.path.normpath(best)).rsplit("-", 1)[-1]
            saved, problem = _read_saved_state(best, int(step) if step.isdigit() else None)
            if saved is None:
                raise FileNotFoundError(
                    f"SwitchEMACallback(switch_at_end=True): the trainer loaded the best checkpoint {best} but its "
                    f"EMA state cannot be used: {problem}; the model keeps that checkpoint's live weights"
                )
            self.ema.load_state_dict(saved)
        self.ema.switch()

    # --- evaluation ------------------------------------------------------------------------

    def _arm_evaluation_swap(self, model: nn.Module | None) -> None:
        # The swap waits for the first evaluation forward, so callbacks and logging between
        # this event and the evaluation see the live weights.
        index = weights_index("SwitchEMACallback", "validate_on", self.validate_on, self.ema_kwargs)
        if index is None or model is None or self._armed is not None:
            return

        @torch.compiler.disable
        def swap_before_first_evaluation_forward(module: nn.Module, inputs: Any) -> None:
            self._disarm()
            if not module.training:  # a training forward means the evaluation never came
                self._swap.begin(self.ema, index)

        self._armed = model.register_forward_pre_hook(swap_before_first_evaluation_forward)

    def _disarm(self) -> None:
        armed, self._armed = self._armed, None
        if armed is not None:
            armed.remove()

    def _end_evaluation_swap(self) -> None:
        self._disarm()
        self._swap.end()

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._end_evaluation_swap()

    # --- checkpoints -----------------------------------------------------------------------

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._swap.end()
        if self.ema is None or not args.should_save:  # the processes that write checkpoint files
            return
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not os.path.isdir(folder):
            raise FileNotFoundError(
                f"SwitchEMACallback: the trainer saved a checkpoint but {folder} does not exist; "
                "the EMA state cannot be written beside it"
            )
        torch.save(
            {"format": STATE_FORMAT, "global_step": state.global_step, "ema": self.ema.state_dict()},
            os.path.join(folder, EMA_STATE_NAME),
        )
