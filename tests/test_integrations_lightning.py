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
@pytest.mark.parametrize("precision, accumulate", [("32-true", 1), ("bf16-true", 2)], ids=["fp32", "bf16-accumulate2"])
def test_fit_updates_per_optimizer_step_and_switches_every_epoch(tmp_path, precision, accumulate):
    model = TinyRegressor()
    callback = SwitchEMACallback(decay=DECAY)
    oracle = EmaOracle(callback, DECAY)
    trainer = make_trainer(tmp_path, [callback, oracle], precision=precision, accumulate_grad_batches=accumulate)
    train, val = loaders()
    trainer.fit(model, train, val)
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
