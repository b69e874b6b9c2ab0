"""The CPU thread planner (sema.cpu_threads) and the paths it opens in the torch and cpp backends.

The planner is driven by a fake clock that a simulated late region advances, so every decision
is checked without timing anything: small work takes no parallel region, the first call of a
kind runs on one thread, a late parallel call backs off to one thread (also in the middle of a
blocked call) and later probes again. The thread count seen by each op is read through a
TorchDispatchMode (torch backend) or a recording wrapper of sema._C (cpp backend). Every new path
is compared bit for bit with the formulas of the backend before the planner, on random bits with
NaN/Inf and NaN-poisoned outputs. The reference backend's blocking decision off the CPU (issue
#12: one op per bucket on CUDA) is checked by counting ops on the meta device.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from conftest import DTYPE_PAIRS, assert_bits_equal, assert_same, pair_id, poisoned, random_bits
from torch.utils._python_dispatch import TorchDispatchMode

import sema
from sema import _ext_cpu, cpu_threads, reference
from sema.cpu_threads import (
    FIRST_BACKOFF_SECONDS,
    LATE_RATIO,
    LATE_SECONDS,
    MAX_BACKOFF_SECONDS,
    SMALL_WORK_BYTES,
    ThreadPlanner,
)

CPP_AVAILABLE, CPP_REASON = sema.available_backends("cpu")["cpp"]
BIG = 3 * reference.CHUNK + 5  # three full blocks and a tail: parallel work in every block


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class NoClock:
    def __call__(self) -> float:
        raise AssertionError("the clock was read for work that should not be timed")


@pytest.fixture
def two_threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def planner(monkeypatch: pytest.MonkeyPatch) -> ThreadPlanner:
    """A fresh planner on a fake clock, used by both CPU backends."""
    fresh = ThreadPlanner(clock=FakeClock())
    monkeypatch.setattr(reference, "PLANNER", fresh)
    monkeypatch.setattr(_ext_cpu, "PLANNER", fresh)
    return fresh


# --- the planner's decisions --------------------------------------------------------------


SIZE = SMALL_WORK_BYTES  # a power of 2: seconds per byte times SIZE is exact


def test_small_work_takes_one_thread_and_is_not_timed():
    plan = ThreadPlanner(clock=NoClock())
    plan.record("op", SMALL_WORK_BYTES - 1, 1, 0.001)  # measured on one thread: only the size keeps it there
    seen = []
    plan.run("op", SMALL_WORK_BYTES - 1, seen.append)
    plan.run("op", SMALL_WORK_BYTES - 1, seen.append)
    assert seen == [1, 1]
    assert plan.threads("op", SMALL_WORK_BYTES - 1, 8) == 1


def test_one_thread_machine_is_not_timed():
    plan = ThreadPlanner(clock=NoClock())
    assert plan.threads("op", 1 << 30, 1) == 1


def test_first_call_of_a_kind_and_size_class_runs_on_one_thread_then_all():
    plan = ThreadPlanner(clock=FakeClock())
    assert plan.threads("a", SIZE, 4) == 1
    plan.record("a", SIZE, 1, 0.010)
    assert plan.threads("a", SIZE, 4) == 4
    assert plan.threads("a", 2 * SIZE - 1, 4) == 4, "same size within a factor of 2: measured"
    assert plan.threads("a", 2 * SIZE, 4) == 1, "another size class has not been measured on one thread"
    assert plan.threads("b", SIZE, 4) == 1, "another kind has not been measured on one thread"


def test_late_call_backs_off_doubles_caps_and_resets():
    clock = FakeClock()
    plan = ThreadPlanner(clock=clock)
    single = 0.004
    plan.record("a", SIZE, 1, single)
    limit = single * LATE_RATIO + LATE_SECONDS

    plan.record("a", SIZE, 4, limit)  # on the limit: on time
    assert plan.threads("a", SIZE, 4) == 4
    assert plan.stats["late"] == 0

    expected_backoff = FIRST_BACKOFF_SECONDS
    for _ in range(12):
        plan.record("a", SIZE, 4, limit * 1.001)
        assert plan.threads("a", SIZE, 4) == 1, "a late call must back off"
        assert plan.threads("other kind", 4 * SIZE, 4) == 1, "contention holds for every kind"
        clock.now += expected_backoff * 0.999
        assert plan.threads("a", SIZE, 4) == 1, "still inside the back-off"
        clock.now += expected_backoff * 0.002
        assert plan.threads("a", SIZE, 4) == 4, "the back-off ended: probe all threads"
        expected_backoff = min(2 * expected_backoff, MAX_BACKOFF_SECONDS)
    assert expected_backoff == MAX_BACKOFF_SECONDS, "the loop must have reached the cap"

    plan.record("a", SIZE, 4, single)  # a probe on time ends the streak
    plan.record("a", SIZE, 4, 1.0)
    clock.now += FIRST_BACKOFF_SECONDS * 1.001
    assert plan.threads("a", SIZE, 4) == 4, "after an on-time probe the back-off restarts short"
    assert plan.stats["late"] == 13


def test_lateness_scales_with_the_bytes_and_uses_the_fastest_one_thread_call():
    plan = ThreadPlanner(clock=FakeClock())
    plan.record("a", SIZE, 1, 0.010)
    plan.record("a", SIZE, 1, 0.004)
    plan.record("a", SIZE, 1, 0.020)
    bigger = SIZE + SIZE // 2  # same size class, 1.5x the bytes
    plan.record("a", bigger, 2, 0.006 * LATE_RATIO + LATE_SECONDS)
    assert plan.stats["late"] == 0, "1.5x the bytes may take 1.5x the time"
    plan.record("a", bigger, 2, 0.006 * LATE_RATIO + LATE_SECONDS + 1e-6)
    assert plan.stats["late"] == 1, "lateness is measured against the fastest one-thread call"


def test_all_threads_forces_and_does_not_record():
    plan = ThreadPlanner(clock=NoClock())
    seen = []
    with plan.all_threads():
        plan.run("a", 1, seen.append)
        plan.run("a", 1 << 30, seen.append)
    assert seen == [torch.get_num_threads()] * 2
    assert plan.stats == {"parallel": 0, "single": 0, "late": 0}


# --- the torch backend: the thread count each ATen op runs with ---------------------------


class ThreadLog(TorchDispatchMode):
    """Records (op, torch.get_num_threads()) for every ATen op that is not a view; a late
    region is simulated by advancing ``clock`` whenever such an op runs on more than one thread."""

    def __init__(self, clock: FakeClock | None = None, late_seconds: float = 0.0) -> None:
        super().__init__()
        self.clock, self.late_seconds = clock, late_seconds
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        threads = torch.get_num_threads()
        if not func.is_view:
            self.calls.append((func.overloadpacket.__name__, threads))
            if self.clock is not None and threads > 1:
                self.clock.now += self.late_seconds
        return func(*args, **(kwargs or {}))


def update_pair(n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, generator=generator), torch.randn(n, generator=generator)


def test_torch_small_update_runs_ops_on_one_thread(planner, two_threads, generator):
    n = 40_000  # above ATen's grain (32768: ATen would open a region), below SMALL_WORK_BYTES
    assert n * 16 < SMALL_WORK_BYTES
    ema, param = update_pair(n, generator)
    with ThreadLog() as log:
        for _ in range(2):  # the second call of a kind is no longer the first: still one thread
            reference.ema_update_(ema, param, 0.1, switch=True)
    assert log.calls == [("lerp_", 1), ("copy_", 1)] * 2


def test_torch_backs_off_in_the_middle_of_a_blocked_call(planner, two_threads, generator):
    ema, param = update_pair(BIG, generator)
    with ThreadLog(planner._clock, late_seconds=1.0) as log:
        reference.ema_update_(ema, param, 0.1, switch=True)
    # block 0: first of its kind, one thread; block 1: two threads, late; block 2: backed off;
    # the 5-element tail: small work
    assert log.calls == [("lerp_", 1), ("copy_", 1), ("lerp_", 2), ("copy_", 2)] + [("lerp_", 1), ("copy_", 1)] * 2
    assert planner.stats["late"] == 1


def test_torch_parallel_blocks_stay_parallel_when_on_time(planner, two_threads, generator):
    ema, param = update_pair(BIG, generator)
    with ThreadLog(planner._clock, late_seconds=0.0) as log:
        reference.ema_update_(ema, param, 0.1, switch=True)
        reference.ema_update_(ema, param, 0.1, switch=True)
    threads = [t for _, t in log.calls]
    assert threads == [1, 1, 2, 2, 2, 2, 1, 1] + [2] * 6 + [1, 1]
    assert planner.stats["late"] == 0


# --- the cpp backend: the thread count each call into C++ receives -------------------------


class RecordingExtension:
    """sema._C with the num_threads of every CPU call recorded; a call on more than one thread
    advances ``clock`` by ``late_seconds``."""

    def __init__(self, real: Any, clock: FakeClock, late_seconds: float) -> None:
        self.real, self.clock, self.late_seconds = real, clock, late_seconds
        self.threads: list[int] = []

    def __getattr__(self, name: str) -> Callable[..., Any]:
        function = getattr(self.real, name)
        if not name.startswith("cpu_") or name == "cpu_isa":
            return function

        def call(*args: Any) -> Any:
            self.threads.append(args[-1])
            if args[-1] > 1:
                self.clock.now += self.late_seconds
            return function(*args)

        return call


@pytest.mark.skipif(not CPP_AVAILABLE, reason=f"backend 'cpp' unavailable: {CPP_REASON}")
@pytest.mark.parametrize("late", [False, True], ids=["on_time", "late"])
def test_cpp_thread_plan(planner, two_threads, monkeypatch, generator, late):
    recorder = RecordingExtension(_ext_cpu._C, planner._clock, 1.0 if late else 0.0)
    monkeypatch.setattr(_ext_cpu, "_C", recorder)
    small_ema, small_param = update_pair(1000, generator)
    ema, param = update_pair(BIG, generator)
    for _ in range(2):  # the second call of a kind is no longer the first: still one thread
        sema.ops.ema_update_(small_ema, small_param, 0.1, backend="cpp")
        sema.ops.switch_(small_ema, small_param, backend="cpp")
        sema.ops.swap_(small_ema, small_param, backend="cpp")
        sema.ops.ema_update_multi_([small_ema], [small_param], 0.1, backend="cpp")
    assert recorder.threads == [1] * 8, "small work must take no parallel region"
    recorder.threads.clear()
    for _ in range(3):
        sema.ops.ema_update_(ema, param, 0.1, backend="cpp")
    assert recorder.threads == ([1, 2, 1] if late else [1, 2, 2])
    planner._clock.now += FIRST_BACKOFF_SECONDS * 1.001
    sema.ops.ema_update_(ema, param, 0.1, backend="cpp")
    assert recorder.threads[-1] == 2, "after the back-off the next call probes all threads"


@pytest.mark.skipif(not CPP_AVAILABLE, reason=f"backend 'cpp' unavailable: {CPP_REASON}")
def test_cpp_small_work_takes_all_threads_when_forced(planner, two_threads, monkeypatch, generator):
    recorder = RecordingExtension(_ext_cpu._C, planner._clock, 0.0)
    monkeypatch.setattr(_ext_cpu, "_C", recorder)
    ema, param = update_pair(1000, generator)
    with planner.all_threads():
        sema.ops.ema_update_(ema, param, 0.1, backend="cpp")
    assert recorder.threads == [2], "the cpp tests rely on all_threads() to reach the parallel kernels"


# --- bit identity of the new paths with the formulas before the planner --------------------


def previous_update(ema: torch.Tensor, param: torch.Tensor, w: float, switch: bool) -> None:
    """The torch backend's update as it was before the planner (2**20-element blocks everywhere)."""

    def blocks(*tensors):
        for start in range(0, tensors[0].numel(), 1 << 20):
            yield tuple(t.narrow(0, start, min(1 << 20, tensors[0].numel() - start)) for t in tensors)

    if ema.dtype == param.dtype == torch.float32:
        if not switch:
            ema.lerp_(param, w)
            return
        for e, p in blocks(ema, param):
            e.lerp_(p, w)
            p.copy_(e)
    elif ema.dtype == torch.float32:
        for e, p in blocks(ema, param):
            e.lerp_(p.float(), w)
            if switch:
                p.copy_(e)
    elif not switch:
        ema.lerp_(param, w)
    else:
        for e, p in blocks(ema, param):
            e.lerp_(p, w)
            p.copy_(e)


PLANS = ["one_thread", "all_threads", "blocks_of_4099", "whole_bucket"]


def run_in_plan(plan: str, planner: ThreadPlanner, monkeypatch: pytest.MonkeyPatch, op: Callable[[], None]) -> None:
    if plan == "one_thread":
        planner._single_until = float("inf")
        op()
    elif plan == "all_threads":
        with planner.all_threads():
            op()
    else:
        chunk = 4099 if plan == "blocks_of_4099" else None
        monkeypatch.setattr(reference, "chunk_elements", lambda device, two_pass, temporaries: chunk)
        op()


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("switch", [False, True], ids=["update", "update_switch"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_torch_update_paths_match_previous_formula(pair, switch, plan, planner, two_threads, monkeypatch, generator):
    param_dtype, ema_dtype = pair
    n = 2 * reference.CHUNK + 4097
    ema, param = random_bits(n, ema_dtype, generator), random_bits(n, param_dtype, generator)
    expected_ema, expected_param = ema.clone(), param.clone()
    previous_update(expected_ema, expected_param, 0.3, switch)
    run_in_plan(plan, planner, monkeypatch, lambda: reference.ema_update_(ema, param, 0.3, switch))
    assert_same(ema, expected_ema, f"ema, plan {plan}")
    assert_same(param, expected_param, f"param, plan {plan}")


@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_torch_switch_and_swap_paths_match_previous_formula(pair, plan, planner, two_threads, monkeypatch, generator):
    param_dtype, ema_dtype = pair
    n = 2 * reference.CHUNK + 4097
    ema = random_bits(n, ema_dtype, generator)
    param = poisoned(n, param_dtype)  # every element must be written
    run_in_plan(plan, planner, monkeypatch, lambda: reference.switch_(ema, param))
    assert_same(param, ema.to(param_dtype), f"switched param, plan {plan}")
    if ema_dtype != param_dtype and param_dtype != torch.bfloat16:
        return  # no in-place swap for fp16 params with an fp32 EMA
    param = random_bits(n, param_dtype, generator)
    original_ema, original_param = ema.clone(), param.clone()
    run_in_plan(plan, planner, monkeypatch, lambda: reference.swap_(ema, param))
    if ema_dtype == param_dtype:
        assert_bits_equal(ema, original_param, f"swapped ema, plan {plan}")
        assert_bits_equal(param, original_ema, f"swapped param, plan {plan}")
    else:
        ema_bits = original_ema.view(torch.int32)
        carry = ((ema_bits & 0xFFFF) >= 0x8000).to(torch.int32)
        expected_param = (((ema_bits >> 16) + carry) & 0xFFFF).to(torch.int16)  # hi16(E) + carry, wrapped
        expected_ema = (original_param.view(torch.int16).to(torch.int32) << 16) | (ema_bits & 0xFFFF)
        assert_bits_equal(param.view(torch.int16), expected_param, f"packed param, plan {plan}")
        assert_bits_equal(ema.view(torch.int32), expected_ema, f"packed ema, plan {plan}")
    run_in_plan(plan, planner, monkeypatch, lambda: reference.swap_(ema, param, restore=True))
    assert_bits_equal(ema, original_ema, f"restored ema, plan {plan}")
    assert_bits_equal(param, original_param, f"restored param, plan {plan}")


@pytest.mark.skipif(not CPP_AVAILABLE, reason=f"backend 'cpp' unavailable: {CPP_REASON}")
@pytest.mark.parametrize("switch", [False, True], ids=["update", "update_switch"])
@pytest.mark.parametrize("pair", DTYPE_PAIRS, ids=pair_id)
def test_cpp_one_thread_plan_matches_all_threads(pair, switch, planner, two_threads, generator):
    param_dtype, ema_dtype = pair
    n = 2**20 + 4097
    ema, param = random_bits(n, ema_dtype, generator), random_bits(n, param_dtype, generator)
    expected_ema, expected_param = ema.clone(), param.clone()
    with planner.all_threads():
        sema.ops.ema_update_(expected_ema, expected_param, 0.3, switch=switch, backend="cpp")
    planner._single_until = float("inf")
    sema.ops.ema_update_(ema, param, 0.3, switch=switch, backend="cpp")
    assert_same(ema, expected_ema, "ema on one thread vs all threads")
    assert_same(param, expected_param, "param on one thread vs all threads")


# --- blocking off the CPU (issue #12: one op per bucket on CUDA) ----------------------------


def test_blocking_decision_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert reference.chunk_elements(cpu, two_pass=True, temporaries=False) == reference.CHUNK
    assert reference.chunk_elements(cpu, two_pass=False, temporaries=False) is None
    assert reference.chunk_elements(cuda, two_pass=True, temporaries=False) is None
    assert reference.chunk_elements(cuda, two_pass=True, temporaries=True) == reference.TEMPORARY_CHUNK


def count_ops(fn: Callable[[], None]) -> list[str]:
    with ThreadLog() as log:
        fn()
    return [name for name, _ in log.calls]


@pytest.mark.parametrize("n", [17, 5 * 2**20 + 3], ids=["n17", "n5M"])
def test_meta_device_runs_one_op_per_bucket(n):
    """A 1B-parameter bucket on a GPU must not become a thousand 2**20-element launches."""
    meta = torch.device("meta")
    ema, param = torch.empty(n, device=meta), torch.empty(n, device=meta)
    assert count_ops(lambda: reference.ema_update_(ema, param, 0.1, switch=True)) == ["lerp_", "copy_"]
    assert count_ops(lambda: reference.ema_update_(ema, param, torch.tensor(0.1, device=meta))) == ["lerp_"]
    half = torch.empty(n, device=meta, dtype=torch.bfloat16)
    assert count_ops(lambda: reference.switch_(ema, half)) == ["copy_"]


def test_meta_device_bounds_temporaries_to_large_blocks():
    meta = torch.device("meta")
    n = 3 * reference.TEMPORARY_CHUNK + 5  # four blocks; nothing is allocated on meta
    ema, param = torch.empty(n, device=meta), torch.empty(n, device=meta, dtype=torch.bfloat16)
    ops = count_ops(lambda: reference.ema_update_(ema, param, 0.1))
    assert ops.count("lerp_") == 4, ops


def test_cpu_still_blocks_two_pass_ops(planner, generator):
    ema, param = update_pair(BIG, generator)
    ops = count_ops(lambda: reference.ema_update_(ema, param, 0.1, switch=True))
    assert ops == ["lerp_", "copy_"] * 4


def test_planner_module_is_the_one_the_backends_use():
    assert reference.PLANNER is cpu_threads.PLANNER
    assert _ext_cpu.PLANNER is cpu_threads.PLANNER
