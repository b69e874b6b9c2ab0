"""PostHocEMA (EDM2 post-hoc EMA) against float64 NumPy references written from the paper's
formulas: the power-function EMA in EDM2's convention (beta_t = (1 - 1/t) ** (gamma + 1), t the
1-based update count) and Algorithm 3's least squares over the snapshot profiles."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sema
from sema.post_hoc import PostHocEMA

# fp32 EMA after a few hundred fp32 updates vs the float64 recursion: a few ulps of the values
# (about 2e-7 measured). Synthesis: the issue asks for 1e-4; fp32 snapshots combined in an fp32
# accumulator come within about 1e-7 of the float64 combination, so 1e-5 is held here.
EMA_RTOL = 1e-6
SYNTH_RTOL = 1e-5
STEPS, EVERY = 280, 40
SIGMA_RELS = (0.05, 0.10)
BACKENDS = ["torch"] + (["cpp"] if sema.available_backends()["cpp"][0] else [])


def make_model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(7, 13), nn.Tanh(), nn.Linear(13, 3), nn.BatchNorm1d(3))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed * 100_003 + step)
    x, y = torch.randn(16, 7, generator=g), torch.randn(16, 3, generator=g)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def gamma_by_bisection(sigma_rel: float) -> float:
    """The exponent with that relative std on the decreasing branch (gamma > (sqrt 5 - 3) / 2)."""

    def sigma(g: float) -> float:
        return math.sqrt((g + 1) / ((g + 2) ** 2 * (g + 3)))

    lo, hi = (math.sqrt(5) - 3) / 2, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sigma(mid) > sigma_rel else (lo, mid)
    return (lo + hi) / 2


def reference_ema(history: list[dict[str, np.ndarray]], gamma: float, offset: int = 0) -> dict[str, np.ndarray]:
    """The float64 power-function EMA after all of ``history`` (the params after each step)."""
    ema = {}
    for t, params in enumerate(history, start=1 + offset):
        beta = (1 - 1 / t) ** (gamma + 1)
        ema = {n: v.copy() if not ema else beta * ema[n] + (1 - beta) * v for n, v in params.items()}
    return ema


def profile_inner(t_a: float, g_a: float, t_b: float, g_b: float) -> float:
    """Integral over [0, min(t_a, t_b)] of p_a * p_b with p(tau) = (g + 1) tau**g / t**(g + 1)."""
    m = min(t_a, t_b)
    return (g_a + 1) * (g_b + 1) * m ** (g_a + g_b + 1) / ((g_a + g_b + 1) * t_a ** (g_a + 1) * t_b ** (g_b + 1))


def reference_synthesis(files: list[tuple[int, float, Path]], step: int, gamma: float) -> dict[str, np.ndarray]:
    t = [s for s, _, _ in files]
    g = [gamma_by_bisection(sigma) for _, sigma, _ in files]
    a = np.array([[profile_inner(t[i], g[i], t[j], g[j]) for j in range(len(t))] for i in range(len(t))])
    b = np.array([profile_inner(t[i], g[i], step, gamma) for i in range(len(t))])
    x = np.linalg.solve(a, b)
    x /= x.sum()
    out: dict[str, np.ndarray] = {}
    for coefficient, (_, _, path) in zip(x, files, strict=True):
        for n, v in torch.load(path, weights_only=True)["ema"].items():
            out[n] = out.get(n, 0) + coefficient * v.double().numpy()
    return out


def snapshot_files(directory: Path) -> list[tuple[int, float, Path]]:
    out = []
    for path in sorted(directory.glob("phema-*.pt")):
        content = torch.load(path, weights_only=True)
        out.append((content["step"], content["sigma_rel"], path))
    return out


def assert_close(name: str, got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    scale = np.abs(want).max()
    err = np.abs(got - want).max()
    where = np.unravel_index(np.abs(got - want).argmax(), want.shape)
    assert err <= rtol * scale, f"{name}: max |diff| {err:.3g} at {where} > {rtol} x max |ref| {scale:.3g}"


@pytest.fixture(scope="module", params=BACKENDS)
def trained(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A run of STEPS updates (fresh seed), shared by the read-only tests below."""
    tmp_path = tmp_path_factory.mktemp(f"phema-{request.param}")
    seed = int(torch.randint(0, 2**20, ()))
    model = make_model(seed)
    phema = PostHocEMA(model, SIGMA_RELS, snapshot_every=EVERY, snapshot_dir=tmp_path, backend=request.param)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    history = []
    for step in range(STEPS):
        train_step(model, opt, step, seed)
        phema.update()
        history.append({n: p.detach().double().numpy().copy() for n, p in model.named_parameters()})
    return model, phema, history, tmp_path


def test_running_emas_match_float64_reference(trained: tuple) -> None:
    _, phema, history, _ = trained
    for k, sigma_rel in enumerate(SIGMA_RELS):
        want = reference_ema(history, gamma_by_bisection(sigma_rel))
        for n, _, e in phema.storage.named_emas(k):
            assert_close(f"EMA {k} {n}", e.double().numpy(), want[n], EMA_RTOL)


def test_reference_rejects_the_one_step_offset(trained: tuple) -> None:
    _, phema, history, _ = trained
    wrong = reference_ema(history, gamma_by_bisection(SIGMA_RELS[0]), offset=1)  # ema-pytorch's count
    worst = max(
        np.abs(e.double().numpy() - wrong[n]).max() / np.abs(wrong[n]).max() for n, _, e in phema.storage.named_emas(0)
    )
    assert worst > 10 * EMA_RTOL


def test_snapshots_on_disk_carry_step_and_sigma(trained: tuple) -> None:
    _, _, history, directory = trained
    files = snapshot_files(directory)
    assert [(s, sigma) for s, sigma, _ in files] == sorted(
        (s, sigma) for s in range(EVERY, STEPS + 1, EVERY) for sigma in SIGMA_RELS
    )
    for step, sigma, path in files:
        assert f"{step:010d}" in path.name and f"sigma{sigma:.6g}" in path.name
    step, sigma, path = files[-1]
    want = reference_ema(history[:step], gamma_by_bisection(sigma))
    for n, v in torch.load(path, weights_only=True)["ema"].items():
        assert v.dtype == torch.float32
        assert_close(f"snapshot {path.name} {n}", v.double().numpy(), want[n], EMA_RTOL)
    assert not list(directory.glob(".*"))  # no temp file left behind


@pytest.mark.parametrize("sigma_rel", [0.045, 0.07, 0.12])
@pytest.mark.parametrize("step", [None, 160, 200])
def test_synthesize_matches_float64_algorithm_3(trained: tuple, sigma_rel: float, step: int | None) -> None:
    model, phema, _, directory = trained
    target = STEPS // EVERY * EVERY if step is None else step
    files = [f for f in snapshot_files(directory) if f[0] <= target]
    want = reference_synthesis(files, target, gamma_by_bisection(sigma_rel))
    got = phema.synthesize(sigma_rel, step=step)
    assert list(got) == list(model.state_dict())
    for n in want:
        assert_close(f"synthesized {n}", got[n].double().numpy(), want[n], SYNTH_RTOL)
    for n, b in model.named_buffers():  # untracked: from the live model, copied
        assert torch.equal(got[n], b) and got[n].data_ptr() != b.data_ptr()
    # Negative control: the same combination with the tracked exponents exchanged misses.
    swapped = [(s, SIGMA_RELS[1 - SIGMA_RELS.index(sigma)], p) for s, sigma, p in files]
    wrong = reference_synthesis(swapped, target, gamma_by_bisection(sigma_rel))
    assert max(np.abs(got[n].double().numpy() - wrong[n]).max() / np.abs(wrong[n]).max() for n in want) > SYNTH_RTOL


def test_synthesize_at_a_tracked_sigma_reproduces_its_snapshot(trained: tuple) -> None:
    _, phema, _, directory = trained
    for step, sigma, path in snapshot_files(directory):
        if step < 2 * EVERY:
            continue
        got = phema.synthesize(sigma, step=step)
        for n, v in torch.load(path, weights_only=True)["ema"].items():
            assert_close(f"{path.name} {n}", got[n].double().numpy(), v.double().numpy(), 1e-6)


def test_synthesize_approximates_the_true_ema(trained: tuple) -> None:
    _, phema, history, _ = trained
    want = reference_ema(history, gamma_by_bisection(0.07))
    got = phema.synthesize(0.07, step=STEPS)
    tracked = [reference_ema(history, gamma_by_bisection(s)) for s in SIGMA_RELS]

    def distance(a: dict) -> float:
        return sum(float(np.sum((np.asarray(a[n], dtype=np.float64) - want[n]) ** 2)) for n in want)

    assert distance({n: got[n].double().numpy() for n in want}) < 0.2 * min(distance(t) for t in tracked)


class Killed(BaseException):
    """Stands for SIGKILL: no except clause of the code under test runs."""


def test_crash_mid_write_leaves_no_snapshot_and_resume_ignores_it(tmp_path: Path, monkeypatch) -> None:
    seed = int(torch.randint(0, 2**20, ()))
    model = make_model(seed)
    phema = PostHocEMA(model, SIGMA_RELS, snapshot_every=10, snapshot_dir=tmp_path, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(5):
        train_step(model, opt, step, seed)
        phema.update()
    saved = phema.state_dict(), model.state_dict(), opt.state_dict()
    real_save = torch.save

    def dying_save(obj: object, f: object) -> None:
        f.write(b"PK\x03\x04 half a zip")
        raise Killed

    monkeypatch.setattr("sema.post_hoc.torch.save", dying_save)
    with pytest.raises(Killed):
        for step in range(5, 10):
            train_step(model, opt, step, seed)
            phema.update()
    monkeypatch.setattr("sema.post_hoc.torch.save", real_save)
    assert [p.name for p in tmp_path.glob(".phema-*.tmp-*")] == [f".{phema.snapshot_name(10, 0)}.tmp-{os.getpid()}"]
    assert not list(tmp_path.glob("phema-*"))

    model2 = make_model(seed + 1)
    phema2 = PostHocEMA(model2, SIGMA_RELS, snapshot_every=10, snapshot_dir=tmp_path, backend="torch")
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05)
    phema2.load_state_dict(saved[0])
    model2.load_state_dict(saved[1])
    opt2.load_state_dict(saved[2])
    for step in range(5, 10):
        train_step(model2, opt2, step, seed)
        phema2.update()
    assert [s["step"] for s in phema2.snapshots] == [10, 10]
    for k in range(2):
        content = torch.load(tmp_path / phema2.snapshot_name(10, k), weights_only=True)
        for n, _, e in phema2.storage.named_emas(k):
            assert torch.equal(content["ema"][n], e)
    assert phema2.synthesize(0.05).keys() == model2.state_dict().keys()


KILLED_RUN = """
import sys, torch, sema.post_hoc
from torch import nn
torch.manual_seed(0)
model = nn.Linear(64, 64)
phema = sema.post_hoc.PostHocEMA(model, (0.05, 0.1), snapshot_every=3, snapshot_dir=sys.argv[1], backend="torch")
real_save = torch.save

def save_then_die(obj, f):
    if obj["step"] == 6 and obj["index"] == 1:
        real_save(obj, f)
        f.flush()
        f.truncate(f.tell() // 2)
        f.flush()
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(obj, f)

sema.post_hoc.torch.save = save_then_die
for step in range(9):
    with torch.no_grad():
        model.weight.add_(0.01)
    phema.update()
    if step == 4:
        torch.save(phema.state_dict(), sys.argv[2])
"""


def test_sigkill_mid_write_leaves_only_complete_snapshots(tmp_path: Path) -> None:
    state = tmp_path / "state.pt"
    run = subprocess.Popen([sys.executable, "-c", textwrap.dedent(KILLED_RUN), str(tmp_path / "snaps"), str(state)])
    assert run.wait(timeout=300) == -signal.SIGKILL
    names = sorted(p.name for p in (tmp_path / "snaps").iterdir())
    assert [n for n in names if n.startswith("phema-")] == [
        "phema-0000000003-ema0-sigma0.05.pt",
        "phema-0000000003-ema1-sigma0.1.pt",
        "phema-0000000006-ema0-sigma0.05.pt",
    ]
    assert [n for n in names if not n.startswith("phema-")] == [f".phema-0000000006-ema1-sigma0.1.pt.tmp-{run.pid}"]
    with pytest.raises((RuntimeError, OSError)):  # the kill came mid-write: the temp file is half a zip
        torch.load(tmp_path / "snaps" / names[0], weights_only=True)
    for name in names[1:]:
        torch.load(tmp_path / "snaps" / name, weights_only=True)  # complete files
    model = nn.Linear(64, 64)
    phema = PostHocEMA(model, (0.05, 0.1), snapshot_every=3, snapshot_dir=tmp_path / "snaps", backend="torch")
    phema.load_state_dict(torch.load(state, weights_only=True))
    assert phema.step == 5 and [s["step"] for s in phema.snapshots] == [3, 3]
    phema.update()
    assert [s["step"] for s in phema.snapshots] == [3, 3, 6, 6]
    assert phema.synthesize(0.07, max_error=None).keys() == model.state_dict().keys()


def test_kill_and_resume_is_bit_identical(tmp_path: Path) -> None:
    seed = int(torch.randint(0, 2**20, ()))
    runs = {}
    for name, stop in (("straight", None), ("resumed", 33)):
        directory = tmp_path / name
        model = make_model(seed)
        phema = PostHocEMA(model, SIGMA_RELS, snapshot_every=20, snapshot_dir=directory, backend="torch")
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for step in range(70):
            if step == stop:
                path = tmp_path / "checkpoint.pt"
                torch.save({"phema": phema.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, path)
                del model, phema, opt
                checkpoint = torch.load(path, weights_only=True)
                model = make_model(seed + 7)
                phema = PostHocEMA(model, SIGMA_RELS, snapshot_every=20, snapshot_dir=directory, backend="torch")
                opt = torch.optim.Adam(model.parameters(), lr=1e-2)
                phema.load_state_dict(checkpoint["phema"])
                model.load_state_dict(checkpoint["model"])
                opt.load_state_dict(checkpoint["opt"])
            train_step(model, opt, step, seed)
            phema.update()
        runs[name] = phema
    a, b = runs["straight"], runs["resumed"]
    assert a.step == b.step == 70 and [s["file"] for s in a.snapshots] == [s["file"] for s in b.snapshots]
    for k in range(2):
        for (n, _, x), (_, _, y) in zip(a.storage.named_emas(k), b.storage.named_emas(k), strict=True):
            assert torch.equal(x, y), f"EMA {k} {n}"
    for s in a.snapshots:
        x = torch.load(tmp_path / "straight" / s["file"], weights_only=True)
        y = torch.load(tmp_path / "resumed" / s["file"], weights_only=True)
        assert x["step"] == y["step"] and all(torch.equal(x["ema"][n], y["ema"][n]) for n in x["ema"])
    for key, value in a.synthesize(0.08).items():
        assert torch.equal(value, b.synthesize(0.08)[key])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sigma_rels": (0.0,)}, "outside"),
        ({"sigma_rels": (-0.1, 0.1)}, "outside"),
        ({"sigma_rels": (0.31,)}, "outside"),
        ({"sigma_rels": (float("nan"),)}, "finite"),
        ({"sigma_rels": ()}, "non-empty"),
        ({"sigma_rels": (0.1, 0.1)}, "twice"),
        ({"snapshot_every": 0}, "snapshot_every"),
        ({"snapshot_every": 2.5}, "snapshot_every"),
        ({"snapshot_every": True}, "snapshot_every"),
        ({"snapshot_dtype": torch.int32}, "snapshot_dtype"),
        ({"backend": "nope"}, "nope"),
    ],
)
def test_bad_construction_raises_before_touching_the_model(tmp_path: Path, kwargs: dict, match: str) -> None:
    model = make_model(0)
    before = [(p.data_ptr(), p.clone()) for p in model.parameters()]
    with pytest.raises((ValueError, TypeError, RuntimeError), match=match):
        PostHocEMA(model, **{"snapshot_dir": tmp_path, **kwargs})
    assert all(p.data_ptr() == a and torch.equal(p, b) for p, (a, b) in zip(model.parameters(), before, strict=True))


def test_unwritable_snapshot_dir(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = make_model(0)
    ptrs = [p.data_ptr() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"snapshot_dir=.*not a writable directory"):
        PostHocEMA(model, snapshot_dir=blocker / "phema")
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_bad_synthesize_and_load_raise_before_changing_anything(tmp_path: Path) -> None:
    model = make_model(1)
    phema = PostHocEMA(model, SIGMA_RELS, snapshot_every=20, snapshot_dir=tmp_path, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(19):
        train_step(model, opt, step, 1)
        phema.update()
    with pytest.raises(RuntimeError, match="no snapshot yet"):
        phema.synthesize(0.07)
    for step in range(19, 140):
        train_step(model, opt, step, 1)
        phema.update()
    before = phema.state_dict()
    with pytest.raises(ValueError, match=r"cannot express sigma_rel=0\.01"):
        phema.synthesize(0.01)
    with pytest.raises(ValueError, match="outside"):
        phema.synthesize(0.4)
    with pytest.raises(ValueError, match="step=141 must be an int between"):
        phema.synthesize(0.07, step=141)
    with pytest.raises(ValueError, match="step=10 must be"):
        phema.synthesize(0.07, step=10)
    with pytest.raises(ValueError, match=r"cannot express sigma_rel=0\.07 at step 130"):
        phema.synthesize(0.07, step=130)  # 10 updates past the last snapshot it may use
    assert phema.synthesize(0.01, max_error=None).keys() == model.state_dict().keys()

    broken = {**before, "snapshots": [*before["snapshots"], {**before["snapshots"][0], "file": "gone.pt"}]}
    broken["emas"] = [{n: v + 1 for n, v in e.items()} for e in before["emas"]]
    broken["step"] = 3
    with pytest.raises(ValueError, match=r"snapshots not in .*gone\.pt"):
        phema.load_state_dict(broken)
    other = {**before, "sigma_rels": [0.05, 0.2], "emas": broken["emas"]}
    with pytest.raises(ValueError, match="sigma_rels"):
        phema.load_state_dict(other)
    after = phema.state_dict()
    assert after["step"] == before["step"] == 140 and after["snapshots"] == before["snapshots"]
    for x, y in zip(after["emas"], before["emas"], strict=True):
        assert all(torch.equal(x[n], y[n]) for n in x)


def test_one_sigma_rel_and_bf16_snapshots(tmp_path: Path) -> None:
    model = make_model(2)
    phema = PostHocEMA(model, 0.1, snapshot_every=30, snapshot_dir=tmp_path, snapshot_dtype=torch.bfloat16)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for step in range(90):
        train_step(model, opt, step, 2)
        phema.update()
        history.append({n: p.detach().double().numpy().copy() for n, p in model.named_parameters()})
    want = reference_ema(history, gamma_by_bisection(0.1))
    for n, _, e in phema.storage.named_emas(0):
        assert_close(n, e.double().numpy(), want[n], EMA_RTOL)
    content = torch.load(tmp_path / phema.snapshot_name(90, 0), weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in content["ema"].values())
    got = phema.synthesize(0.1)
    for n, _, e in phema.storage.named_emas(0):
        assert_close(n, got[n].double().numpy(), e.to(torch.bfloat16).double().numpy(), 1e-6)


def test_fp64_params_get_an_fp64_average(tmp_path: Path) -> None:
    model = make_model(3).double()
    phema = PostHocEMA(model, SIGMA_RELS, snapshot_every=25, snapshot_dir=tmp_path, snapshot_dtype=torch.float64)
    history = []
    for _ in range(50):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p), alpha=0.1)
        phema.update()
        history.append({n: p.detach().numpy().copy() for n, p in model.named_parameters()})
    for k, sigma_rel in enumerate(SIGMA_RELS):
        want = reference_ema(history, gamma_by_bisection(sigma_rel))
        for n, _, e in phema.storage.named_emas(k):
            assert e.dtype == torch.float64
            assert_close(f"EMA {k} {n}", e.numpy(), want[n], 1e-13)


def test_beside_a_switch_ema_of_the_same_model(tmp_path: Path) -> None:
    model = make_model(4)
    ema = sema.SwitchEMA(model, decay=0.9, switch_every=None, backend="torch")
    phema = PostHocEMA(model, SIGMA_RELS, snapshot_every=5, snapshot_dir=tmp_path, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    history = []
    for step in range(10):
        train_step(model, opt, step, 4)
        ema.update()
        phema.update()
        history.append({n: p.detach().double().numpy().copy() for n, p in model.named_parameters()})
    with ema.swapped(), pytest.raises(RuntimeError, match="inside swapped"):
        phema.update()
    assert phema.step == 10
    want = reference_ema(history, gamma_by_bisection(SIGMA_RELS[1]))
    for n, _, e in phema.storage.named_emas(1):
        assert_close(n, e.double().numpy(), want[n], EMA_RTOL)
