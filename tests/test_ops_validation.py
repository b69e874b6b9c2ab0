"""The functional ops refuse bad input before any write, with the same exception and message on
every backend (issue #13, item 8): overlap between any two tensors of the multi-tensor op,
non-dense tensors, mismatched devices, bad weights and flags."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from conftest import assert_bits_equal, cpu_backends
from torch import nn

from sema import ops

BACKENDS = cpu_backends()

Case = Callable[[torch.Generator], tuple[Callable[[str], None], list[torch.Tensor]]]


def _rand(g: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(dtype)


def _multi(emas, params, w=0.1, switch=False):
    return lambda backend: ops.ema_update_multi_(emas, params, w, switch=switch, backend=backend), [*emas, *params]


def ema_overlaps_another_pairs_param(g):
    shared = _rand(g, 64)
    return _multi([shared[:16], _rand(g, 16)], [_rand(g, 16), shared[8:24]])


def emas_overlap_each_other(g):
    shared = _rand(g, 40)
    return _multi([shared[:24], shared[16:]], [_rand(g, 24), _rand(g, 24)])


def one_param_twice(g):
    p = _rand(g, 3, 5)
    return _multi([_rand(g, 3, 5), _rand(g, 3, 5)], [p, p])


def first_ema_overlaps_last_param_of_2000(g):
    shared = _rand(g, 8)
    emas = [shared[:4]] + [_rand(g, 4) for _ in range(1999)]
    params = [_rand(g, 4) for _ in range(1999)] + [shared[2:6]]
    return _multi(emas, params)


def non_dense_param(g):
    return _multi([_rand(g, 8, 4)[:, ::2], _rand(g, 6)], [_rand(g, 8, 4)[:, ::2], _rand(g, 6)])


def expanded_param(g):
    return _multi([_rand(g, 4, 3)], [_rand(g, 1, 3).expand(4, 3)])


def sparse_param(g):
    return _multi([_rand(g, 5)], [_rand(g, 5).to_sparse()])


def negated_view(g):
    return _multi([_rand(g, 5)], [torch._neg_view(_rand(g, 5))])


def pair_on_two_devices(g):
    return _multi([_rand(g, 5)], [torch.empty(5, device="meta")])


def pairs_on_two_devices(g):
    return _multi([_rand(g, 5), torch.empty(5, device="meta")], [_rand(g, 5), torch.empty(5, device="meta")])


def shapes_differ(g):
    return _multi([_rand(g, 4, 3)], [_rand(g, 3, 4)])


def fp64_param(g):
    return _multi([_rand(g, 5)], [_rand(g, 5, dtype=torch.float64)])


def w_above_one(g):
    return _multi([_rand(g, 5)], [_rand(g, 5)], w=1.5)


def w_nan(g):
    return _multi([_rand(g, 5)], [_rand(g, 5)], w=float("nan"))


def w_bool(g):
    return _multi([_rand(g, 5)], [_rand(g, 5)], w=True)


def w_one_element_vector(g):
    return _multi([_rand(g, 5)], [_rand(g, 5)], w=torch.tensor([0.1]))


def w_on_another_device(g):
    return _multi([_rand(g, 5)], [_rand(g, 5)], w=torch.tensor(0.1, device="meta"))


def w_bad_with_empty_lists(g):
    return _multi([], [], w=2.0)


def switch_as_a_string(g):
    return _multi([_rand(g, 5)], [_rand(g, 5)], switch="no")


def flat_update_overlap(g):
    shared = _rand(g, 24)
    return lambda backend: ops.ema_update_(shared[:16], shared[8:], 0.1, backend=backend), [shared]


def flat_update_switch_as_a_string(g):
    e, p = _rand(g, 9), _rand(g, 9, dtype=torch.bfloat16)
    return lambda backend: ops.ema_update_(e, p, 0.1, switch="False", backend=backend), [e, p]


def flat_swap_restore_as_an_int(g):
    e, p = _rand(g, 9), _rand(g, 9, dtype=torch.bfloat16)
    return lambda backend: ops.swap_(e, p, restore=1, backend=backend), [e, p]


def flat_switch_non_contiguous(g):
    e, p = _rand(g, 18), _rand(g, 9)
    return lambda backend: ops.switch_(e[::2], p, backend=backend), [e, p]


def flat_switch_sparse(g):
    e, p = _rand(g, 9), _rand(g, 9)
    return lambda backend: ops.switch_(e, p.to_sparse(), backend=backend), [e, p]


# case -> (exception type, a phrase its message must hold)
CASES: dict[Case, tuple[type[Exception], str]] = {
    ema_overlaps_another_pairs_param: (ValueError, r"emas\[0\] and params\[1\] share memory"),
    emas_overlap_each_other: (ValueError, r"emas\[0\] and emas\[1\] share memory"),
    one_param_twice: (ValueError, r"params\[0\] and params\[1\] share memory"),
    first_ema_overlaps_last_param_of_2000: (ValueError, r"emas\[0\] and params\[1999\] share memory"),
    non_dense_param: (ValueError, r"emas\[0\] of shape \(8, 2\) with strides \(4, 2\) is not dense"),
    expanded_param: (ValueError, r"params\[0\] of shape \(4, 3\) with strides \(0, 1\) is not dense"),
    sparse_param: (ValueError, r"params\[0\] has layout torch.sparse_coo"),
    negated_view: (ValueError, r"params\[0\] is a lazily negated"),
    pair_on_two_devices: (ValueError, r"pair 0: ema is on cpu but param is on meta"),
    pairs_on_two_devices: (ValueError, r"pair 1 is on meta, pair 0 on cpu"),
    shapes_differ: (ValueError, r"pair 0 differs in shape"),
    fp64_param: (TypeError, r"pair 0: param dtype torch.float64"),
    w_above_one: (ValueError, r"w=1.5 is outside \[0, 1\]"),
    w_nan: (ValueError, r"w=nan is outside"),
    w_bool: (TypeError, r"w must be a float"),
    w_one_element_vector: (ValueError, r"w as a tensor must be a 0-d"),
    w_on_another_device: (ValueError, r"w is on meta but the tensors are on cpu"),
    w_bad_with_empty_lists: (ValueError, r"w=2.0 is outside"),
    switch_as_a_string: (TypeError, r"switch must be True or False, got 'no'"),
    flat_update_overlap: (ValueError, r"ema and param share memory"),
    flat_update_switch_as_a_string: (TypeError, r"switch must be True or False, got 'False'"),
    flat_swap_restore_as_an_int: (TypeError, r"restore must be True or False, got 1"),
    flat_switch_non_contiguous: (ValueError, r"ema must be a 1-D contiguous tensor"),
    flat_switch_sparse: (ValueError, r"param has layout torch.sparse_coo"),
}


@pytest.mark.parametrize("case", list(CASES), ids=lambda c: c.__name__)
def test_bad_input_raises_the_same_on_every_backend_before_any_write(case):
    error, phrase = CASES[case]
    seen = {}
    for i, backend in enumerate(BACKENDS):
        call, tensors = case(torch.Generator().manual_seed(100 + i))
        before = [t.to_dense().clone() if t.layout != torch.strided else t.clone() for t in tensors]
        with pytest.raises(error, match=phrase) as info:
            call(backend)
        seen[backend] = (type(info.value), str(info.value))
        for j, (t, old) in enumerate(zip(tensors, before, strict=True)):
            if t.device.type == "meta":
                continue
            now = t.to_dense() if t.layout != torch.strided else t
            assert_bits_equal(now.resolve_neg().flatten(), old.resolve_neg().flatten(), f"{backend}: tensor {j}")
    assert len(set(seen.values())) == 1, f"backends disagree: {seen}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_disjoint_tensors_of_any_layout_still_update(backend, generator):
    """The checks refuse nothing valid: channels_last pairs, empty tensors, 2,000 small pairs (20
    under the Triton interpreter, which takes milliseconds per block)."""
    n = 20 if backend == "triton" else 2000
    emas = [torch.randn(2, 3, 4, 5, generator=generator).to(memory_format=torch.channels_last), torch.empty(0)]
    emas += [torch.randn(3, generator=generator) for _ in range(n)]
    params = [torch.randn(e.shape, generator=generator).to(memory_format=torch.channels_last) for e in emas[:1]]
    params += [torch.empty(0)] + [torch.randn(3, generator=generator) for _ in range(n)]
    expected = [torch.lerp(e, p, 0.25) for e, p in zip(emas, params, strict=True)]
    ops.ema_update_multi_(emas, params, 0.25, backend=backend)
    for i, (e, x) in enumerate(zip(emas, expected, strict=True)):
        assert_bits_equal(e.flatten(), x.flatten(), f"pair {i}")


def test_check_dense_names_every_param_it_refuses():
    dense = torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last)
    named = [
        ("conv.weight", nn.Parameter(dense)),
        ("gappy", nn.Parameter(torch.randn(6, 4)[:, :2])),
        ("empty", nn.Parameter(torch.empty(0, 3))),
        ("sparse", torch.randn(4).to_sparse()),
    ]
    with pytest.raises(ValueError, match=r"gappy \(shape \(6, 2\), strides \(4, 1\)\), sparse \(torch.sparse_coo\)\."):
        ops.check_dense(named, "SwitchEMA")
    ops.check_dense(named[:1] + named[2:3], "SwitchEMA")


def test_meta_tensors_hold_no_memory_to_overlap():
    """Every meta tensor's data_ptr() is 0: no overlap is read into that (the torch backend runs
    on meta tensors, as tracing does)."""
    ema, param = torch.empty(6, device="meta"), torch.empty(6, device="meta")
    ops.ema_update_(ema, param, 0.5, backend="torch")
    ops.switch_(ema, param, backend="torch")
    ops.ema_update_multi_([ema, torch.empty(2, 3, device="meta")], [param, torch.empty(2, 3, device="meta")], 0.5)
