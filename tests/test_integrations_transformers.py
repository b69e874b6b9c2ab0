"""SwitchEMACallback with the real Hugging Face Trainer on the CPU: a tiny BERT built from a
config (nothing downloaded), per-step updates with gradient accumulation, the switch at every
epoch end, evaluation on the EMA, the EMA state beside each checkpoint and a bit-identical resume."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import assert_bits_equal

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'sema[transformers]')"
)
pytest.importorskip("accelerate", reason="accelerate is not installed (transformers.Trainer needs it)")

from sema.integrations.transformers import EMA_STATE_NAME, SwitchEMACallback  # noqa: E402

DECAY = 0.8
SAMPLES, SEQ, BATCH, ACCUMULATE = 48, 8, 8, 2  # 6 batches, 3 optimizer steps per epoch
STEPS_PER_EPOCH = 3

# The per-step EMA against a torch.lerp_ reference: fp32 math in both (a skipped or doubled
# update is off by far more).
TOLERANCE = dict(rtol=1e-6, atol=1e-7)


def tiny_bert(seed: int) -> transformers.PreTrainedModel:
    config = transformers.BertConfig(
        vocab_size=64,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=SEQ,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(config)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.input_ids = torch.randint(0, 64, (n, SEQ), generator=g)
        self.labels = (self.input_ids[:, 0] >= 32).long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


def make_trainer(output_dir, model, callbacks, **overrides) -> transformers.Trainer:
    settings = dict(
        output_dir=str(output_dir),
        num_train_epochs=2,
        per_device_train_batch_size=BATCH,
        per_device_eval_batch_size=16,
        gradient_accumulation_steps=ACCUMULATE,
        learning_rate=5e-3,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    settings.update(overrides)
    return transformers.Trainer(
        model=model,
        args=transformers.TrainingArguments(**settings),
        train_dataset=TokenDataset(SAMPLES, seed=1),
        eval_dataset=TokenDataset(16, seed=2),
        callbacks=callbacks,
    )


def params_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def emas_of(callback: SwitchEMACallback) -> dict[str, torch.Tensor]:
    return {n: e.clone() for n, e in callback.ema.state_dict()["ema"].items()}


class EmaOracle(transformers.TrainerCallback):
    """After SwitchEMACallback in the list: its own torch.lerp_ EMA of the live params after each
    optimizer step; at each epoch end the model must hold the EMA (cast)."""

    def __init__(self, sema_callback: SwitchEMACallback) -> None:
        self.sema_callback = sema_callback
        self.reference: dict[str, torch.Tensor] = {}
        self.epoch_checks = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.reference = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for n, p in model.named_parameters():
            self.reference[n].lerp_(p.detach().float(), 1.0 - DECAY)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        ema = self.sema_callback.ema
        assert ema.step == state.global_step, f"{ema.step} EMA updates for {state.global_step} optimizer steps"
        assert ema.num_switches == round(state.epoch)
        emas = emas_of(self.sema_callback)
        for n, p in model.named_parameters():
            torch.testing.assert_close(emas[n], self.reference[n], **TOLERANCE, msg=f"EMA of {n}")
            assert_bits_equal(p.detach().reshape(-1), emas[n].to(p.dtype).reshape(-1), f"epoch {state.epoch} {n}")
        self.epoch_checks += 1


def test_train_updates_per_optimizer_step_and_switches_every_epoch(tmp_path):
    model = tiny_bert(seed=0)
    callback = SwitchEMACallback(decay=DECAY)
    oracle = EmaOracle(callback)
    trainer = make_trainer(tmp_path, model, [callback, oracle])
    trainer.train()
    assert oracle.epoch_checks == 2
    assert trainer.state.global_step == 2 * STEPS_PER_EPOCH


class EvaluationProbe(transformers.TrainerCallback):
    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.inside: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.before = params_of(model)

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        self.inside = params_of(model)

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.after = params_of(model)


def eval_loss_of(trainer: transformers.Trainer) -> float:
    return trainer.evaluate()["eval_loss"]


@pytest.mark.parametrize("validate_on", ["ema", "live"])
def test_evaluation_during_training_uses_the_weights_asked_for(tmp_path, validate_on):
    model = tiny_bert(seed=0)
    # switch_every=None (a plain EMA) keeps the live weights and the EMA apart at every evaluation.
    callback = SwitchEMACallback(decay=DECAY, switch_every=None, validate_on=validate_on)
    probe = EvaluationProbe()
    trainer = make_trainer(tmp_path, model, [callback, probe])
    trainer.train()
    logged = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry][-1]
    before, inside, after = probe.before, probe.inside, probe.after  # the evaluations below run the probe too

    live_loss = eval_loss_of(trainer)  # by hand: the live weights
    with callback.ema.swapped():
        ema_loss = eval_loss_of(trainer)
        ema_weights = params_of(model)
    assert abs(ema_loss - live_loss) > 1e-4 * live_loss, "the test needs the EMA and the live weights apart"
    expected = ema_loss if validate_on == "ema" else live_loss
    assert logged == pytest.approx(expected, rel=1e-6), f"eval_loss {logged}, EMA {ema_loss}, live {live_loss}"
    seen = ema_weights if validate_on == "ema" else before
    for n, p in inside.items():
        assert_bits_equal(p.reshape(-1), seen[n].reshape(-1), f"{n} inside evaluation")
    for n, p in after.items():  # the live weights came back bit for bit
        assert_bits_equal(p.reshape(-1), before[n].reshape(-1), f"{n} after evaluation")


class CrashAt(transformers.TrainerCallback):
    def __init__(self, global_step: int) -> None:
        self.global_step = global_step

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.global_step:
            raise RuntimeError("simulated crash")


def test_kill_and_resume_from_epoch_1_checkpoint_is_bit_identical(tmp_path):
    settings = dict(decay=DECAY, warmup="linear", warmup_steps=5)  # the warmup spans the restart

    reference_model = tiny_bert(seed=0)
    reference = SwitchEMACallback(**settings)
    make_trainer(tmp_path / "a", reference_model, [reference]).train()

    killed_model = tiny_bert(seed=0)
    killed = make_trainer(
        tmp_path / "b",
        killed_model,
        [SwitchEMACallback(**settings), CrashAt(STEPS_PER_EPOCH + 1)],
        save_strategy="epoch",
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        killed.train()
    checkpoint = tmp_path / "b" / f"checkpoint-{STEPS_PER_EPOCH}"
    assert (checkpoint / EMA_STATE_NAME).is_file(), sorted(os.listdir(checkpoint))

    resumed_model = tiny_bert(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed = SwitchEMACallback(**settings)
    trainer = make_trainer(tmp_path / "b", resumed_model, [resumed], save_strategy="epoch")
    trainer.train(resume_from_checkpoint=True)

    assert trainer.state.global_step == 2 * STEPS_PER_EPOCH == resumed.ema.step
    assert resumed.ema.num_switches == 2
    expected_params, expected_emas = params_of(reference_model), emas_of(reference)
    for n, p in params_of(resumed_model).items():
        assert_bits_equal(p.reshape(-1), expected_params[n].reshape(-1), f"param {n}")
    for n, e in emas_of(resumed).items():
        assert_bits_equal(e.reshape(-1), expected_emas[n].reshape(-1), f"EMA {n}")
    final = torch.load(tmp_path / "b" / f"checkpoint-{2 * STEPS_PER_EPOCH}" / EMA_STATE_NAME, weights_only=True)
    assert final["global_step"] == 2 * STEPS_PER_EPOCH
    for n, e in emas_of(resumed).items():
        assert_bits_equal(final["ema"]["ema"][n].reshape(-1), e.reshape(-1), f"saved EMA {n}")


def test_resume_without_ema_state_raises_naming_the_paths(tmp_path):
    first = make_trainer(tmp_path, tiny_bert(seed=0), [SwitchEMACallback(decay=DECAY)], save_strategy="epoch")
    first.train()
    for step in (STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH):
        os.remove(tmp_path / f"checkpoint-{step}" / EMA_STATE_NAME)
    second = make_trainer(
        tmp_path, tiny_bert(seed=0), [SwitchEMACallback(decay=DECAY)], save_strategy="epoch", num_train_epochs=3
    )
    with pytest.raises(FileNotFoundError, match=f"checkpoint-{2 * STEPS_PER_EPOCH}.*resume_from_checkpoint"):
        second.train(resume_from_checkpoint=True)


def test_bad_arguments_raise_when_the_callback_is_made():
    with pytest.raises(ValueError, match="validate_on"):
        SwitchEMACallback(validate_on="best")
    with pytest.raises(TypeError, match="SwitchEMA takes"):
        SwitchEMACallback(decay_rate=0.9)
