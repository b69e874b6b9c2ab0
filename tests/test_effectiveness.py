"""The effectiveness study (bench/effectiveness, issue 8) keeps working as the library changes:
a shortened E1 end to end (structure, sanity, the SEMA invariant, determinism), the shared
plain/EMA run against a run without SwitchEMA, a tiny E2, and the statistics helpers."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bare `pytest` puts only tests/ on the path
    sys.path.insert(0, str(ROOT))

from bench.effectiveness.arms import ARMS, deterministic, model_equals_ema, train_run  # noqa: E402
from bench.effectiveness.charlm import CharLMConfig, run_e2  # noqa: E402
from bench.effectiveness.digits import DigitsConfig, DigitsTask, run_e1  # noqa: E402
from bench.effectiveness.report import e1_text, e2_text, to_json  # noqa: E402
from bench.effectiveness.stats import first_reaching, mean_ci, paired_difference, t_critical  # noqa: E402

needs_sklearn = pytest.mark.skipif(
    importlib.util.find_spec("sklearn") is None,
    reason="E1 uses scikit-learn's load_digits; install the study extra (pip install scikit-learn)",
)

SHORT_E1 = DigitsConfig(seeds=(0, 1), lrs=(0.2,), decays=(0.990625,), epochs=3)


class InvariantLog:
    """An ``on_epoch_end`` hook: after every SEMA epoch the model must equal its EMA bit for bit,
    and the plain/EMA run must never switch."""

    def __init__(self) -> None:
        self.sema_epochs = 0
        self.plain_epochs = 0

    def __call__(self, kind: str, epoch: int, model: torch.nn.Module, ema: Any) -> None:
        if kind == "sema":
            assert ema.num_switches == epoch, f"epoch {epoch}: {ema.num_switches} switches"
            averaged = ema.averaged_state_dict()
            for name, value in model.state_dict().items():
                assert torch.equal(value, averaged[name]), (
                    f"epoch {epoch}: {name} differs from its EMA after the switch by "
                    f"{(value - averaged[name]).abs().max().item():.3g}"
                )
            self.sema_epochs += 1
        else:
            assert ema.num_switches == 0
            self.plain_epochs += 1


@pytest.fixture(scope="module")
def short_e1() -> tuple[dict[str, Any], InvariantLog]:
    log = InvariantLog()
    return run_e1(SHORT_E1, on_epoch_end=log), log


@needs_sklearn
def test_short_e1_structure_and_sanity(short_e1: tuple[dict[str, Any], InvariantLog]) -> None:
    results, log = short_e1
    n_seeds, epochs = len(SHORT_E1.seeds), SHORT_E1.epochs
    assert log.sema_epochs == log.plain_epochs == n_seeds * epochs
    assert results["experiment"] == "E1"
    assert list(results["config"]["seeds"]) == [0, 1] and results["config"]["steps_per_epoch"] == 32
    assert results["data"]["n_train"] == 1024 and results["data"]["n_test"] == 500
    assert results["data"]["n_val"] == 1797 - 1024 - 500
    checks = results["checks"]
    assert checks["sema_switches"] == checks["sema_switches_expected"] == n_seeds * epochs
    assert checks["max_abs_model_minus_ema_after_switch"] == 0.0
    assert checks["plain_identical_across_decays"] is True
    [cell] = results["cells"]
    assert (cell["lr"], cell["decay"]) == (0.2, 0.990625)
    assert cell["iters_per_epoch_x_1_minus_decay"] == pytest.approx(0.3)
    assert set(cell["curves"]) == set(ARMS)
    for arm in ARMS:
        for split in ("val", "test"):
            curves = cell["curves"][arm][split]
            assert len(curves) == n_seeds and all(len(c) == epochs for c in curves)
            assert all(0.0 <= a <= 1.0 for c in curves for a in c), (arm, split, curves)
            assert all(c[-1] > 0.5 for c in curves), f"{arm} {split}: no better than guessing after {epochs} epochs"
    summary = cell["summary_test"]
    for arm in ARMS:
        final = [c[-1] for c in cell["curves"][arm]["test"]]
        assert summary["final"][arm]["mean"] == pytest.approx(sum(final) / n_seeds)
        assert summary["final"][arm]["ci_low"] <= summary["final"][arm]["mean"] <= summary["final"][arm]["ci_high"]
    for name, paired in summary["paired_final"].items():
        a, b = name.split("_minus_")
        assert paired["mean"] == pytest.approx(summary["final"][a]["mean"] - summary["final"][b]["mean"])
        assert paired["wins"] + paired["ties"] + paired["losses"] == n_seeds
    reach = summary["epochs_to_plain_final"]
    assert all(e is None or 1 <= e <= epochs for arm in ARMS for e in reach[arm]["per_seed"])
    assert reach["plain"]["per_seed"][0] is not None  # plain reaches its own final score
    assert set(results["selection"]["cells"]) == set(ARMS)
    text = to_json(results)  # strict JSON: no NaN or Inf anywhere
    assert '"environment"' in text and "sema_backend" in results["environment"]
    assert "SEMA − EMA" in e1_text(results)


@needs_sklearn
def test_short_e1_is_deterministic(short_e1: tuple[dict[str, Any], InvariantLog]) -> None:
    first, _ = short_e1
    again = run_e1(SHORT_E1)
    assert to_json(again) == to_json(first)


@needs_sklearn
def test_plain_arm_equals_a_run_without_switch_ema() -> None:
    """The plain and EMA arms share a run; that is only fair if SwitchEMA (which re-points the
    params into a flat bucket) leaves training bit for bit the same as no SwitchEMA at all."""
    config = DigitsConfig(epochs=2)
    finals: dict[str, list[torch.Tensor]] = {}

    def keep(kind: str, epoch: int, model: torch.nn.Module, ema: Any) -> None:
        finals[kind] = [p.detach().clone() for p in model.parameters()]

    with deterministic(config.threads):
        task = DigitsTask(config)
        options = config.ema_options()
        alone = train_run(task, "plain", seed=3, lr=0.1, epochs=2, on_epoch_end=keep)
        shared = train_run(
            task, "plain+ema", seed=3, lr=0.1, decay=0.99, epochs=2, ema_options=options, on_epoch_end=keep
        )
        switched = train_run(task, "sema", seed=3, lr=0.1, decay=0.99, epochs=2, ema_options=options)
    assert alone["curves"]["plain"] == shared["curves"]["plain"]
    assert all(torch.equal(a, b) for a, b in zip(finals["plain"], finals["plain+ema"], strict=True))
    # Negative control: the switch does change training, so the comparison above can fail.
    assert switched["curves"]["sema"] != shared["curves"]["plain"]


@needs_sklearn
def test_model_equals_ema_sees_a_difference() -> None:
    """Negative control for the switch check: one optimizer step after a switch, it is non-zero."""
    import sema

    torch.manual_seed(0)
    task = DigitsTask(DigitsConfig())
    model = task.make_model()
    ema = sema.SwitchEMA(model, decay=0.9, switch_every=None)
    optimizer = task.make_optimizer(model, 0.1)
    batch = next(iter(task.epoch_batches(torch.Generator().manual_seed(0))))
    ema.switch()
    assert model_equals_ema(ema) == 0.0
    task.loss(model, batch).backward()
    optimizer.step()
    assert model_equals_ema(ema) > 0.0


def test_tiny_e2_runs() -> None:
    config = CharLMConfig(
        seeds=(0,),
        decays=(0.95,),
        epochs=2,
        train_files=("fnmatch.py", "sched.py"),
        val_files=("getopt.py",),
        lr_warmup_steps=2,
    )
    log = InvariantLog()
    results = run_e2(config, on_epoch_end=log)
    assert log.sema_epochs == log.plain_epochs == 2
    assert results["checks"]["sema_switches"] == results["checks"]["sema_switches_expected"] == 2
    assert results["checks"]["max_abs_model_minus_ema_after_switch"] == 0.0
    assert results["config"]["steps_per_epoch"] > 0
    vocab = results["data"]["vocab"]
    [cell] = results["cells"]
    for arm in ARMS:
        [curve] = cell["curves"][arm]
        assert len(curve) == 2
        # Bits per character of a model trained for a moment: above 0, about a uniform guess at most.
        assert all(0.0 < bpc < math.log2(vocab) + 1.0 for bpc in curve), (arm, curve)
        assert cell["summary"]["final"][arm]["mean"] == curve[-1]
    assert "SEMA − EMA" in e2_text(results)
    assert to_json(results)


def test_t_critical_matches_tables() -> None:
    for df, value in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (29, 2.0452), (1000, 1.9623)):
        assert t_critical(df) == pytest.approx(value, abs=1e-4), df


def test_paired_difference_and_first_reaching() -> None:
    stats = paired_difference([0.9, 0.8, 0.7, 0.7], [0.8, 0.8, 0.75, 0.6], higher_is_better=True)
    assert (stats["wins"], stats["ties"], stats["losses"]) == (2, 1, 1)
    assert stats["mean"] == pytest.approx(0.0375)
    lower = paired_difference([2.0, 1.0], [2.5, 0.5], higher_is_better=False)
    assert (lower["wins"], lower["losses"]) == (1, 1)
    one = mean_ci([0.5])
    assert one["half_width"] is None
    assert first_reaching([0.1, 0.5, 0.9], 0.5, True) == 2
    assert first_reaching([3.0, 2.0], 1.0, False) is None
