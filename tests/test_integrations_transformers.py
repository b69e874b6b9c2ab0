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
from sema.switch_ema import SwitchEMA  # noqa: E402

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


@pytest.mark.parametrize("offload", [False, True], ids=["plain", "offload"])
def test_train_updates_per_optimizer_step_and_switches_every_epoch(tmp_path, offload):
    model = tiny_bert(seed=0)
    offloaded = {"ema_device": "cpu", "offload_chunk_elements": 999} if offload else {}
    callback = SwitchEMACallback(decay=DECAY, **offloaded)
    oracle = EmaOracle(callback)
    trainer = make_trainer(tmp_path, model, [callback, oracle])
    attached = []
    original = SwitchEMA.attach

    def counted(ema, optimizer):
        attached.append(optimizer)
        return original(ema, optimizer)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SwitchEMA, "attach", counted)
        trainer.train()
    assert oracle.epoch_checks == 2
    assert trainer.state.global_step == 2 * STEPS_PER_EPOCH
    assert attached == [trainer.optimizer]  # each optimizer step waits for the update to have read the params
    assert not callback._attached
    assert (callback.ema.ema_device is not None) == offload


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


class LiveWeightsAtEnd(transformers.TrainerCallback):
    """Placed before SwitchEMACallback: the live params when training ends, before any switch."""

    def __init__(self) -> None:
        self.live: dict[str, torch.Tensor] = {}

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.live = params_of(model)


def saved_weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def assert_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    assert sorted(got) == sorted(expected), where
    for n, t in got.items():
        assert_bits_equal(t.reshape(-1), expected[n].reshape(-1), f"{where}: {n}")


@pytest.mark.parametrize("switch_at_end", [True, False])
def test_save_model_after_training_writes_the_weights_asked_for(tmp_path, switch_at_end):
    model = tiny_bert(seed=0)
    probe = LiveWeightsAtEnd()
    callback = SwitchEMACallback(decay=DECAY, switch_every=None, switch_at_end=switch_at_end)
    trainer = make_trainer(tmp_path, model, [probe, callback], eval_strategy="no")
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    averaged = callback.ema.averaged_state_dict()
    ema = {n: averaged[n] for n in probe.live}
    assert all(not torch.equal(ema[n], probe.live[n]) for n in ema), "the test needs the EMA and the live weights apart"
    saved = saved_weights(tmp_path / "final")
    expected = ema if switch_at_end else probe.live
    assert_weights({n: saved[n] for n in expected}, expected, "saved model")
    assert_weights(params_of(model), expected, "model after train()")


def test_switch_at_end_with_load_best_model_at_end_switches_the_best_checkpoints_ema(tmp_path):
    model = tiny_bert(seed=0)
    callback = SwitchEMACallback(decay=DECAY, switch_every=None, switch_at_end=True)
    trainer = make_trainer(
        tmp_path,
        model,
        [callback],
        save_strategy="epoch",
        load_best_model_at_end=True,
        metric_for_best_model="order",
        greater_is_better=False,
    )
    evaluations = iter([0.0, 1.0])  # the first epoch's checkpoint is the best: an earlier one
    trainer.compute_metrics = lambda prediction: {"order": next(evaluations)}
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and best.endswith(f"checkpoint-{STEPS_PER_EPOCH}"), best
    best_ema = torch.load(os.path.join(best, EMA_STATE_NAME), weights_only=True)["ema"]["ema"]
    final_ema = torch.load(tmp_path / f"checkpoint-{2 * STEPS_PER_EPOCH}" / EMA_STATE_NAME, weights_only=True)["ema"][
        "ema"
    ]
    best_live = saved_weights(best)
    assert all(not torch.equal(best_ema[n], final_ema[n]) for n in best_ema), "the test needs two different EMAs"
    assert all(not torch.equal(best_ema[n], best_live[n]) for n in best_ema), "and the EMA apart from the live weights"
    assert_weights(params_of(model), best_ema, "model after train()")
    assert callback.ema.step == STEPS_PER_EPOCH  # the EMA state is that of the best checkpoint


def test_migration_arguments_pass_through_the_callback(tmp_path):
    # warmup="inverse": decay min(DECAY, (1 + n) / (10 + n)) at the n-th update; exclude: biases are not averaged.
    model = tiny_bert(seed=0)
    callback = SwitchEMACallback(decay=DECAY, switch_every=None, warmup="inverse", exclude="*.bias")
    history: list[dict[str, torch.Tensor]] = []

    class Recorder(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            history.append(params_of(model))

    initial = params_of(model)
    make_trainer(tmp_path, model, [callback, Recorder()], eval_strategy="no").train()
    emas = emas_of(callback)
    weights = sorted(n for n in initial if not n.endswith(".bias"))
    assert sorted(emas) == weights and len(history) == callback.ema.step == 2 * STEPS_PER_EPOCH
    for n in weights:
        reference = initial[n].clone()
        for count, params in enumerate(history, start=1):
            reference.lerp_(params[n], 1.0 - min(DECAY, (1 + count) / (10 + count)))
        torch.testing.assert_close(emas[n], reference, **TOLERANCE, msg=f"EMA of {n}")


def test_peft_lora_params_are_averaged_evaluated_and_saved(tmp_path):
    peft = pytest.importorskip("peft", reason="peft is not installed (pip install peft)")
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], init_lora_weights=False)
    model = peft.get_peft_model(tiny_bert(seed=0), config)
    lora = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert lora and all(".lora_A." in n or ".lora_B." in n for n in lora)
    frozen = {n: p for n, p in params_of(model).items() if n not in lora}

    callback = SwitchEMACallback(decay=DECAY, switch_every=None, switch_at_end=True)
    oracle = EmaOracle(callback)
    oracle.on_epoch_end = lambda *args, **kwargs: None  # no switches here; the EMA is checked below
    probe = EvaluationProbe()
    trainer = make_trainer(tmp_path, model, [callback, oracle, probe], label_names=["labels"])
    trainer.train()

    emas = emas_of(callback)
    assert sorted(emas) == lora  # only the trainable (LoRA) params are averaged
    for n in lora:
        torch.testing.assert_close(emas[n], oracle.reference[n], **TOLERANCE, msg=f"EMA of {n}")
        assert not torch.equal(emas[n], probe.before[n]), "the test needs the EMA and the live weights apart"
    # The last evaluation (end of epoch 2, after the last update) saw the EMA, the live weights came back.
    assert_weights({n: probe.inside[n] for n in lora}, emas, "LoRA params inside evaluation")
    assert_weights({n: probe.after[n] for n in lora}, {n: probe.before[n] for n in lora}, "after evaluation")
    assert_weights({n: p for n, p in params_of(model).items() if n not in lora}, frozen, "frozen params")

    trainer.save_model(str(tmp_path / "adapter"))
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    expected = peft.get_peft_model_state_dict(model, state_dict=callback.ema.averaged_state_dict())
    assert len(saved) == len(lora)
    assert_weights(saved, expected, "saved adapter")


DECAYS = (DECAY, 0.95)  # two EMAs far apart after a few steps


def all_emas_of(callback: SwitchEMACallback) -> list[dict[str, torch.Tensor]]:
    saved = callback.ema.state_dict()["ema"]
    assert isinstance(saved, list) and len(saved) == len(callback.ema.decays), "the state holds every EMA"
    return [{n: e.clone() for n, e in one.items()} for one in saved]


class TwoEmaProbe(transformers.TrainerCallback):
    """After SwitchEMACallback in the list: its own torch.lerp_ EMA per decay after each optimizer
    step; at each epoch end (after the switch, before the evaluation) both averaged weights and the
    live params; then the params the evaluation sees and those after it."""

    def __init__(self, sema_callback: SwitchEMACallback) -> None:
        self.sema_callback = sema_callback
        self.reference: list[dict[str, torch.Tensor]] = []
        self.expected: list[list[dict[str, torch.Tensor]]] = []
        self.before: list[dict[str, torch.Tensor]] = []
        self.inside: list[dict[str, torch.Tensor]] = []
        self.after: list[dict[str, torch.Tensor]] = []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.reference = [{n: p.detach().float().clone() for n, p in model.named_parameters()} for _ in DECAYS]

    def on_step_end(self, args, state, control, model=None, **kwargs):
        for reference, decay in zip(self.reference, DECAYS, strict=True):
            for n, p in model.named_parameters():
                reference[n].lerp_(p.detach().float(), 1.0 - decay)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        ema = self.sema_callback.ema
        self.expected.append([dict(ema.averaged_state_dict(index=k)) for k in range(len(DECAYS))])
        self.before.append(params_of(model))

    def on_prediction_step(self, args, state, control, model=None, **kwargs):
        if len(self.inside) < len(self.expected):
            self.inside.append(params_of(model))

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        self.after.append(params_of(model))


def test_two_decays_train_and_evaluate_on_ema_1(tmp_path):
    model = tiny_bert(seed=0)
    callback = SwitchEMACallback(decay=DECAYS, validate_on="ema:1")
    probe = TwoEmaProbe(callback)
    trainer = make_trainer(tmp_path, model, [callback, probe])
    trainer.train()

    assert callback.ema.decays == DECAYS
    assert callback.ema.step == trainer.state.global_step == 2 * STEPS_PER_EPOCH and callback.ema.num_switches == 2
    emas = all_emas_of(callback)
    for k, reference in enumerate(probe.reference):
        for n, e in emas[k].items():
            torch.testing.assert_close(e, reference[n], **TOLERANCE, msg=f"EMA {k} of {n}")
    # The epoch end switched EMA 0 (not EMA 1) into the model.
    assert_weights(params_of(model), {n: emas[0][n] for n in params_of(model)}, "model after train()")
    assert len(probe.expected) == len(probe.inside) == len(probe.after) == 2
    for epoch in range(2):
        expected, inside = probe.expected[epoch], probe.inside[epoch]
        assert all(not torch.equal(expected[0][n], expected[1][n]) for n in inside), "the test needs the EMAs apart"
        assert_weights(inside, {n: expected[1][n] for n in inside}, f"epoch {epoch}: inside evaluation")
        assert_weights(probe.after[epoch], probe.before[epoch], f"epoch {epoch}: after evaluation")
    logged = [entry["eval_loss"] for entry in trainer.state.log_history if "eval_loss" in entry][-1]
    with callback.ema.swapped(index=1):
        ema_1_loss = eval_loss_of(trainer)
    assert logged == pytest.approx(ema_1_loss, rel=1e-6)


def test_two_decays_kill_and_resume_is_bit_identical(tmp_path):
    settings = dict(decay=DECAYS, warmup="linear", warmup_steps=5, validate_on="ema:1")

    reference_model = tiny_bert(seed=0)
    reference = SwitchEMACallback(**settings)
    make_trainer(tmp_path / "a", reference_model, [reference]).train()

    killed = make_trainer(
        tmp_path / "b",
        tiny_bert(seed=0),
        [SwitchEMACallback(**settings), CrashAt(STEPS_PER_EPOCH + 1)],
        save_strategy="epoch",
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        killed.train()
    saved = torch.load(tmp_path / "b" / f"checkpoint-{STEPS_PER_EPOCH}" / EMA_STATE_NAME, weights_only=True)
    assert len(saved["ema"]["ema"]) == 2 and saved["ema"]["config"]["decays"] == list(DECAYS)

    resumed_model = tiny_bert(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed = SwitchEMACallback(**settings)
    trainer = make_trainer(tmp_path / "b", resumed_model, [resumed], save_strategy="epoch")
    trainer.train(resume_from_checkpoint=True)

    assert trainer.state.global_step == 2 * STEPS_PER_EPOCH == resumed.ema.step and resumed.ema.num_switches == 2
    assert_weights(params_of(resumed_model), params_of(reference_model), "params")
    for k, (got, expected) in enumerate(zip(all_emas_of(resumed), all_emas_of(reference), strict=True)):
        assert_weights(got, expected, f"EMA {k}")


def test_an_ema_index_out_of_range_or_malformed_is_refused_when_the_callback_is_made():
    with pytest.raises(ValueError, match=r"validate_on='ema:2' names EMA 2, but decay=\(0.8, 0.95\) keeps 2 EMAs"):
        SwitchEMACallback(decay=DECAYS, validate_on="ema:2")
    with pytest.raises(ValueError, match=r"validate_on='ema:1' names EMA 1, .* keeps 1 EMA;"):
        SwitchEMACallback(decay=DECAY, validate_on="ema:1")
    with pytest.raises(ValueError, match=r"validate_on=\('ema', 1\) is not one of .*write validate_on='ema:1'"):
        SwitchEMACallback(decay=DECAYS, validate_on=("ema", 1))
    for bad in ("ema:", "ema:-1", "ema:x", "EMA"):
        with pytest.raises(ValueError, match=r"is not one of 'live', 'ema' \(EMA 0\), 'ema:0' .. 'ema:1'"):
            SwitchEMACallback(decay=DECAYS, validate_on=bad)
