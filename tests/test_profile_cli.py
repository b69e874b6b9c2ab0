"""The profiler's run-time behaviour and its command line: the GPU is kept busy ahead of each
timed round, a failing candidate becomes an error row while the others are measured and saved
as they finish, the multi-tensor row, the host-work column, and one line with exit status 2
for every bad flag of ``sema-bench``."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import ClassVar

import pytest
import torch

from sema import ops, profile
from sema.param_sets import PARAM_SETS, numel
from sema.profile import timing

FAST = ["--set", "tiny", "--repeats", "2", "--warmup", "0", "--no-progress"]
TINY = PARAM_SETS["tiny"]()


class RecordingClock(timing.WallClock):
    """The CPU clock, with every hold and start written to a log."""

    def __init__(self) -> None:
        self.log: list[tuple[str, float]] = []

    def hold(self, seconds: float) -> None:
        self.log.append(("hold", seconds))

    def start(self) -> float:
        self.log.append(("start", 0.0))
        return super().start()


def test_each_round_is_held_ahead_for_longer_than_the_host_took_to_issue_the_last():
    clock = RecordingClock()
    candidates = {
        "slow": profile.Candidate(lambda i: time.sleep(0.02)),
        "fast": profile.Candidate(lambda i: None),
    }
    profile.measure(candidates, torch.device("cpu"), repeats=3, warmup=1, clock=clock)
    assert [kind for kind, _ in clock.log] == ["hold", "start", "start"] * 4
    holds = [seconds for kind, seconds in clock.log if kind == "hold"]
    assert holds[0] == timing.FIRST_HOLD_SECONDS
    for seconds in holds[1:]:  # the round before took >= 20 ms to issue
        assert timing.HOLD_MARGIN * 0.02 <= seconds <= timing.MAX_HOLD_SECONDS


class FakeEvent:
    """Stands for torch.cuda.Event: logs each record; every pair is 2 ms apart."""

    log: ClassVar[list[tuple[str, int]]] = []

    def __init__(self, enable_timing: bool = False) -> None:
        assert enable_timing

    def record(self) -> None:
        FakeEvent.log.append(("record", id(self)))

    def synchronize(self) -> None:
        pass

    def elapsed_time(self, end: FakeEvent) -> float:
        return 2.0


def test_the_event_clock_queues_the_spin_kernel_before_each_round_on_cpu(monkeypatch):
    """The CUDA clock's order of calls, with torch.cuda's event, spin and sync stood in for."""
    FakeEvent.log = []
    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "_sleep", lambda cycles: FakeEvent.log.append(("sleep", cycles)))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: FakeEvent.log.append(("sync", 0)))
    calls = []
    candidates = {
        "a": profile.Candidate(lambda i: calls.append(("a", len(FakeEvent.log)))),
        "b": profile.Candidate(lambda i: calls.append(("b", len(FakeEvent.log)))),
    }
    clock = timing.EventClock(torch.device("cuda"))
    timings = profile.measure(candidates, torch.device("cpu"), repeats=2, warmup=1, clock=clock)
    cycles_per_second = (1 << 22) / 2e-3  # the calibration: 2**22 cycles between events 2 ms apart
    kinds = [kind for kind, _ in FakeEvent.log]
    assert kinds[:4] == ["sleep", "record", "sleep", "record"]  # calibration: wake the clocks, then time
    assert kinds[4:] == ["sleep", "record", "record", "record", "record", "sync"] * 3
    holds = [cycles for kind, cycles in FakeEvent.log[4:] if kind == "sleep"]
    assert holds[0] == int(timing.FIRST_HOLD_SECONDS * cycles_per_second)
    assert all(0 < cycles <= timing.MAX_HOLD_SECONDS * cycles_per_second for cycles in holds)
    assert [name for name, _ in calls] == ["a", "b"] * 3
    assert {name: (t.n, t.median_s) for name, t in timings.items()} == {"a": (2, 2e-3), "b": (2, 2e-3)}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (events and a spin kernel)")
def test_the_first_candidate_of_a_round_is_not_charged_the_launch_latency():
    device = torch.device("cuda")
    source = torch.ones(1 << 20, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    candidates = {name: profile.Candidate(lambda i: target.copy_(source)) for name in ("first", "second")}
    held = profile.measure(candidates, device, repeats=200, warmup=5)
    assert held["first"].median_s == pytest.approx(held["second"].median_s, rel=0.1)

    class NoHold(timing.EventClock):
        def hold(self, seconds: float) -> None:
            pass

    # Negative control: on an idle GPU the first call's events include the launch latency.
    idle = profile.measure(candidates, device, repeats=200, warmup=5, clock=NoHold(device))
    assert idle["first"].median_s > 1.2 * idle["second"].median_s


def test_a_failing_candidate_is_recorded_and_the_others_carry_on():
    calls = {"ok": 0, "bad": 0}

    def bad(i: int) -> None:
        calls["bad"] += 1
        if calls["bad"] == 2:
            raise RuntimeError(f"injected failure at call {i}")

    candidates = {
        "ok": profile.Candidate(lambda i: calls.__setitem__("ok", calls["ok"] + 1)),
        "bad": profile.Candidate(bad),
    }
    errors: dict[str, str] = {}
    timings = profile.measure(candidates, torch.device("cpu"), repeats=4, warmup=1, errors=errors)
    assert errors == {"bad": "RuntimeError: injected failure at call 3"}
    assert set(timings) == {"ok"} and timings["ok"].n == 4
    assert calls == {"ok": 5, "bad": 2}  # never called again once it failed
    with pytest.raises(RuntimeError, match="injected"):  # without errors=, it propagates as before
        calls["bad"] = 0
        profile.measure(candidates, torch.device("cpu"), repeats=4, warmup=1)


def failing_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every ``switch`` candidate raise on its second call."""
    real = profile.op_candidate

    def op_candidate(op, buffers, backend):
        if op != "switch":
            return real(op, buffers, backend)
        seen = []

        def call(i: int) -> None:
            seen.append(i)
            if len(seen) == 2:
                raise RuntimeError(f"injected failure of {backend} switch")
            ops.switch_(*buffers[i % len(buffers)], backend=backend)

        return profile.Candidate(call)

    monkeypatch.setattr(profile, "op_candidate", op_candidate)


def test_a_failing_op_becomes_an_error_row(monkeypatch):
    failing_switch(monkeypatch)
    result = profile.profile_shapes(
        TINY, "tiny", [("fp32", "fp32")], "cpu", backends=["torch"], op_names=["update", "switch"], repeats=3, warmup=1
    )
    rows = {r["op"]: r for r in result["rows"]}
    assert list(rows) == ["update", "switch", "SwitchEMA.update", "SwitchEMA.update+switch"]
    assert rows["switch"]["error"] == "RuntimeError: injected failure of torch switch"
    assert rows["switch"]["median_ms"] is None and rows["switch"]["GB/s"] is None
    assert rows["switch"]["bytes"] == 8 * numel(TINY)
    for op in ("update", "SwitchEMA.update", "SwitchEMA.update+switch"):
        assert "error" not in rows[op] and rows[op]["median_ms"] > 0 and rows[op]["repeats"] == 3, op


def test_main_saves_the_other_rows_and_exits_1_when_a_row_failed(monkeypatch, tmp_path, capsys):
    failing_switch(monkeypatch)
    json_path, csv_path = tmp_path / "p.json", tmp_path / "p.csv"
    args = [*FAST, "--dtypes", "fp32", "--backends", "torch", "--json", str(json_path), "--csv", str(csv_path)]
    assert profile.main(args) == 1
    out, err = capsys.readouterr()
    assert "switch                   ERROR RuntimeError: injected failure of torch switch" in out
    assert "1 of " in err and "rows failed" in err
    result = json.loads(json_path.read_text())
    assert result["complete"] is True
    failed = [r for r in result["rows"] if "error" in r]
    assert [(r["backend"], r["op"]) for r in failed] == [("torch", "switch")]
    assert all(r["GB/s"] > 0 for r in result["rows"] if "error" not in r)
    with csv_path.open() as f:
        lines = list(csv.DictReader(f))
    assert [line["op"] for line in lines] == [r["op"] for r in result["rows"]]
    assert [line["error"] for line in lines if line["op"] == "switch"] == [failed[0]["error"]]


def test_a_pair_that_fails_as_a_whole_gives_error_rows_and_the_next_pair_runs(monkeypatch):
    real = profile.copy_candidates
    state = {"calls": 0}

    def copy_candidates(*args, **kwargs):
        state["calls"] += 1
        if state["calls"] == 1:
            raise torch.OutOfMemoryError("injected: out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(profile, "copy_candidates", copy_candidates)
    result = profile.profile_shapes(
        TINY, "tiny", [("fp32", "fp32"), ("bf16", "fp32")], "cpu", backends=["torch"], op_names=["update"], repeats=2
    )
    by_pair = {(r["param_dtype"], r["op"]): r for r in result["rows"]}
    assert len(by_pair) == len(result["rows"]) == 6
    for op in ("update", "SwitchEMA.update", "SwitchEMA.update+switch"):
        assert by_pair[("fp32", op)]["error"] == "OutOfMemoryError: injected: out of memory", op
        assert "error" not in by_pair[("bf16", op)] and by_pair[("bf16", op)]["median_ms"] > 0, op


def test_rows_are_saved_as_each_pair_finishes(monkeypatch, tmp_path):
    """A run stopped during its second dtype pair leaves the first pair's rows on disk."""
    real = profile._profile_pair
    done = []

    def stopped_after_one(plan, *args):
        if done:
            raise KeyboardInterrupt  # as a time limit or ctrl-C would stop it
        done.append(plan.pair)
        return real(plan, *args)

    monkeypatch.setattr(profile, "_profile_pair", stopped_after_one)
    json_path, csv_path = tmp_path / "p.json", tmp_path / "p.csv"
    args = [*FAST, "--dtypes", "fp32,bf16", "--backends", "torch", "--json", str(json_path), "--csv", str(csv_path)]
    with pytest.raises(KeyboardInterrupt):
        profile.main(args)
    result = json.loads(json_path.read_text())
    assert result["complete"] is False and done == [("fp32", "fp32")]
    assert {r["param_dtype"] for r in result["rows"]} == {"fp32"} and len(result["rows"]) == 7
    with csv_path.open() as f:
        assert len(list(csv.DictReader(f))) == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.csv", "p.json"]  # no temporary left behind


def test_the_multi_tensor_row_follows_the_flat_row_with_the_same_bytes():
    backends = profile.available_profile_backends(torch.device("cpu"))
    result = profile.profile_shapes(
        TINY, "tiny", [("bf16", "fp32")], "cpu", op_names=["update_multi", "update"], switch_ema=False, repeats=2
    )
    rows = result["rows"]
    assert [(r["op"], r["backend"]) for r in rows] == [
        *(("update", b) for b in backends),
        *(("update_multi", b) for b in backends),
    ]
    flat, multi = rows[0], rows[len(backends)]
    assert multi["bytes"] == flat["bytes"] == 10 * numel(TINY)
    assert multi["copy_ms"] == flat["copy_ms"]  # one copy_ reference for both
    assert multi["GB/s"] == pytest.approx(multi["bytes"] / (multi["median_ms"] / 1e3) / 1e9, rel=1e-12)


@pytest.mark.parametrize("backend", profile.available_profile_backends(torch.device("cpu")))
def test_the_multi_tensor_candidate_updates_every_separate_tensor(backend):
    pair = (torch.bfloat16, torch.float32)
    emas, params = profile.separate_tensors(TINY, pair, torch.device("cpu"))
    assert len({t.untyped_storage().data_ptr() for t in emas + params}) == 2 * len(TINY)
    expected = [torch.lerp(e, p.float(), profile.UPDATE_WEIGHT) for e, p in zip(emas, params, strict=True)]
    profile.multi_tensor_candidate([(emas, params)], backend).call(0)
    for i, (got, want) in enumerate(zip(emas, expected, strict=True)):
        torch.testing.assert_close(got, want, rtol=2.0**-23, atol=0, msg=lambda m, i=i: f"tensor {i}: {m}")


def test_memory_estimate_counts_the_separate_tensors():
    n = numel(TINY)
    plain = profile.memory_needed(n, ("bf16", "fp32"), rotations=3, n_backends=2, switch_ema=True)
    multi = profile.memory_needed(n, ("bf16", "fp32"), rotations=3, n_backends=2, switch_ema=True, multi_tensor=True)
    assert multi - plain == 3 * n * (2 + 4)


def test_host_python_column_times_update_without_its_kernels():
    result = profile.profile_shapes(
        TINY, "tiny", [("fp32", "fp32")], "cpu", backends=["torch"], op_names=[], repeats=2, host_python=True
    )
    assert [r["op"] for r in result["rows"]] == list(profile.SWITCH_EMA_OPS)
    for r in result["rows"]:
        assert 0 < r["host_python_ms"] < 1e3 and r["host_ms"] > 0, r
    assert "host_python_ms" in result["settings"]
    assert "host_python_ms" not in profile.profile_shapes(TINY, "tiny", [("fp32", "fp32")], "cpu", repeats=1)["rows"][0]


def test_without_kernels_skips_the_backend_and_restores_it():
    ema, param = torch.randn(1000), torch.randn(1000)
    before = ema.clone()
    with profile.without_kernels("torch"):
        ops.ema_update_(ema, param, 0.5, backend="torch")
    assert torch.equal(ema, before)
    ops.ema_update_(ema, param, 0.5, backend="torch")
    torch.testing.assert_close(ema, torch.lerp(before, param, 0.5), rtol=2.0**-23, atol=0)
    with pytest.raises(RuntimeError, match="no kernel entry point"), profile.without_kernels("torch"):
        pass


def bad_flags(tmp: Path) -> list[tuple[list[str], str, str]]:
    """(flags, the problem, the fix) as each must appear in the error line."""
    (tmp / "a_file").write_text("")
    runnable = "choose from " + ", ".join(profile.available_profile_backends(torch.device("cpu")))
    cases = [
        (["--set", "nope"], "unknown parameter set(s) 'nope'", "choose from resnet50"),
        (["--set", " , "], "no parameter set given", "choose from resnet50"),
        (["--set", "tiny,all"], "unknown parameter set(s) 'all'", "'all' alone"),
        (["--dtypes", "fp8"], "dtype pair 'fp8' is not one of the contract", "e.g. --dtypes fp32,bf16"),
        (["--dtypes", "fp32:bf16"], "not one of the contract", "PARAM alone means PARAM:fp32"),
        (["--dtypes", ","], "no dtype pair given", "e.g. --dtypes fp32,bf16"),
        (["--device", "gpu"], "'gpu' is not a device", "use cpu, cuda or cuda:N"),
        (["--device", "meta"], "cpu and cuda devices only", "use cpu, cuda or cuda:N"),
        (["--backends", "nope"], "unknown backend 'nope'", runnable),
        (["--backends", "cuda"], "cuda cannot run on cpu here", runnable),
        (["--backends", "triton"], "triton cannot run on cpu here", runnable),
        (["--backends", ","], "no backend given", "leave it out for all"),
        (["--ops", "update,jump"], "unknown op(s) 'jump'", "choose from update, update_multi"),
        (["--ops", "", "--no-switch-ema"], "nothing to measure", "name an op or drop one flag"),
        (["--repeats", "0"], "--repeats must be >= 1", "timed calls per candidate"),
        (["--repeats", "-3"], "--repeats must be >= 1", "got -3"),
        (["--repeats", "true"], "--repeats takes a whole number >= 1", "e.g. --repeats 5"),
        (["--repeats", "1.5"], "--repeats takes a whole number >= 1", "got '1.5'"),
        (["--warmup", "-1"], "--warmup must be >= 0", "untimed rounds"),
        (["--warmup", "False"], "--warmup takes a whole number >= 0", "e.g. --warmup 5"),
        (["--threads", "0"], "--threads must be >= 1", "CPU threads"),
        (["--threads", "yes"], "--threads takes a whole number >= 1", "e.g. --threads 5"),
        (["--repeats"], "argument --repeats: expected one argument", "run sema-bench --help"),
        (["--sets", "tiny"], "unrecognized arguments: --sets tiny", "run sema-bench --help"),
        (["--no-progress=yes"], "ignored explicit argument 'yes'", "run sema-bench --help"),
        (["--json", str(tmp)], "is a directory", f"e.g. {tmp / 'profile.json'}"),
        (["--csv", str(tmp / "a_file" / "p.csv")], "a_file is a file, not a directory", "choose another path"),
        (["--json", "/proc/sema-bench/p.json"], "cannot write in /proc", "choose a writable path"),
        (["--json", str(tmp / "p"), "--csv", str(tmp / "p")], "--json and --csv name the same file", "its own path"),
    ]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "torch.cuda.is_available() is False here", "use --device cpu"))
    return cases


BAD_FLAG_IDS = [" ".join(flags).replace("/", "_") or "empty" for flags, _, _ in bad_flags(Path("/tmp"))]


@pytest.mark.parametrize("index", range(len(BAD_FLAG_IDS)), ids=BAD_FLAG_IDS)
def test_every_bad_flag_is_one_line_and_exit_status_2(index, tmp_path, capsys):
    flags, problem, fix = bad_flags(tmp_path)[index]
    before = sorted(tmp_path.iterdir())
    with pytest.raises(SystemExit) as exc:
        profile.main([*FAST, *flags])
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("sema-bench: error: ") and problem in err and fix in err, err
    assert sorted(tmp_path.iterdir()) == before  # nothing written


def test_the_command_exits_2_without_a_traceback():
    script = Path(sys.executable).with_name("sema-bench")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "sema.profile"]
    for argv in (
        [*command, "--set", "tiny", "--repeats", "true"],
        [sys.executable, "-m", "sema.profile", "--device", "x"],
    ):
        done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert done.stdout == ""
