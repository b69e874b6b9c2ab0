"""SwitchEMACallback with the real Lightning Trainer on the CPU: per-step updates (gradient
accumulation included), the switch at every epoch end, validation on the EMA, checkpoints and
a bit-identical resume. Tiny model, few steps: the whole module runs in seconds."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from conftest import assert_bits_equal
from torch import nn

from sema.integrations import check_callback_args, ensure_ema, placement_intact
from sema.switch_ema import SwitchEMA

try:
    import lightning.pytorch as pl

    from sema.integrations.lightning import SwitchEMACallback
except ImportError:  # the import test at the bottom runs all the same
    pl = SwitchEMACallback = None

requires_lightning = pytest.mark.skipif(pl is None, reason="lightning is not installed (pip install 'sema[lightning]')")
LightningModule = pl.LightningModule if pl is not None else nn.Module
Callback = pl.Callback if pl is not None else object

DECAY = 0.8  # short horizon: the EMA is far from the live weights after a few steps
FEATURES, SAMPLES, BATCH = 6, 48, 8  # 6 batches per epoch

# Tolerance of the per-step EMA against a torch.lerp_ reference, by param dtype: fp32 math in
# both, so only the order of roundings may differ (a skipped or doubled update is off by ~10%).
TOLERANCES = {torch.float32: dict(rtol=1e-6, atol=1e-7), torch.bfloat16: dict(rtol=1e-6, atol=1e-7)}


class TinyRegressor(LightningModule):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(FEATURES, 16), nn.Tanh(), nn.Linear(16, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x).float(), y.float())

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x).float(), y.float()), batch_size=len(x))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.05)


def loaders() -> tuple[torch.utils.data.DataLoader, torch.utils.data.DataLoader]:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    y = torch.sin(x.sum(1, keepdim=True))
    train = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=BATCH)
    val = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:16] + 0.1, y[:16]), batch_size=16)
    return train, val


def make_trainer(tmp_path, callbacks, max_epochs=3, checkpoint_dir=None, **kwargs):
    if checkpoint_dir is not None:
        callbacks = [*callbacks, pl.callbacks.ModelCheckpoint(dirpath=checkpoint_dir, save_top_k=-1)]
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=checkpoint_dir is not None,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        **kwargs,
    )


def params_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def emas_of(callback) -> dict[str, torch.Tensor]:
    return {n: e.clone() for n, e in callback.ema.state_dict()["ema"].items()}


class EmaOracle(Callback):
    """Placed after SwitchEMACallback: keeps its own EMA of the live params with torch.lerp_ after
    every optimizer step, and checks at each epoch end that the model holds the EMA (cast)."""

    def __init__(self, sema_callback, decay: float) -> None:
        self.sema_callback, self.decay = sema_callback, decay
        self.reference: dict[str, torch.Tensor] = {}
        self.steps_seen = 0
        self.epoch_checks = 0

    def on_fit_start(self, trainer, pl_module):
        self.reference = {n: p.detach().float().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.steps_seen:
            self.steps_seen = trainer.global_step
            for n, p in pl_module.named_parameters():
                self.reference[n].lerp_(p.detach().float(), 1.0 - self.decay)

    def on_train_epoch_end(self, trainer, pl_module):
        ema = self.sema_callback.ema
        assert ema.step == trainer.global_step, f"{ema.step} EMA updates for {trainer.global_step} optimizer steps"
        assert ema.num_switches == trainer.current_epoch + 1
        emas = emas_of(self.sema_callback)
        for n, p in pl_module.named_parameters():
            torch.testing.assert_close(emas[n], self.reference[n], **TOLERANCES[p.dtype], msg=f"EMA of {n}")
            assert_bits_equal(
                p.detach().reshape(-1), emas[n].to(p.dtype).reshape(-1), f"epoch {trainer.current_epoch} {n}"
            )
        self.epoch_checks += 1


@requires_lightning
@pytest.mark.parametrize(
    "precision, accumulate, offload",
    [("32-true", 1, False), ("bf16-true", 2, False), ("bf16-true", 1, True)],
    ids=["fp32", "bf16-accumulate2", "bf16-offload"],
)
def test_fit_updates_per_optimizer_step_and_switches_every_epoch(tmp_path, precision, accumulate, offload):
    model = TinyRegressor()
    callback = SwitchEMACallback(decay=DECAY, **({"ema_device": "cpu", "offload_chunk_elements": 7} if offload else {}))
    oracle = EmaOracle(callback, DECAY)
    trainer = make_trainer(tmp_path, [callback, oracle], precision=precision, accumulate_grad_batches=accumulate)
    train, val = loaders()
    waits = []
    original = SwitchEMA.wait

    def counted(ema):
        waits.append(ema.step)
        return original(ema)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SwitchEMA, "wait", counted)
        trainer.fit(model, train, val)
    # before each optimizer step (after its forward and backward), a wait for the previous update
    assert len(waits) == trainer.global_step
    assert (callback.ema.ema_device is not None) == offload
    assert oracle.epoch_checks == 3
    assert trainer.global_step == 3 * -(-len(train) // accumulate)
    param_dtype = torch.float32 if precision == "32-true" else torch.bfloat16
    assert all(p.dtype == param_dtype for p in model.parameters())
    assert all(e.dtype == torch.float32 for e in emas_of(callback).values())


class LiveWeightsProbe(Callback):
    """Records the live params before validation and what the model holds inside it."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}
        self.inside: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.before = params_of(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.inside = params_of(pl_module)

    def on_train_epoch_end(self, trainer, pl_module):
        self.after = params_of(pl_module)


def val_loss_of(model: nn.Module, val: torch.utils.data.DataLoader) -> float:
    x, y = next(iter(val))
    with torch.no_grad():
        return float(nn.functional.mse_loss(model(x), y))


@requires_lightning
@pytest.mark.parametrize("validate_on", ["ema", "live"])
def test_validation_metrics_come_from_the_weights_asked_for(tmp_path, validate_on):
    model = TinyRegressor()
    # switch_every=None (a plain EMA) keeps the live weights and the EMA apart at every validation.
    callback = SwitchEMACallback(decay=DECAY, switch_every=None, validate_on=validate_on)
    probe = LiveWeightsProbe()
    trainer = make_trainer(tmp_path, [callback, probe], max_epochs=2)
    train, val = loaders()
    trainer.fit(model, train, val)

    live_loss = val_loss_of(model, val)
    with callback.ema.swapped():
        ema_loss = val_loss_of(model, val)
        ema_weights = params_of(model)
    logged = float(trainer.callback_metrics["val_loss"])
    assert abs(ema_loss - live_loss) > 1e-3 * live_loss, "the test needs the EMA and the live weights apart"
    expected = ema_loss if validate_on == "ema" else live_loss
    assert logged == pytest.approx(expected, rel=1e-6), f"val_loss {logged}, EMA {ema_loss}, live {live_loss}"
    seen = ema_weights if validate_on == "ema" else probe.before
    for n, p in probe.inside.items():
        assert_bits_equal(p.reshape(-1), seen[n].reshape(-1), f"{n} inside validation")
    for n, p in probe.after.items():  # the live weights come back bit for bit after validation
        assert_bits_equal(p.reshape(-1), probe.before[n].reshape(-1), f"{n} after validation")
    # trainer.validate() after fit goes through the same hooks.
    (metrics,) = trainer.validate(model, val, verbose=False)
    assert metrics["val_loss"] == pytest.approx(expected, rel=1e-6)


@requires_lightning
def test_switch_at_end_leaves_the_ema_in_the_model(tmp_path):
    model = TinyRegressor()
    callback = SwitchEMACallback(decay=DECAY, switch_every=None, switch_at_end=True)
    trainer = make_trainer(tmp_path, [callback], max_epochs=1)
    trainer.fit(model, loaders()[0])
    assert callback.ema.num_switches == 1
    emas = emas_of(callback)
    for n, p in model.named_parameters():
        assert_bits_equal(p.detach().reshape(-1), emas[n].reshape(-1), n)


class CrashAt(Callback):
    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.current_epoch == self.epoch and batch_idx == self.batch:
            raise RuntimeError("simulated crash")


@requires_lightning
def test_kill_and_resume_from_epoch_2_checkpoint_is_bit_identical(tmp_path):
    train, val = loaders()
    settings = dict(decay=DECAY, warmup="linear", warmup_steps=8)  # the warmup spans the restart

    reference_model = TinyRegressor(seed=0)
    reference = SwitchEMACallback(**settings)
    make_trainer(tmp_path / "a", [reference], accumulate_grad_batches=2).fit(reference_model, train, val)

    killed_model = TinyRegressor(seed=0)
    killed = make_trainer(
        tmp_path / "b",
        [SwitchEMACallback(**settings), CrashAt(epoch=2, batch=3)],
        checkpoint_dir=tmp_path / "ckpt",
        accumulate_grad_batches=2,
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        killed.fit(killed_model, train, val)
    checkpoint = tmp_path / "ckpt" / "epoch=1-step=6.ckpt"
    assert checkpoint.is_file(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    resumed_model = TinyRegressor(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed = SwitchEMACallback(**settings)
    trainer = make_trainer(tmp_path / "c", [resumed], accumulate_grad_batches=2)
    trainer.fit(resumed_model, train, val, ckpt_path=checkpoint)

    assert trainer.global_step == 9 and resumed.ema.step == 9 and resumed.ema.num_switches == 3
    expected_params, expected_emas = params_of(reference_model), emas_of(reference)
    for n, p in params_of(resumed_model).items():
        assert_bits_equal(p.reshape(-1), expected_params[n].reshape(-1), f"param {n}")
    for n, e in emas_of(resumed).items():
        assert_bits_equal(e.reshape(-1), expected_emas[n].reshape(-1), f"EMA {n}")


@requires_lightning
def test_checkpoint_holds_the_ema_state(tmp_path):
    model = TinyRegressor()
    callback = SwitchEMACallback(decay=DECAY)
    make_trainer(tmp_path, [callback], max_epochs=1, checkpoint_dir=tmp_path / "ckpt").fit(model, loaders()[0])
    (path,) = (tmp_path / "ckpt").iterdir()
    saved = torch.load(path, map_location="cpu", weights_only=False)["callbacks"][callback.state_key]["ema"]
    assert saved["step"] == callback.ema.step == 6 and saved["epochs"] == 1
    for n, e in emas_of(callback).items():
        assert_bits_equal(saved["ema"][n].reshape(-1), e.reshape(-1), n)


@requires_lightning
def test_bad_arguments_raise_when_the_callback_is_made():
    with pytest.raises(ValueError, match="validate_on"):
        SwitchEMACallback(validate_on="best")
    with pytest.raises(TypeError, match="SwitchEMA takes"):
        SwitchEMACallback(decay_rate=0.9)
    with pytest.raises(TypeError, match="model="):
        SwitchEMACallback(model=nn.Linear(1, 1))


def test_ensure_ema_rebuilds_a_moved_model_and_carries_the_state_over():
    # What Lightning does to a GPU model after fit (strategy teardown: .cpu()) and before the
    # next stage (.to(device)): new storage for every param. Simulated here with new tensors.
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))
    kwargs = check_callback_args("test", "ema", {"decay": 0.5})
    ema = ensure_ema(None, model, kwargs)
    assert ensure_ema(ema, model, kwargs) is ema
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update()
    saved = ema.state_dict()
    for p in model.parameters():
        p.data = p.data.clone()
    assert not placement_intact(ema)
    rebuilt = ensure_ema(ema, model, kwargs)
    assert rebuilt is not ema and placement_intact(rebuilt) and rebuilt.step == 1
    for name, e in rebuilt.state_dict()["ema"].items():
        assert_bits_equal(e.reshape(-1), saved["ema"][name].reshape(-1), name)
    rebuilt.switch()  # the rebuilt EMA drives the params where they live now
    for name, p in model.named_parameters():
        assert_bits_equal(p.detach().reshape(-1), saved["ema"][name].reshape(-1), f"switched {name}")


def test_sema_imports_without_the_frameworks():
    # Block the frameworks: `import sema` and `import sema.integrations` must not need them,
    # and the callback modules must say what to install.
    code = (
        "import sys\n"
        "for name in ('lightning', 'pytorch_lightning', 'transformers'):\n"
        "    sys.modules[name] = None\n"
        "import sema, sema.integrations\n"
        "for module in ('sema.integrations.lightning', 'sema.integrations.transformers'):\n"
        "    try:\n"
        "        __import__(module)\n"
        "    except ImportError as exc:\n"
        "        print(module, 'ImportError', exc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "sema.integrations.lightning ImportError" in out.stdout and "pip install lightning" in out.stdout
    assert "sema.integrations.transformers ImportError" in out.stdout, out.stdout


class EvaluatedRegressor(TinyRegressor):
    """TinyRegressor with test and predict steps; ``fail_in`` makes that stage raise."""

    def __init__(self, seed: int = 0, fail_in: str | None = None) -> None:
        super().__init__(seed)
        self.fail_in = fail_in
        self.seen: dict[str, dict[str, torch.Tensor]] = {}

    def test_step(self, batch, batch_idx):
        self.seen["test"] = params_of(self)
        if self.fail_in == "test":
            raise RuntimeError("simulated failure in test")
        x, y = batch
        self.log("test_loss", nn.functional.mse_loss(self(x), y), batch_size=len(x))

    def predict_step(self, batch, batch_idx):
        self.seen["predict"] = params_of(self)
        if self.fail_in == "predict":
            raise RuntimeError("simulated failure in predict")
        return self(batch[0])


def fit_plain_ema(tmp_path, model, **callback_kwargs):
    # switch_every=None keeps the live weights and the EMA apart after fit.
    callback = SwitchEMACallback(decay=DECAY, switch_every=None, **callback_kwargs)
    make_trainer(tmp_path, [callback], max_epochs=2, checkpoint_dir=tmp_path / "ckpt").fit(model, loaders()[0])
    return callback


def ema_weights_of(callback) -> dict[str, torch.Tensor]:
    return dict(callback.ema.averaged_state_dict())


def assert_weights(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], where: str) -> None:
    assert got.keys() == expected.keys(), where
    for n, t in got.items():
        assert_bits_equal(t.reshape(-1), expected[n].reshape(-1), f"{where}: {n}")


def assert_apart(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert all(not torch.equal(a[n], b[n]) for n in a), "the test needs the EMA and the live weights apart"


@requires_lightning
@pytest.mark.parametrize("stage", ["test", "predict"])
@pytest.mark.parametrize("on", ["ema", "live"])
def test_test_and_predict_run_on_the_weights_asked_for(tmp_path, stage, on):
    model = EvaluatedRegressor()
    callback = fit_plain_ema(tmp_path, model, **{f"{stage}_on": on})
    live, ema = params_of(model), ema_weights_of(callback)
    assert_apart(live, ema)
    val = loaders()[1]
    trainer = make_trainer(tmp_path, [callback])
    if stage == "test":
        (metrics,) = trainer.test(model, val, verbose=False)
        expected = ema if on == "ema" else live
        x, y = next(iter(val))
        with torch.no_grad():
            loss = nn.functional.mse_loss(torch.func.functional_call(model, expected, (x,)), y)
        assert metrics["test_loss"] == pytest.approx(float(loss), rel=1e-6)
    else:
        (predicted,) = trainer.predict(model, val)
        expected = ema if on == "ema" else live
        with torch.no_grad():
            reference = torch.func.functional_call(model, expected, (next(iter(val))[0],))
        assert_bits_equal(predicted.reshape(-1), reference.reshape(-1), "predictions")
    assert_weights(model.seen[stage], expected, f"inside trainer.{stage}")
    assert_weights(params_of(model), live, f"after trainer.{stage}")  # restored bit for bit


@requires_lightning
@pytest.mark.parametrize("stage", ["test", "predict"])
def test_the_live_weights_come_back_when_test_or_predict_raises(tmp_path, stage):
    model = EvaluatedRegressor(fail_in=stage)
    callback = fit_plain_ema(tmp_path, model, test_on="ema", predict_on="ema")
    live, ema = params_of(model), ema_weights_of(callback)
    assert_apart(live, ema)
    trainer = make_trainer(tmp_path, [callback])
    with pytest.raises(RuntimeError, match=f"simulated failure in {stage}"):
        getattr(trainer, stage)(model, loaders()[1])
    assert_weights(model.seen[stage], ema, f"inside trainer.{stage}")
    assert_weights(params_of(model), live, f"after the failed trainer.{stage}")
    assert not callback._swap.active


@requires_lightning
@pytest.mark.parametrize("checkpoint_weights", ["ema", "live"])
def test_checkpoint_weights_decide_what_load_from_checkpoint_gives(tmp_path, checkpoint_weights):
    model = TinyRegressor()
    callback = fit_plain_ema(tmp_path, model, checkpoint_weights=checkpoint_weights)
    live, ema = dict(model.state_dict()), ema_weights_of(callback)
    assert_apart(params_of(model), {n: ema[n] for n in params_of(model)})
    path = tmp_path / "ckpt" / "epoch=1-step=12.ckpt"  # written at the end of fit: the state above
    saved = torch.load(path, map_location="cpu", weights_only=False)
    loaded = TinyRegressor.load_from_checkpoint(path, seed=1)
    if checkpoint_weights == "ema":
        assert_weights(saved["state_dict"], ema, "checkpoint state_dict")
        assert_weights(saved["sema_live_state_dict"], live, "checkpoint sema_live_state_dict")
        assert_weights(dict(loaded.state_dict()), ema, "load_from_checkpoint")
    else:
        assert "sema_live_state_dict" not in saved
        assert_weights(dict(loaded.state_dict()), live, "load_from_checkpoint")
    # The EMA state itself is in the checkpoint either way.
    ema_state = saved["callbacks"][callback.state_key]["ema"]["ema"]
    assert_weights(ema_state, callback.ema.state_dict()["ema"], "callback state")


@requires_lightning
@pytest.mark.parametrize(
    "checkpoint_weights, precision", [("ema", "32-true"), ("live", "32-true"), ("ema", "bf16-true")]
)
def test_resume_is_bit_identical_with_either_checkpoint_weights(tmp_path, checkpoint_weights, precision):
    train, val = loaders()
    settings = dict(decay=DECAY, switch_every=None, checkpoint_weights=checkpoint_weights)

    reference_model = TinyRegressor(seed=0)
    reference = SwitchEMACallback(**settings)
    make_trainer(tmp_path / "a", [reference], precision=precision).fit(reference_model, train, val)

    killed = make_trainer(
        tmp_path / "b",
        [SwitchEMACallback(**settings), CrashAt(epoch=2, batch=2)],
        checkpoint_dir=tmp_path / "ckpt",
        precision=precision,
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        killed.fit(TinyRegressor(seed=0), train, val)
    checkpoint = tmp_path / "ckpt" / "epoch=1-step=12.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    assert ("sema_live_state_dict" in saved) == (checkpoint_weights == "ema")

    resumed_model = TinyRegressor(seed=1)
    resumed = SwitchEMACallback(**settings)
    trainer = make_trainer(tmp_path / "c", [resumed], precision=precision)
    trainer.fit(resumed_model, train, val, ckpt_path=checkpoint)

    assert all(p.dtype == saved["state_dict"][n].dtype for n, p in resumed_model.named_parameters())
    assert trainer.global_step == 18 and resumed.ema.step == 18
    assert_weights(params_of(resumed_model), params_of(reference_model), "params")
    assert_weights(emas_of(resumed), emas_of(reference), "EMA")


@requires_lightning
@pytest.mark.parametrize("test_on", ["ema", "live"])
def test_trainer_test_from_an_ema_checkpoint_with_a_fresh_callback(tmp_path, test_on):
    model = EvaluatedRegressor()
    callback = fit_plain_ema(tmp_path, model, checkpoint_weights="ema")
    live, ema = params_of(model), ema_weights_of(callback)
    fresh_model = EvaluatedRegressor(seed=1)
    fresh = SwitchEMACallback(decay=DECAY, switch_every=None, test_on=test_on)
    make_trainer(tmp_path / "t", [fresh]).test(
        fresh_model, loaders()[1], ckpt_path=tmp_path / "ckpt" / "epoch=1-step=12.ckpt", verbose=False
    )
    assert_weights(fresh_model.seen["test"], ema if test_on == "ema" else live, "inside trainer.test")
    assert_weights(params_of(fresh_model), live, "after trainer.test")  # the live weights, from the checkpoint


@requires_lightning
def test_two_callbacks_cannot_both_write_the_checkpoint_state_dict(tmp_path):
    callbacks = [
        SwitchEMACallback(decay=0.5, checkpoint_weights="ema"),
        SwitchEMACallback(decay=0.9, checkpoint_weights="ema"),
    ]
    model = TinyRegressor()
    before = params_of(model)
    with pytest.raises(ValueError, match="checkpoint_weights='ema' on one callback only"):
        make_trainer(tmp_path, callbacks, max_epochs=1).fit(model, loaders()[0])
    assert_weights(params_of(model), before, "params")


@requires_lightning
def test_new_arguments_are_checked_when_the_callback_is_made():
    for name in ("test_on", "predict_on", "checkpoint_weights"):
        with pytest.raises(ValueError, match=name):
            SwitchEMACallback(**{name: "best"})
    with pytest.raises(TypeError, match="SwitchEMA takes"):
        SwitchEMACallback(update_after_steps=3)


class ParamRecorder(Callback):
    """The params after every optimizer step."""

    def __init__(self) -> None:
        self.history: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > len(self.history):
            self.history.append(params_of(pl_module))


@requires_lightning
def test_migration_arguments_pass_through_the_callback(tmp_path):
    # update_after_step=3: the first 3 updates copy; include: only the first layer is averaged.
    model = TinyRegressor()
    callback = SwitchEMACallback(decay=DECAY, switch_every=None, update_after_step=3, include="net.0.*")
    recorder = ParamRecorder()
    make_trainer(tmp_path, [callback, recorder], max_epochs=1).fit(model, loaders()[0])
    emas = emas_of(callback)
    assert sorted(emas) == ["net.0.bias", "net.0.weight"]
    assert len(recorder.history) == callback.ema.step == 6
    for n, e in emas.items():
        reference = recorder.history[2][n].clone()
        for params in recorder.history[3:]:
            reference.lerp_(params[n], 1.0 - DECAY)
        torch.testing.assert_close(e, reference, **TOLERANCES[torch.float32], msg=f"EMA of {n}")
        assert not torch.allclose(e, recorder.history[-1][n], rtol=1e-3, atol=1e-3), f"{n} was never averaged"


DECAYS = (DECAY, 0.95)  # two EMAs far apart after a few steps


def all_emas_of(callback) -> list[dict[str, torch.Tensor]]:
    saved = callback.ema.state_dict()["ema"]
    assert isinstance(saved, list) and len(saved) == len(callback.ema.decays), "the state holds every EMA"
    return [{n: e.clone() for n, e in one.items()} for one in saved]


class TwoEmaProbe(Callback):
    """Placed before SwitchEMACallback: its own torch.lerp_ EMA per decay after every optimizer
    step; at each validation start (before the swap) both averaged weights, then the params the
    validation batches see, and the params after validation."""

    def __init__(self, sema_callback) -> None:
        self.sema_callback = sema_callback
        self.reference: list[dict[str, torch.Tensor]] = []
        self.steps_seen = 0
        self.expected: list[dict[str, torch.Tensor]] = []
        self.inside: list[dict[str, torch.Tensor]] = []
        self.before_validation: dict[str, torch.Tensor] = {}
        self.live_after: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []

    def on_fit_start(self, trainer, pl_module):
        self.reference = [{n: p.detach().float().clone() for n, p in pl_module.named_parameters()} for _ in DECAYS]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step > self.steps_seen:
            self.steps_seen = trainer.global_step
            for reference, decay in zip(self.reference, DECAYS, strict=False):
                for n, p in pl_module.named_parameters():
                    reference[n].lerp_(p.detach().float(), 1.0 - decay)

    def on_validation_start(self, trainer, pl_module):
        ema = self.sema_callback.ema
        self.expected.append([dict(ema.averaged_state_dict(index=k)) for k in range(len(DECAYS))])
        self.before_validation = params_of(pl_module)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        self.inside.append(params_of(pl_module))

    def on_train_epoch_end(self, trainer, pl_module):
        # After this epoch's validation, before SwitchEMACallback's switch: the live weights are back.
        self.live_after.append((self.before_validation, params_of(pl_module)))


@requires_lightning
def test_two_decays_train_and_validate_on_ema_1(tmp_path):
    model = TinyRegressor()
    callback = SwitchEMACallback(decay=DECAYS, validate_on="ema:1")
    probe = TwoEmaProbe(callback)
    trainer = make_trainer(tmp_path, [probe, callback], max_epochs=3)
    train, val = loaders()
    trainer.fit(model, train, val)

    assert callback.ema.decays == DECAYS and callback.ema.step == trainer.global_step == 18
    assert callback.ema.num_switches == 3
    emas = all_emas_of(callback)
    for k, reference in enumerate(probe.reference):
        for n, e in emas[k].items():
            torch.testing.assert_close(e, reference[n], **TOLERANCES[torch.float32], msg=f"EMA {k} of {n}")
    # The last epoch switched EMA 0 (not EMA 1) into the model.
    for n, p in model.named_parameters():
        assert_bits_equal(p.detach().reshape(-1), emas[0][n].reshape(-1), f"switched {n}")
    assert len(probe.expected) == len(probe.inside) == 3
    for epoch, (expected, inside) in enumerate(zip(probe.expected, probe.inside, strict=False)):
        assert all(not torch.equal(expected[0][n], expected[1][n]) for n in inside), "the test needs the EMAs apart"
        assert_weights(inside, {n: expected[1][n] for n in inside}, f"epoch {epoch}: inside validation")
    assert len(probe.live_after) == 3
    for epoch, (before, after) in enumerate(probe.live_after):
        assert_weights(after, before, f"epoch {epoch}: live weights after validation")

    # trainer.validate() after fit sees EMA 1 too; the logged loss is EMA 1's.
    ema_1 = dict(callback.ema.averaged_state_dict(index=1))
    live = params_of(model)
    (metrics,) = trainer.validate(model, val, verbose=False)
    x, y = next(iter(val))
    with torch.no_grad():
        loss = nn.functional.mse_loss(torch.func.functional_call(model, ema_1, (x,)), y)
    assert metrics["val_loss"] == pytest.approx(float(loss), rel=1e-6)
    assert_weights(params_of(model), live, "after trainer.validate")


@requires_lightning
def test_two_decays_resume_bit_identical_with_ema_1_in_the_checkpoint(tmp_path):
    train, val = loaders()
    settings = dict(decay=DECAYS, warmup="linear", warmup_steps=8, validate_on="ema:1", checkpoint_weights="ema:1")

    reference_model = TinyRegressor(seed=0)
    reference = SwitchEMACallback(**settings)
    make_trainer(tmp_path / "a", [reference], checkpoint_dir=tmp_path / "ref").fit(reference_model, train, val)
    # The checkpoint's state_dict holds EMA 1; its callback state holds both EMAs.
    saved = torch.load(tmp_path / "ref" / "epoch=2-step=18.ckpt", map_location="cpu", weights_only=False)
    expected_state = dict(reference.ema.averaged_state_dict(index=1))
    assert_apart(expected_state, dict(reference.ema.averaged_state_dict(index=0)))
    assert_weights(saved["state_dict"], expected_state, "checkpoint state_dict")
    assert_weights(saved["sema_live_state_dict"], dict(reference_model.state_dict()), "checkpoint live weights")
    saved_emas = saved["callbacks"][reference.state_key]["ema"]["ema"]
    for k, ema in enumerate(all_emas_of(reference)):
        assert_weights(saved_emas[k], ema, f"saved EMA {k}")

    killed = make_trainer(
        tmp_path / "b", [SwitchEMACallback(**settings), CrashAt(epoch=2, batch=3)], checkpoint_dir=tmp_path / "ckpt"
    )
    with pytest.raises(RuntimeError, match="simulated crash"):
        killed.fit(TinyRegressor(seed=0), train, val)

    resumed_model = TinyRegressor(seed=1)  # other initial weights: everything must come from the checkpoint
    resumed = SwitchEMACallback(**settings)
    trainer = make_trainer(tmp_path / "c", [resumed])
    trainer.fit(resumed_model, train, val, ckpt_path=tmp_path / "ckpt" / "epoch=1-step=12.ckpt")

    assert trainer.global_step == 18 and resumed.ema.step == 18 and resumed.ema.num_switches == 3
    assert_weights(params_of(resumed_model), params_of(reference_model), "params")
    for k, (got, expected) in enumerate(zip(all_emas_of(resumed), all_emas_of(reference), strict=False)):
        assert_weights(got, expected, f"EMA {k}")


@requires_lightning
def test_an_ema_index_out_of_range_or_malformed_is_refused_when_the_callback_is_made():
    for name in ("validate_on", "test_on", "predict_on", "checkpoint_weights"):
        with pytest.raises(ValueError, match=rf"{name}='ema:2' names EMA 2, but decay=\(0.8, 0.95\) keeps 2 EMAs"):
            SwitchEMACallback(decay=DECAYS, **{name: "ema:2"})
        with pytest.raises(ValueError, match=rf"{name}='ema:1' names EMA 1, .* keeps 1 EMA;"):
            SwitchEMACallback(decay=DECAY, **{name: "ema:1"})
        with pytest.raises(ValueError, match=rf"{name}=\('ema', 1\) is not one of .*write {name}='ema:1'"):
            SwitchEMACallback(decay=DECAYS, **{name: ("ema", 1)})
        for bad in ("ema:", "ema:-1", "ema:x", "ema 1", "EMA"):
            with pytest.raises(
                ValueError, match=rf"{name}=.* is not one of 'live', 'ema' \(EMA 0\), 'ema:0' .. 'ema:1'"
            ):
                SwitchEMACallback(decay=DECAYS, **{name: bad})
    with pytest.raises(ValueError, match=r"decay=\(\) holds no decay"):
        SwitchEMACallback(decay=())
    callback = SwitchEMACallback(decay=DECAYS, validate_on="ema:1", test_on="ema", predict_on="ema:0")
    assert [callback._index(n) for n in ("validate_on", "test_on", "predict_on", "checkpoint_weights")] == [
        1,
        0,
        0,
        None,
    ]
