"""The bandwidth profiler (``sema.profile``, ``sema-bench``) on the tiny parameter set: byte
counts, fields, self-consistent GB/s, JSON / CSV / PNG output, the memory refusal, the CLI."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sema import profile
from sema.param_sets import PARAM_SETS, numel

# Bytes per element, worked out by hand from DESIGN.md (E, P: EMA / param element sizes):
# update 2E + P, update+switch 2E + 2P, switch E + P, swap 2E + 2P.
HAND_BYTES = {
    ("fp32", "fp32"): {"update": 12, "update_switch": 16, "switch": 8, "swap": 16},
    ("bf16", "fp32"): {"update": 10, "update_switch": 12, "switch": 6, "swap": 12},
    ("fp16", "fp32"): {"update": 10, "update_switch": 12, "switch": 6, "swap": 12},
    ("bf16", "bf16"): {"update": 6, "update_switch": 8, "switch": 4, "swap": 8},
    ("fp16", "fp16"): {"update": 6, "update_switch": 8, "switch": 4, "swap": 8},
}
ROW_FIELDS = {
    "param_set",
    "tensors",
    "elements",
    "param_dtype",
    "ema_dtype",
    "backend",
    "op",
    "bytes_per_element",
    "bytes",
    "median_ms",
    "q1_ms",
    "q3_ms",
    "min_ms",
    "repeats",
    "GB/s",
    "copy_ms",
    "copy_GB/s",
    "pct_of_copy",
    "host_ms",
    "rotations",
}
PROVENANCE_FIELDS = {"device", "torch", "triton", "sema", "extension", "date", "git_commit", "threads", "backends"}
FAST = ["--set", "tiny", "--repeats", "2", "--warmup", "0", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_result() -> dict:
    return profile.profile_shapes(PARAM_SETS["tiny"](), "tiny", profile.ALL_PAIRS, "cpu", repeats=3, warmup=1)


@pytest.mark.parametrize("pair", list(HAND_BYTES), ids=lambda p: f"param_{p[0]}-ema_{p[1]}")
def test_bytes_per_element_matches_hand_counts(pair):
    param, ema = profile.DTYPES[pair[0]], profile.DTYPES[pair[1]]
    for op, expected in HAND_BYTES[pair].items():
        assert profile.bytes_per_element(op, param, ema) == expected, (pair, op)
    assert profile.bytes_per_element("SwitchEMA.update", param, ema) == HAND_BYTES[pair]["update"]
    assert profile.bytes_per_element("SwitchEMA.update+switch", param, ema) == HAND_BYTES[pair]["update_switch"]


def test_parse_pairs():
    assert profile.parse_pairs("fp32,bf16") == [("fp32", "fp32"), ("bf16", "fp32")]
    assert profile.parse_pairs("bf16:bf16, fp16") == [("bf16", "bf16"), ("fp16", "fp32")]
    assert profile.parse_pairs("all") == list(profile.ALL_PAIRS)
    for bad in ("fp8", "fp32:bf16", "", "bf16:fp16"):
        with pytest.raises(ValueError):
            profile.parse_pairs(bad)


def test_rows_cover_every_backend_op_and_pair(tiny_result):
    rows = tiny_result["rows"]
    backends = profile.available_profile_backends(torch.device("cpu"))
    assert "torch" in backends and "triton" not in backends
    got = {(r["param_dtype"], r["ema_dtype"], r["backend"], r["op"]) for r in rows}
    for pair in profile.ALL_PAIRS:
        for backend in backends:
            for op in (*profile.OPS, *profile.SWITCH_EMA_OPS):
                expected = not (op == "swap" and pair == ("fp16", "fp32"))
                assert ((*pair, backend, op) in got) == expected, (pair, backend, op)
    assert len(got) == len(rows), "duplicate rows"


def test_row_fields_and_consistency(tiny_result):
    n = numel(PARAM_SETS["tiny"]())
    assert tiny_result["param_sets"] == {"tiny": {"tensors": len(PARAM_SETS["tiny"]()), "elements": n}}
    assert PROVENANCE_FIELDS <= set(tiny_result["provenance"])
    for r in tiny_result["rows"]:
        where = f"{r['param_dtype']}:{r['ema_dtype']} {r['backend']} {r['op']}"
        assert set(r) == ROW_FIELDS, where
        pair = (r["param_dtype"], r["ema_dtype"])
        assert r["elements"] == n and r["repeats"] == 3, where
        assert r["bytes_per_element"] == profile.bytes_per_element(
            r["op"], profile.DTYPES[pair[0]], profile.DTYPES[pair[1]]
        )
        assert r["bytes"] == r["bytes_per_element"] * n, where
        assert 0 < r["min_ms"] <= r["q1_ms"] <= r["median_ms"] <= r["q3_ms"], where
        assert r["GB/s"] == pytest.approx(r["bytes"] / (r["median_ms"] / 1e3) / 1e9, rel=1e-12), where
        assert r["copy_GB/s"] == pytest.approx(r["bytes"] / (r["copy_ms"] / 1e3) / 1e9, rel=1e-12), where
        assert r["pct_of_copy"] == pytest.approx(100 * r["GB/s"] / r["copy_GB/s"], rel=1e-9), where
        assert (r["host_ms"] is not None) == r["op"].startswith("SwitchEMA"), where
        if r["host_ms"] is not None:
            assert 0 < r["host_ms"] < 1e3, where
        assert r["rotations"] >= 1


def test_rotations_span_twice_the_cache():
    cpu = torch.device("cpu")
    cache = profile.cache_bytes(cpu)
    assert cache >= 1 << 20
    assert profile.rotations_for(10 * cache, cpu) == 1
    k = profile.rotations_for(cache // 3, cpu)
    assert k * (cache // 3) >= 2 * cache and (k - 1) * (cache // 3) < 2 * cache
    assert profile.rotations_for(1, cpu) == profile.MAX_ROTATIONS


def test_timing_statistics():
    t = profile.Timing.of([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (t.median_s, t.q1_s, t.q3_s, t.min_s, t.n) == (3.0, 2.0, 4.0, 1.0, 5)
    assert profile.Timing.of([7.0]).median_s == 7.0


def test_measure_is_round_robin_and_runs_after_hooks():
    calls = []
    candidates = {
        "a": profile.Candidate(lambda i: calls.append(("a", i)), lambda i: calls.append(("undo a", i))),
        "b": profile.Candidate(lambda i: calls.append(("b", i))),
    }
    timings = profile.measure(candidates, torch.device("cpu"), repeats=3, warmup=1)
    assert [c[0] for c in calls] == ["a", "undo a", "b"] * 4
    assert [c[1] for c in calls if c[0] != "undo a"] == list(range(8))  # a running count, for rotation
    assert {name: t.n for name, t in timings.items()} == {"a": 3, "b": 3}


def test_profile_module_leaves_the_model_alone():
    model = nn.Sequential(nn.Linear(17, 33), nn.LayerNorm(33), nn.Linear(33, 5)).to(torch.bfloat16)
    before = [(p.data_ptr(), p.detach().clone()) for p in model.parameters()]
    result = profile.profile_module(model, repeats=2, warmup=0, backends=["torch"], op_names=["update"])
    assert {(r["param_dtype"], r["ema_dtype"]) for r in result["rows"]} == {("bf16", "fp32")}
    assert {r["op"] for r in result["rows"]} == {"update", *profile.SWITCH_EMA_OPS}
    assert result["param_sets"] == {
        "Sequential": {"tensors": 6, "elements": numel([tuple(p.shape) for p in model.parameters()])}
    }
    for (ptr, value), p in zip(before, model.parameters(), strict=True):
        assert p.data_ptr() == ptr and torch.equal(p, value)


def test_a_set_that_does_not_fit_is_refused_before_allocating(monkeypatch, capsys):
    monkeypatch.setattr(profile, "available_memory", lambda device: 10 << 20)
    with pytest.raises(profile.DoesNotFitError, match=r"tiny .* needs about .* GB on cpu.*only 0.0 GB is available"):
        profile.profile_shapes(PARAM_SETS["tiny"](), "tiny", device="cpu")
    result = profile.profile_sets(["tiny"], device="cpu", repeats=1)
    assert result["rows"] == [] and "needs about" in result["skipped"]["tiny"]
    assert profile.main(FAST) == 1
    out = capsys.readouterr()
    assert "skipped tiny: tiny" in out.out and "nothing was measured" in out.err


def test_decoder_1b_memory_estimate_refuses_a_24gb_machine():
    n = numel(PARAM_SETS["decoder_1b"]())
    need = profile.memory_needed(n, ("bf16", "fp32"), rotations=1, n_backends=2, switch_ema=True)
    assert need > 24e9  # so the 1B set never starts on the 2-core, 24 GB development machine
    assert profile._parser().parse_args([]).set == "resnet50"


def test_main_writes_json_and_csv(tmp_path, capsys):
    json_path, csv_path = tmp_path / "out" / "p.json", tmp_path / "p.csv"
    args = [*FAST, "--dtypes", "fp32,bf16:bf16", "--json", str(json_path), "--csv", str(csv_path), "--note", "test"]
    assert profile.main(args) == 0
    out = capsys.readouterr().out
    assert "tiny" in out and "SwitchEMA.update" in out and f"wrote {json_path}" in out
    result = json.loads(json_path.read_text())
    assert result["provenance"]["note"] == "test" and PROVENANCE_FIELDS <= set(result["provenance"])
    assert {(r["param_dtype"], r["ema_dtype"]) for r in result["rows"]} == {("fp32", "fp32"), ("bf16", "bf16")}
    with csv_path.open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == len(result["rows"])
    assert {"device", "torch", "sema", "date", "git_commit", "GB/s", "pct_of_copy"} <= set(lines[0])
    assert float(lines[0]["GB/s"]) == pytest.approx(result["rows"][0]["GB/s"])


def test_threads_option_sets_the_cpu_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        assert profile.main([*FAST, "--dtypes", "fp32", "--threads", "1", "--json", str(tmp_path / "p.json")]) == 0
        assert json.loads((tmp_path / "p.json").read_text())["provenance"]["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_main_writes_a_plot(tmp_path):
    pytest.importorskip("matplotlib", reason="matplotlib is optional (pip install 'sema[bench]'); --plot needs it")
    png = tmp_path / "p.png"
    assert profile.main([*FAST, "--dtypes", "bf16", "--ops", "update,switch", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    with pytest.raises(SystemExit) as exc:
        profile.main([*FAST, "--plot", str(tmp_path / "p.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--plot" in err and "pip install 'sema[bench]'" in err
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "nope"], "unknown parameter set"),
        (["--dtypes", "fp8"], "not one of the contract"),
        (["--backends", "cuda"], "cannot run on cpu"),
        (["--ops", "update,jump"], "unknown op"),
        (["--repeats", "0"], "--repeats must be >= 1"),
        (["--threads", "0"], "--threads must be >= 1"),
    ],
)
def test_bad_arguments_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        profile.main([*FAST, *args])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_sema_bench_help_lists_the_sets():
    script = Path(sys.executable).with_name("sema-bench")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sema.profile"]
    done = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    for name in PARAM_SETS:
        assert name in done.stdout
    for option in ("--set", "--dtypes", "--json", "--csv", "--plot", "profile_module"):
        assert option in done.stdout
