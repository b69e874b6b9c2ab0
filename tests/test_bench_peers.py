"""bench/peers.py's drop-in rows (issue #16): each ``sema.compat`` drop-in is timed beside the
peer it replaces, built by the same code with only the import changed, and its row carries
peer ms / drop-in ms for each configuration of that peer. A drop-in that cannot be imported,
or fails while timed, is a skipped row with the reason; the script still finishes. ``--peers
dropins`` runs only the drop-ins and their peers. Wherever a real drop-in and its peer are both
installed, the two rows do the same work: after STEPS updates their EMAs agree.

TOLERANCES: the drop-in and the peer each round at most ~1.5 eps of their EMA dtype per step,
relative to the largest |param| seen; a step's error decays by DECAY per later step, so the
accumulated difference stays below 2 * 1.5 eps * scale / (1 - DECAY), bounded here by
ERROR_FACTOR = 4 / (1 - DECAY) eps * scale (the bound of tests/test_peers.py). With DECAY = 0.75
the start still weighs 0.75**20 = 3e-3, far above that: a wrong start or decay fails (the
negative control checks that the bound rejects a drop-in that uses another decay).
"""

from __future__ import annotations

import copy
import csv
import importlib.util
import json
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
DECAY = 0.75
EPS = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7}
ERROR_FACTOR = 4.0 / (1.0 - DECAY)
DROP_INS = {
    "compat_timm_v3": "sema.compat.timm",
    "compat_ema_pytorch": "sema.compat.ema_pytorch",
    "compat_torch_ema": "sema.compat.torch_ema",
    "compat_diffusers": "sema.compat.diffusers",
}


def _load_peers():
    spec = importlib.util.spec_from_file_location("bench_peers_for_drop_ins", ROOT / "bench" / "peers.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


peers = _load_peers()


def test_every_drop_in_has_a_row_that_names_the_peer_it_replaces():
    drop_ins = {name: p for name, p in peers.PEERS.items() if p.drop_in}
    assert set(drop_ins) == set(DROP_INS)
    for name, p in drop_ins.items():
        assert p.drop_in.startswith(DROP_INS[name] + ":")
        assert p.replaces and all(r in peers.PEERS and not peers.PEERS[r].drop_in for r in p.replaces), name


def test_peers_filter():
    assert peers.select_peers(["compat_torch_ema"]) == ["torch_ema", "compat_torch_ema"]
    everything = peers.select_peers(["dropins"])
    expected = set(DROP_INS) | {r for n in DROP_INS for r in peers.PEERS[n].replaces}
    assert set(everything) == expected and everything == [n for n in peers.PEERS if n in expected]
    assert peers.select_peers(["loop", "dropins", "loop"]).count("loop") == 1
    with pytest.raises(ValueError, match=r"unknown peer.*'nope'"):
        peers.select_peers(["dropins", "nope"])
    with pytest.raises(SystemExit):
        peers.main(["--peers", "nope", "--quick"])


def _row(peer: str, ms: float | None, ema: str = "fp32") -> dict:
    row = {"param_set": "s", "param_dtype": "bf16", "peer": peer}
    return row | ({"skipped": "why"} if ms is None else {"median_ms": ms, "ema_dtype": ema})


def test_drop_in_speedup_is_peer_time_over_drop_in_time():
    rows = [
        _row("diffusers", 6.0),
        _row("diffusers_foreach", 3.0),
        _row("compat_diffusers", 2.0),
        _row("timm_v3", None),
        _row("timm_v3_reimpl", 1.0, ema="bf16"),
        _row("compat_timm_v3", 2.0),
        _row("compat_torch_ema", None),
        {**_row("diffusers", 100.0), "param_set": "other set"},  # another set: never compared
    ]
    peers.add_drop_in_speedups(rows)
    diffusers, timm, torch_ema = rows[2], rows[5], rows[6]
    assert diffusers["peer_speedup"] == {"diffusers": 3.0, "diffusers_foreach": 1.5}
    assert diffusers["replaces"] == ["diffusers", "diffusers_foreach"] and "peer_speedup_notes" not in diffusers
    assert timm["peer_speedup"] == {}
    assert timm["peer_speedup_notes"]["timm_v3"] == "not measured: why"
    assert "its EMA is bf16, the drop-in's fp32" in timm["peer_speedup_notes"]["timm_v3_reimpl"]
    assert torch_ema["replaces"] == ["torch_ema"] and "peer_speedup" not in torch_ema
    assert all("peer_speedup" not in r for r in rows if not r["peer"].startswith("compat_"))


class _TimmFailingOnThirdUpdate:
    """A drop-in with timm's signature whose update breaks once timed (the build's call is 1)."""

    def __init__(self, model, decay=0.9999, use_warmup=False, foreach=True):
        self.module, self.calls = copy.deepcopy(model), 0

    def update(self, model, step=None):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("broken on purpose")


def test_quick_run_drop_ins_beside_their_peers(tmp_path, capsys, monkeypatch):
    """One run of ``--peers dropins``: a working drop-in (torch_ema's own class under the drop-in's
    name) gets its speed-up, an unimportable one, one whose module lacks the class and one that
    fails while timed are skipped rows with the reason, as is a peer that is not installed, and
    the run completes."""
    torch_ema = pytest.importorskip("torch_ema", reason="torch-ema is not installed (the working stand-in)")
    working = types.ModuleType("sema.compat.torch_ema")
    working.ExponentialMovingAverage = torch_ema.ExponentialMovingAverage
    failing = types.ModuleType("sema.compat.timm")
    failing.ModelEmaV3 = _TimmFailingOnThirdUpdate
    monkeypatch.setitem(sys.modules, "sema.compat.torch_ema", working)
    monkeypatch.setitem(sys.modules, "sema.compat.timm", failing)
    monkeypatch.setitem(sys.modules, "sema.compat.diffusers", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "sema.compat.ema_pytorch", types.ModuleType("sema.compat.ema_pytorch"))
    monkeypatch.setitem(sys.modules, "diffusers", None)  # its peer rows skip: no slow import here

    out, table = tmp_path / "peers.json", tmp_path / "peers.csv"
    argv = ["--quick", "--peers", "dropins", "--dtypes", "fp32", "--repeats", "2", "--warmup", "0"]
    assert peers.main([*argv, "--no-progress", "--json", str(out), "--csv", str(table)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = {r["peer"]: r for r in result["rows"]}
    assert set(rows) == {"sema_auto", "sema_torch", *peers.select_peers(["dropins"])}

    assert "diffusers is not installed" in rows["diffusers"]["skipped"]
    assert "no attribute 'EMA'" in rows["compat_ema_pytorch"]["skipped"]
    assert "sema.compat.diffusers.EMAModel is not installed" in rows["compat_diffusers"]["skipped"]
    assert "failed while timed: RuntimeError: broken on purpose" in rows["compat_timm_v3"]["skipped"]
    for name in ("compat_ema_pytorch", "compat_diffusers", "compat_timm_v3"):
        assert rows[name]["replaces"] == list(peers.PEERS[name].replaces)
        assert "peer_speedup" not in rows[name]

    mine = rows["compat_torch_ema"]
    assert mine["drop_in"] == "sema.compat.torch_ema.ExponentialMovingAverage"
    assert mine["config"] == rows["torch_ema"]["config"]  # the peer's own arguments
    assert mine["median_ms"] > 0 and mine["ema_dtype"] == "fp32" and mine["repeats"] == 2
    assert mine["peer_speedup"] == {"torch_ema": pytest.approx(rows["torch_ema"]["median_ms"] / mine["median_ms"])}
    assert result["peers"]["compat_torch_ema"]["replaces"] == ["torch_ema"]
    assert "peer_speedup" in result["settings"]

    (csv_row,) = [r for r in csv.DictReader(table.open()) if r["peer"] == "compat_torch_ema"]
    assert float(csv_row["peer_speedup:torch_ema"]) == pytest.approx(mine["peer_speedup"]["torch_ema"])
    assert csv_row["replaces"] == "torch_ema"

    assert "drop-ins vs the peer they replace" in text
    drop_in_table = text.split("drop-ins vs the peer they replace")[1]
    (line,) = [ln for ln in drop_in_table.splitlines() if "sema.compat.torch_ema" in ln]
    assert line.rstrip().endswith(f"{mine['peer_speedup']['torch_ema']:8.2f}x")


def _make_model(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(17, 33), nn.LayerNorm(33), nn.Linear(33, 129), nn.Linear(129, 1)).to(dtype)


def _same_steps(models: list[nn.Module], setups: list) -> list[torch.Tensor]:
    """STEPS optimizer-like steps with the same new values in every model, each followed by one
    update of every setup; returns the elementwise max |param| seen (the error scale)."""
    generator = torch.Generator().manual_seed(7)
    masters = [p.detach().float().clone() for p in models[0].parameters()]
    scale = [m.abs() for m in masters]
    for _ in range(STEPS):
        with torch.no_grad():
            for i, master in enumerate(masters):
                master.add_(0.5 * torch.randn(master.shape, generator=generator))
                scale[i] = torch.maximum(scale[i], master.abs())
                for model in models:
                    list(model.parameters())[i].copy_(master)
        for setup in setups:
            setup.update()
    return scale


def _max_violation(actual, expected, scale, dtype) -> float:
    """The largest |actual - expected| / bound over every EMA tensor (<= 1 passes)."""
    assert [a.shape for a in actual] == [e.shape for e in expected]
    worst = 0.0
    for a, e, s in zip(actual, expected, scale, strict=True):
        bound = ERROR_FACTOR * EPS[dtype] * s.double()
        worst = max(worst, float(((a.detach().double() - e.detach().double()).abs() / bound).max()))
    return worst


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(DROP_INS))
def test_drop_in_row_does_the_work_of_its_peer_row(name, dtype):
    drop_in = peers.PEERS[name]
    ok, why = drop_in.availability()
    if not ok:
        pytest.skip(why)
    (peer_name, *_) = [r for r in drop_in.replaces if peers.PEERS[r].availability()[0]] or [None]
    if peer_name is None:
        pytest.skip(f"none of {drop_in.replaces} is installed")
    peer_model, drop_in_model = _make_model(dtype), _make_model(dtype)
    peer_setup = peers.PEERS[peer_name].build(peer_model, DECAY, True)
    drop_in_setup = drop_in.build(drop_in_model, DECAY, True)
    assert drop_in_setup.ema_dtype == peer_setup.ema_dtype, (drop_in_setup.config, peer_setup.config)
    scale = _same_steps([peer_model, drop_in_model], [peer_setup, drop_in_setup])
    worst = _max_violation(drop_in_setup.emas(), peer_setup.emas(), scale, peer_setup.ema_dtype)
    assert worst <= 1.0, f"{name} vs {peer_name} ({drop_in_setup.config}): error {worst:.3g}x the bound"


def test_negative_control_another_decay_is_rejected():
    """The check above rejects a row whose EMA used 1 - decay: the bound is tight enough."""
    loop = peers.PEERS["loop"].build
    right_model, wrong_model = _make_model(torch.float32), _make_model(torch.float32)
    right, wrong = loop(right_model, DECAY, True), loop(wrong_model, 1.0 - DECAY, True)
    scale = _same_steps([right_model, wrong_model], [right, wrong])
    assert _max_violation(wrong.emas(), right.emas(), scale, torch.float32) > 1.0
    assert _max_violation(right.emas(), right.emas(), scale, torch.float32) == 0.0


def test_plot_has_a_row_of_drop_in_panels(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib", reason="matplotlib is not installed (make peers installs it)")
    drawn = []
    original = peers._plot_drop_ins
    monkeypatch.setattr(
        peers, "_plot_drop_ins", lambda axes, rows, *rest: drawn.append(rows) or original(axes, rows, *rest)
    )
    common = {"fp32_ema": True, "ema_dtype": "fp32", "sema_auto_speedup": 1.5}
    rows = [
        {**_row("torch_ema", 3.0), **common, "label": "torch_ema"},
        {**_row("compat_torch_ema", 2.0), **common, "label": "drop-in"},
        {**_row("compat_diffusers", None), "label": "skipped drop-in"},
    ]
    peers.add_drop_in_speedups(rows)
    provenance = {"sema": "0", "device": "cpu", "threads": 1, "torch": "2", "date": "2026-12-01"}
    path = tmp_path / "peers.png"
    peers.write_plot({"provenance": provenance, "rows": rows}, path)
    assert path.stat().st_size > 0
    assert [[r["peer"] for r in batch] for batch in drawn] == [["compat_torch_ema"]]
