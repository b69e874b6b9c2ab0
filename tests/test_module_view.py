"""``ema.module`` / ``ema.as_module()``: the EMA as a callable module whose params are views of
the EMA storage (issue #14 section 3)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_bits_equal, cpu_backends
from torch import nn

import sema

ROOT = Path(__file__).resolve().parents[1]


def make_model(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Dropout(0.5), nn.Linear(8, 3)).to(dtype)


def train_a_little(model: nn.Module, ema: sema.SwitchEMA, steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    dtype = next(model.parameters()).dtype
    model.train()
    for _ in range(steps):
        x = torch.randn(16, 6, generator=generator).to(dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()
        ema.update()


def live_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("backend", cpu_backends())
@pytest.mark.parametrize("buffers", ["ignore", "copy", "ema"])
@pytest.mark.parametrize("flatten", [True, False], ids=["buckets", "multi-tensor"])
def test_module_equals_the_model_inside_swapped_and_follows_updates(backend, buffers, flatten):
    model = make_model()
    ema = sema.SwitchEMA(model, decay=0.7, buffers=buffers, backend=backend, flatten=flatten, switch_every=None)
    train_a_little(model, ema, 5, seed=1)
    teacher = ema.module
    assert teacher is ema.module, "ema.module is built once and cached"
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    x = torch.randn(4, 6)
    before = live_state(model)
    out = teacher(x)
    for k, v in live_state(model).items():
        assert_bits_equal(v.reshape(-1), before[k].reshape(-1), f"running the module changed the live {k}")
    model.eval()
    with ema.swapped():
        inside = model(x)
    assert_bits_equal(out, inside, "ema.module(x) vs model(x) inside swapped()")
    train_a_little(model, ema, 3, seed=2)  # further updates: the module follows with no call
    model.eval()
    with ema.swapped():
        inside = model(x)
    assert_bits_equal(teacher(x), inside, "after further updates")


def test_module_params_are_views_of_the_ema_storage():
    model = make_model()
    ema = sema.SwitchEMA(model)
    teacher = ema.module
    flat = ema.buckets[0].ema_flat
    start, end = flat.data_ptr(), flat.data_ptr() + flat.numel() * flat.element_size()
    for name, p in teacher.named_parameters():
        assert start <= p.data_ptr() < end, f"{name} is not a view of the EMA buffer"
    live = dict(model.named_parameters())
    assert all(p is not live[n] for n, p in teacher.named_parameters())


def test_buffers_follow_the_policy():
    model = make_model()
    ignored = sema.SwitchEMA(model, buffers="ignore", switch_every=None)
    assert ignored.module[1].running_mean is model[1].running_mean, "ignored buffers are the live ones, shared"
    model2 = make_model()
    copied = sema.SwitchEMA(model2, buffers="copy", switch_every=None)
    assert copied.module[1].running_mean is not model2[1].running_mean
    train_a_little(model2, copied, 2, seed=3)
    assert_bits_equal(copied.module[1].running_mean, model2[1].running_mean, "a copied buffer follows the update")


def test_an_fp32_ema_of_a_bf16_model_gives_an_fp32_module():
    model = make_model(torch.bfloat16)
    ema = sema.SwitchEMA(model, decay=0.5, switch_every=None)
    train_a_little(model, ema, 3, seed=4)
    teacher = ema.module
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    x = torch.randn(4, 6)
    model.eval()
    with ema.swapped():  # the model sees the EMA rounded to bf16
        inside = model(x.bfloat16()).float()
    torch.testing.assert_close(teacher(x), inside, rtol=3e-2, atol=3e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert teacher(x).dtype == torch.bfloat16


def test_module_refuses_to_run_inside_swapped_and_other_indices():
    model = make_model()
    ema = sema.SwitchEMA(model)
    teacher = ema.module
    with ema.swapped(), pytest.raises(RuntimeError, match=r"inside ema\.swapped"):
        teacher(torch.randn(2, 6))
    with pytest.raises(IndexError, match=r"keeps 1 EMA"):
        ema.as_module(1)


def test_teacher_student_example_runs():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "teacher_student.py"), "--steps", "30"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "teacher follows the student" in result.stdout, result.stdout
