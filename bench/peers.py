"""sema against the EMA implementations people use, on the same parameter sets, in one process.

Each peer updates an EMA of the same model the way its users call it, configured so that every
call does one full EMA step with the same decay as sema (warm-up schedules and "update every
k steps" turned off, the first call's plain copy done before timing): so all rows time the
same work, ``ema <- decay * ema + (1 - decay) * param`` over every parameter.

    timm ModelEmaV3        timm's own class where timm is installed: ``ModelEmaV3(model, decay,
                           use_warmup=False, foreach=True)``, with ``dtype=torch.float32`` for a
                           low-precision model (timm versions without ``dtype=`` keep the EMA in
                           the model's dtype). Where timm is missing (here it needs a torchvision
                           that loads beside this torch), a reimplementation of its foreach
                           algorithm runs instead: deep copy of the model, ``_foreach_lerp_`` over
                           the floating tensors of both state_dicts, EMA in the model's dtype.
    AveragedModel          torch.optim.swa_utils, ``multi_avg_fn=get_ema_multi_avg_fn(decay)``.
    ema-pytorch EMA        lucidrains' ``EMA``, default (per-tensor ``lerp_``) and ``use_foreach=True``.
    torch_ema              ``ExponentialMovingAverage(params, decay, use_num_updates=False)``.
    diffusers EMAModel     ``EMAModel(params, decay, min_decay=decay)``, default and ``foreach=True``.
    per-tensor loop        ``for e, p: e.lerp_(p, 1 - decay)``.
    NeMo-style             reimplemented here: NeMo's EMA keeps copies of the params (their dtype)
                           and updates them with ``_foreach_mul_`` + ``_foreach_add_``.

timm's own class is imported where ``import timm`` works, and otherwise loaded from the file
``utils/model_ema.py`` of the timm that ``make install`` puts in ``.venv/peers`` (``import timm``
needs torchvision, as tests/test_migration.py explains); the reimplementation runs only where
neither exists.

The drop-ins of ``sema.compat`` (issue #16) run beside the peer each one replaces, built by the
same code as that peer's row with only the import changed, so they get the peer's own arguments
and its per-step call (``ModelEmaV3.update(model)``, ``ExponentialMovingAverage.update()``,
``EMAModel.step(model.parameters())``, ``EMA.update()``), each on a copy of the model of its own
(a drop-in re-points its model's params into sema's buckets, as a user's model would be).
``peer_speedup`` gives, per configuration of the replaced peer that ran with the same EMA dtype,
peer ms / drop-in ms (> 1: the drop-in is faster). A drop-in that cannot be imported yet is a
skipped row with the reason.

bf16 models: sema keeps an fp32 EMA by default. Each peer runs in its own fp32-EMA
configuration where it has one (``config`` says which). Peers without one (the timm
reimplementation, NeMo-style) keep the EMA in the params' dtype (``fp32_ema`` is false) and are
compared with a sema row that does the same (``sema_auto_same_dtype``: ``ema_dtype=None``), so
each comparison moves the same bytes; ``compared_with`` names the sema row of each speed-up.

Timing as in ``sema.profile``: candidates round-robin, median of the calls (CUDA events / CPU
``perf_counter``); a buffer twice the last-level cache is written between calls (untimed), so
no call finds its data in the cache. GB/s use the update's bytes, 2E + P per element.

    python bench/peers.py                      # ResNet-50, ViT-B/16, GPT-2, many small; fp32 + bf16
    python bench/peers.py --quick              # tiny set, few repeats (CI)
    python bench/peers.py --sets gpt2_124m --json bench/results/peers-....json --plot peers.png
    python bench/peers.py --peers dropins      # only the drop-ins and the peers they replace
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import gc
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import sema
from sema import profile
from sema.param_sets import MODEL_SETS, PARAM_SETS, numel

DECAY = 0.999
DEFAULT_SETS = ("resnet50", "vit_b16", "gpt2_124m", "many_small")
QUICK_SETS = ("tiny",)
DEFAULT_REPEATS = {"cpu": 11, "cuda": 50}
QUICK_REPEATS = 5
DROPINS = "dropins"  # the --peers name for every drop-in and the peers they replace


@dataclass
class PeerSetup:
    """A peer attached to one model: ``update()`` is one EMA step as its users call it;
    ``emas()`` gives its EMA tensors in ``model.parameters()`` order."""

    update: Callable[[], object]
    emas: Callable[[], list[Tensor]]
    ema_dtype: torch.dtype
    config: str
    fp32_ema: bool


@dataclass(frozen=True)
class Peer:
    name: str
    label: str
    package: str | None  # the distribution it needs (None: torch only, or reimplemented here)
    reimplementation: bool
    build: Callable[[nn.Module, float, bool], PeerSetup]  # (model, decay, want an fp32 EMA)
    stands_in_for: str | None = None  # a reimplementation that runs only where this package is missing
    drop_in: str | None = None  # "module:Class" of a sema.compat drop-in (package is None then)
    replaces: tuple[str, ...] = ()  # a drop-in: the rows of the peer it replaces, one per configuration

    def availability(self) -> tuple[bool, str]:
        if self.drop_in is not None:
            return _drop_in_availability(self.drop_in)
        if self.stands_in_for is not None and _installed(self.stands_in_for):
            return False, f"{self.stands_in_for} is installed: its own class runs instead"
        if self.package is None:
            return True, "reimplemented here" if self.reimplementation else "part of torch"
        if not _installed(self.package):
            torch_pin = torch.__version__.split("+")[0]  # keep pip from replacing this torch
            return False, f"{self.package} is not installed (pip install {self.package} torch=={torch_pin})"
        return True, f"{self.package} {_version(self.package)}"


# Where `make install` puts timm (without its dependencies: `import timm` needs torchvision).
TIMM_PEERS_DIR = Path(sys.prefix) / "peers"


def _timm_model_ema_file() -> Path | None:
    candidates = [TIMM_PEERS_DIR / "timm" / "utils" / "model_ema.py"]
    try:
        spec = importlib.util.find_spec("timm")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.origin is not None:  # found, but its import may still fail
        candidates.append(Path(spec.origin).parent / "utils" / "model_ema.py")
    return next((path for path in candidates if path.is_file()), None)


def _installed(package: str) -> bool:
    module = {"ema-pytorch": "ema_pytorch", "torch-ema": "torch_ema"}.get(package, package)
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    return found or (package == "timm" and _timm_model_ema_file() is not None)


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        for dist in importlib.metadata.distributions(path=[str(TIMM_PEERS_DIR)]):
            if dist.metadata["Name"] == package:
                return f"{dist.version} (utils/model_ema.py loaded from {TIMM_PEERS_DIR})"
        return "(version unknown)"


@functools.cache
def _timm_model_ema_module() -> Any:
    path = _timm_model_ema_file()
    if path is None:
        raise ImportError(f"timm is not importable and {TIMM_PEERS_DIR} has no timm/utils/model_ema.py")
    spec = importlib.util.spec_from_file_location("_bench_peers_timm_model_ema", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _timm_class() -> type:
    """timm's ``ModelEmaV3``: from ``timm.utils`` where timm imports, else from its file."""
    try:
        from timm.utils import ModelEmaV3
    except Exception:  # ImportError, or the RuntimeError of a torchvision built for another torch
        return _timm_model_ema_module().ModelEmaV3
    return ModelEmaV3


def _drop_in_class(target: str) -> type:
    module, name = target.split(":")
    return getattr(importlib.import_module(module), name)


def _drop_in_availability(target: str) -> tuple[bool, str]:
    # Anything the import raises (the module is being written) makes a skipped row, never a crash.
    try:
        _drop_in_class(target)
    except Exception as exc:
        return False, f"{target.replace(':', '.')} is not installed in this sema ({type(exc).__name__}: {exc})"
    return True, f"sema {sema.__version__}"


def _low_precision(model: nn.Module) -> bool:
    return any(p.dtype != torch.float32 for p in model.parameters())


def _timm_model_ema_v3(model: nn.Module, decay: float, fp32: bool, load: Callable[[], type] = _timm_class) -> PeerSetup:
    ModelEmaV3 = load()
    accepted = inspect.signature(ModelEmaV3).parameters
    options: dict[str, Any] = {"decay": decay, "use_warmup": False, "foreach": True}
    config = "ModelEmaV3(model, decay=decay, use_warmup=False, foreach=True"
    if fp32 and _low_precision(model):
        if "dtype" in accepted:
            options["dtype"] = torch.float32
            config += ", dtype=torch.float32)"
        else:
            config += "); this timm has no dtype=: the EMA stays in the params' dtype"
    else:
        config += ")"
    ema = ModelEmaV3(model, **options)  # a deep copy: no first update needed
    ema_dtype = next(ema.module.parameters()).dtype
    return PeerSetup(
        lambda: ema.update(model),
        lambda: list(ema.module.parameters()),
        ema_dtype,
        config,
        ema_dtype == torch.float32,
    )


def _timm_model_ema_v3_reimplemented(model: nn.Module, decay: float, fp32: bool) -> PeerSetup:
    # timm's ModelEmaV3 (foreach=True): the EMA is a deep copy of the model; an update lerps the
    # floating entries of the two state_dicts with one _foreach_lerp_ and copies the others.
    ema_module = copy.deepcopy(model).requires_grad_(False)

    @torch.no_grad()
    def update() -> None:
        ema_floats, model_floats = [], []
        for ema_value, model_value in zip(ema_module.state_dict().values(), model.state_dict().values(), strict=True):
            if ema_value.is_floating_point():
                ema_floats.append(ema_value)
                model_floats.append(model_value)
            else:
                ema_value.copy_(model_value)
        torch._foreach_lerp_(ema_floats, model_floats, weight=1.0 - decay)

    low = _low_precision(model)
    return PeerSetup(
        update,
        lambda: list(ema_module.parameters()),
        next(model.parameters()).dtype,
        "ModelEmaV3(model, decay) algorithm, foreach=True"
        + ("; no fp32 EMA for a low-precision model: _foreach_lerp_ needs equal dtypes" if low else ""),
        not low,
    )


def _averaged_model(model: nn.Module, decay: float, fp32: bool) -> PeerSetup:
    from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn, get_ema_multi_avg_fn

    if fp32 and _low_precision(model):
        # The multi-tensor path lerps with equal dtypes only; the per-tensor avg_fn path promotes.
        averaged = AveragedModel(model, avg_fn=get_ema_avg_fn(decay)).to(torch.float32)
        config = "AveragedModel(model, avg_fn=get_ema_avg_fn(decay)).float(): per-tensor path"
    else:
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
        config = "AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))"
    averaged.update_parameters(model)  # the first call copies
    return PeerSetup(
        lambda: averaged.update_parameters(model),
        lambda: list(averaged.module.parameters()),
        next(averaged.module.parameters()).dtype,
        config,
        next(averaged.module.parameters()).dtype == torch.float32,
    )


def _ema_pytorch_class() -> type:
    from ema_pytorch import EMA

    return EMA


def _ema_pytorch(
    use_foreach: bool, load: Callable[[], type] = _ema_pytorch_class
) -> Callable[[nn.Module, float, bool], PeerSetup]:
    def build(model: nn.Module, decay: float, fp32: bool) -> PeerSetup:
        EMA = load()

        # min_value=decay switches the warm-up off; update_every=1 and update_after_step=0 make
        # every call an EMA step.
        options = dict(beta=decay, update_after_step=0, update_every=1, min_value=decay, use_foreach=use_foreach)
        config = (
            f"EMA(model, beta=decay, min_value=decay, update_every=1, update_after_step=0, use_foreach={use_foreach})"
        )
        if fp32 and _low_precision(model):
            ema = EMA(model, ema_model=copy.deepcopy(model).to(torch.float32), coerce_dtype=True, **options)
            config += " with ema_model=deepcopy(model).float(), coerce_dtype=True"
        else:
            ema = EMA(model, **options)
        ema.update()  # the first call copies
        return PeerSetup(
            ema.update,
            lambda: list(ema.ema_model.parameters()),
            next(ema.ema_model.parameters()).dtype,
            config,
            next(ema.ema_model.parameters()).dtype == torch.float32,
        )

    return build


def _torch_ema_class() -> type:
    from torch_ema import ExponentialMovingAverage

    return ExponentialMovingAverage


def _torch_ema(model: nn.Module, decay: float, fp32: bool, load: Callable[[], type] = _torch_ema_class) -> PeerSetup:
    ExponentialMovingAverage = load()
    ema = ExponentialMovingAverage(model.parameters(), decay=decay, use_num_updates=False)
    config = "ExponentialMovingAverage(model.parameters(), decay, use_num_updates=False)"
    if fp32 and _low_precision(model):
        ema.to(dtype=torch.float32)
        config += ", .to(dtype=torch.float32)"
    return PeerSetup(
        ema.update,
        lambda: list(ema.shadow_params),
        ema.shadow_params[0].dtype,
        config,
        ema.shadow_params[0].dtype == torch.float32,
    )


def _diffusers_class() -> type:
    from diffusers.training_utils import EMAModel

    return EMAModel


def _diffusers(
    foreach: bool, load: Callable[[], type] = _diffusers_class
) -> Callable[[nn.Module, float, bool], PeerSetup]:
    def build(model: nn.Module, decay: float, fp32: bool) -> PeerSetup:
        EMAModel = load()

        ema = EMAModel(model.parameters(), decay=decay, min_decay=decay, foreach=foreach)
        config = f"EMAModel(model.parameters(), decay, min_decay=decay, foreach={foreach})"
        if fp32 and _low_precision(model):
            ema.to(dtype=torch.float32)
            config += ", .to(dtype=torch.float32)"
        ema.step(model.parameters())  # the first step copies (decay 0)
        return PeerSetup(
            lambda: ema.step(model.parameters()),
            lambda: list(ema.shadow_params),
            ema.shadow_params[0].dtype,
            config,
            ema.shadow_params[0].dtype == torch.float32,
        )

    return build


def _loop(model: nn.Module, decay: float, fp32: bool) -> PeerSetup:
    params = list(model.parameters())
    with torch.no_grad():
        emas = [p.detach().to(torch.float32 if fp32 else p.dtype, copy=True) for p in params]

    @torch.no_grad()
    def update() -> None:
        for e, p in zip(emas, params, strict=True):
            e.lerp_(p if p.dtype == e.dtype else p.to(e.dtype), 1.0 - decay)

    return PeerSetup(update, lambda: emas, emas[0].dtype, "for e, p: e.lerp_(p.to(e.dtype), 1 - decay)", fp32)


def _nemo_style(model: nn.Module, decay: float, fp32: bool) -> PeerSetup:
    # NeMo's EMA (EMAOptimizer) keeps a copy of each param in its own dtype and, after each
    # optimizer step, scales the copies by decay and adds (1 - decay) * params, one foreach each.
    params = list(model.parameters())
    emas = tuple(p.detach().clone() for p in params)

    @torch.no_grad()
    def update() -> None:
        current = tuple(p.data for p in params)
        torch._foreach_mul_(emas, decay)
        torch._foreach_add_(emas, current, alpha=1.0 - decay)

    low = _low_precision(model)
    return PeerSetup(
        update,
        lambda: list(emas),
        emas[0].dtype,
        "_foreach_mul_(emas, decay); _foreach_add_(emas, params, alpha=1 - decay)"
        + ("; no fp32 EMA: NeMo keeps the EMA in the params' dtype" if low else ""),
        not low,
    )


PEERS: dict[str, Peer] = {
    peer.name: peer
    for peer in (
        Peer("timm_v3", "timm ModelEmaV3", "timm", False, _timm_model_ema_v3),
        Peer(
            "timm_v3_reimpl",
            "timm ModelEmaV3 (reimpl., foreach lerp)",
            None,
            True,
            _timm_model_ema_v3_reimplemented,
            stands_in_for="timm",
        ),
        Peer("averaged_model", "torch AveragedModel + get_ema_*avg_fn", None, False, _averaged_model),
        Peer("ema_pytorch", "ema-pytorch EMA", "ema-pytorch", False, _ema_pytorch(False)),
        Peer("ema_pytorch_foreach", "ema-pytorch EMA use_foreach", "ema-pytorch", False, _ema_pytorch(True)),
        Peer("torch_ema", "torch_ema ExponentialMovingAverage", "torch-ema", False, _torch_ema),
        Peer("diffusers", "diffusers EMAModel", "diffusers", False, _diffusers(False)),
        Peer("diffusers_foreach", "diffusers EMAModel foreach", "diffusers", False, _diffusers(True)),
        Peer("loop", "per-tensor lerp_ loop", None, False, _loop),
        Peer("nemo_style", "NeMo-style foreach mul+add (reimpl.)", None, True, _nemo_style),
        # The drop-ins: the peer's build code with the import changed, on the peer's default options.
        Peer(
            "compat_timm_v3",
            "sema.compat.timm ModelEmaV3",
            None,
            False,
            functools.partial(_timm_model_ema_v3, load=lambda: _drop_in_class("sema.compat.timm:ModelEmaV3")),
            drop_in="sema.compat.timm:ModelEmaV3",
            replaces=("timm_v3", "timm_v3_reimpl"),
        ),
        Peer(
            "compat_ema_pytorch",
            "sema.compat.ema_pytorch EMA",
            None,
            False,
            _ema_pytorch(False, load=lambda: _drop_in_class("sema.compat.ema_pytorch:EMA")),
            drop_in="sema.compat.ema_pytorch:EMA",
            replaces=("ema_pytorch", "ema_pytorch_foreach"),
        ),
        Peer(
            "compat_torch_ema",
            "sema.compat.torch_ema ExponentialMovingAverage",
            None,
            False,
            functools.partial(
                _torch_ema, load=lambda: _drop_in_class("sema.compat.torch_ema:ExponentialMovingAverage")
            ),
            drop_in="sema.compat.torch_ema:ExponentialMovingAverage",
            replaces=("torch_ema",),
        ),
        Peer(
            "compat_diffusers",
            "sema.compat.diffusers EMAModel",
            None,
            False,
            _diffusers(False, load=lambda: _drop_in_class("sema.compat.diffusers:EMAModel")),
            drop_in="sema.compat.diffusers:EMAModel",
            replaces=("diffusers", "diffusers_foreach"),
        ),
    )
}


def select_peers(names: Sequence[str]) -> list[str]:
    """The peer rows to run for ``--peers``: ``dropins`` means every drop-in, and a drop-in brings
    the peers it replaces (its speed-up needs them). Raises ValueError naming unknown names."""
    unknown = [name for name in names if name not in PEERS and name != DROPINS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; choose from {DROPINS}, {', '.join(PEERS)}")
    picked: list[str] = []
    for name in names:
        group = [n for n, p in PEERS.items() if p.drop_in] if name == DROPINS else [name]
        for member in group:
            picked += [member, *PEERS[member].replaces]
    return [name for name in PEERS if name in picked]  # PEERS order: peers before their drop-ins


def add_drop_in_speedups(rows: list[dict[str, Any]]) -> None:
    """Gives each drop-in row ``peer_speedup``: for each row of the peer it replaces on the same
    set and param dtype, peer median / drop-in median (> 1: the drop-in is faster). A peer row
    that was skipped, or whose EMA dtype differs (other bytes moved), is named in
    ``peer_speedup_notes`` instead."""
    by_key = {(r["param_set"], r["param_dtype"], r["peer"]): r for r in rows}
    for row in rows:
        peer = PEERS.get(row["peer"])
        if peer is None or not peer.replaces:
            continue
        row["replaces"] = list(peer.replaces)
        if "skipped" in row:
            continue
        speedups, notes = {}, {}
        for name in peer.replaces:
            other = by_key.get((row["param_set"], row["param_dtype"], name))
            if other is None or ("skipped" in other and PEERS[name].stands_in_for):
                continue  # not run, or a reimplementation that stood aside for the real peer
            if "skipped" in other:
                notes[name] = f"not measured: {other['skipped']}"
            elif other["ema_dtype"] != row["ema_dtype"]:
                notes[name] = f"not compared: its EMA is {other['ema_dtype']}, the drop-in's {row['ema_dtype']}"
            else:
                speedups[name] = other["median_ms"] / row["median_ms"]
        row["peer_speedup"] = speedups
        if notes:
            row["peer_speedup_notes"] = notes


def sema_setup(
    model: nn.Module, decay: float, backend: str = "auto", ema_dtype: torch.dtype | None = torch.float32
) -> PeerSetup:
    """sema's ``SwitchEMA`` (no switching: the plain EMA step the peers do) on ``model``,
    which it re-points into flat buckets: give it a model of its own. ``ema_dtype=None`` keeps
    the EMA in the params' dtype."""
    averager = sema.SwitchEMA(model, decay=decay, switch_every=None, ema_dtype=ema_dtype, backend=backend)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    resolved_dtype = ema_dtype or next(model.parameters()).dtype

    def emas() -> list[Tensor]:
        state = averager.state_dict()["ema"]
        return [state[n] for n in names]

    resolved = ", ".join(sorted(set(averager.backends.values())))
    dtype_option = "" if ema_dtype == torch.float32 else f", ema_dtype={ema_dtype}"
    config = f"SwitchEMA(model, decay, switch_every=None{dtype_option}, backend={backend!r}): {resolved}"
    return PeerSetup(averager.update, emas, resolved_dtype, config, resolved_dtype == torch.float32)


# --- the benchmark -----------------------------------------------------------------------------


def memory_needed(n: int, param_dtype: torch.dtype, n_peers: int, n_drop_ins: int = 0) -> int:
    """Peak bytes: four models (peers', sema auto's, sema torch's, sema same-dtype's) and one per
    drop-in, two fp32 sema EMAs and one in the params' dtype, one EMA per peer or drop-in (fp32 at
    most; ``n_peers`` counts both), the fp32 temporaries some peers make, and slack."""
    p = param_dtype.itemsize
    return n * ((5 + n_drop_ins) * p + 2 * 4 + n_peers * 4 + 2 * 4) + (256 << 20)


def run_set(
    set_name: str,
    dtype_name: str,
    device: torch.device,
    repeats: int,
    warmup: int,
    peer_names: Sequence[str],
    decay: float = DECAY,
    progress: profile.Progress | None = None,
) -> list[dict[str, Any]]:
    """Time sema (auto and torch backends) and every peer on one set and param dtype."""
    shapes = PARAM_SETS[set_name]()
    n = numel(shapes)
    param_dtype = profile.DTYPES[dtype_name]
    base = {"param_set": set_name, "tensors": len(shapes), "elements": n, "param_dtype": dtype_name}
    runnable = [name for name in peer_names if PEERS[name].availability()[0]]
    n_drop_ins = sum(PEERS[name].drop_in is not None for name in runnable)
    need, have = memory_needed(n, param_dtype, len(runnable), n_drop_ins), profile.available_memory(device)
    if need > profile.MEMORY_FRACTION * have:
        reason = (
            f"needs about {need / 1e9:.1f} GB on {device}, {have / 1e9:.1f} GB available "
            f"(at most {profile.MEMORY_FRACTION:.0%} used); pick fewer peers or a smaller set"
        )
        return [{**base, "peer": "(all)", "skipped": reason}]

    torch.manual_seed(0)
    model = profile.module_of(shapes, param_dtype, device)
    setups: dict[str, PeerSetup] = {}
    drop_in_models: list[nn.Module] = []
    rows: list[dict[str, Any]] = []
    for backend in ("auto", "torch"):
        setups[f"sema_{backend}"] = sema_setup(copy.deepcopy(model), decay, backend)
    if param_dtype != torch.float32:  # the counterpart of peers that keep the EMA in the params' dtype
        setups["sema_auto_same_dtype"] = sema_setup(copy.deepcopy(model), decay, "auto", ema_dtype=None)
    for name in peer_names:
        peer = PEERS[name]
        ok, why = peer.availability()
        if not ok:
            rows.append({**base, "peer": name, "label": peer.label, "skipped": why})
            continue
        own_model = copy.deepcopy(model) if peer.drop_in else model
        try:  # a peer whose installed version does not take these arguments is reported, not fatal
            setup = peer.build(own_model, decay, True)
            setup.update()
        except Exception as exc:
            rows.append({**base, "peer": name, "label": peer.label, "skipped": f"failed: {type(exc).__name__}: {exc}"})
            continue
        setups[name] = setup
        if peer.drop_in:  # kept alive: torch_ema-style classes hold only weak references to the params
            drop_in_models.append(own_model)

    flush = torch.ones(2 * profile.cache_bytes(device), dtype=torch.uint8, device=device)
    candidates = {
        name: profile.Candidate(lambda i, s=setup: s.update(), lambda i, f=flush: f.fill_(i & 0xFF))
        for name, setup in setups.items()
    }
    errors: dict[str, str] = {}
    timings = profile.measure(candidates, device, repeats, warmup, progress, errors)
    for name, error in errors.items():
        if name not in PEERS:
            raise RuntimeError(f"{name} failed while timed: {error}")
        rows.append({**base, "peer": name, "label": PEERS[name].label, "skipped": f"failed while timed: {error}"})
        del setups[name]
    labels = {
        "sema_auto": "sema SwitchEMA.update (auto backend)",
        "sema_torch": "sema SwitchEMA.update (torch backend)",
        "sema_auto_same_dtype": "sema SwitchEMA.update (auto, param-dtype EMA)",
    }
    for name, setup in setups.items():
        t = timings[name]
        nbytes = profile.bytes_per_element("update", param_dtype, setup.ema_dtype) * n
        peer = PEERS.get(name)
        # Each row against the sema row that keeps its EMA in the same dtype: the same bytes.
        same = "sema_auto" if setup.fp32_ema or "sema_auto_same_dtype" not in setups else "sema_auto_same_dtype"
        rows.append(
            {
                **base,
                "peer": name,
                "label": labels.get(name) or peer.label,
                "version": peer.availability()[1] if peer else f"sema {sema.__version__}",
                "reimplementation": bool(peer and peer.reimplementation),
                "ema_dtype": profile.DTYPE_NAMES[setup.ema_dtype],
                "fp32_ema": setup.fp32_ema,
                "config": setup.config,
                **t.row_fields(nbytes),
                "compared_with": same,
                "sema_auto_speedup": t.median_s / timings[same].median_s,
                "sema_torch_speedup": t.median_s / timings["sema_torch"].median_s,
                **({"drop_in": peer.drop_in.replace(":", ".")} if peer and peer.drop_in else {}),
            }
        )
    add_drop_in_speedups(rows)
    del setups, candidates, model, drop_in_models, flush
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(
    sets: Sequence[str],
    dtypes: Sequence[str],
    device: torch.device,
    repeats: int,
    warmup: int = 2,
    peer_names: Sequence[str] = tuple(PEERS),
    progress: bool = True,
) -> dict[str, Any]:
    """Every set x param dtype; returns ``{"provenance", "settings", "peers", "rows"}``."""
    bar = profile.Progress(len(sets) * len(dtypes) * (warmup + repeats), enabled=progress)
    rows = []
    try:
        for set_name in sets:
            for dtype_name in dtypes:
                bar.describe(f"peers {set_name} {dtype_name}")
                rows += run_set(set_name, dtype_name, device, repeats, warmup, peer_names, progress=bar)
    finally:
        bar.close()
    return {
        "what": "sema SwitchEMA.update vs the EMA libraries people use, same sets, same process",
        "provenance": profile.provenance(device),
        "settings": {
            "decay": DECAY,
            "repeats": repeats,
            "warmup_rounds": warmup,
            "timing": "round-robin over the candidates, median; a 2x last-level-cache buffer is written "
            "between calls (untimed)",
            "speedup": "peer median time / sema median time (sema_auto_speedup: against SwitchEMA with "
            "backend='auto' and the row's EMA dtype, named by compared_with; sema_torch_speedup: against "
            "backend='torch', fp32 EMA); > 1 means sema is faster",
            "bytes": "GB/s from the update's bytes, 2E + P per element at each peer's own EMA dtype",
            "peer_speedup": "drop-in rows: peer median time / drop-in median time, per row of the peer it "
            "replaces (same set, param dtype and EMA dtype); > 1 means the drop-in is faster",
        },
        "peers": {
            name: {
                "label": p.label,
                "availability": p.availability()[1],
                **({"drop_in": p.drop_in.replace(":", "."), "replaces": list(p.replaces)} if p.drop_in else {}),
            }
            for name, p in PEERS.items()
        },
        "rows": rows,
    }


def format_table(result: dict[str, Any]) -> str:
    head = f"{'set':11} {'param':5} {'peer':46} {'ema':5} {'ms':>9} {'GB/s':>7} {'sema auto':>10} {'sema torch':>10}"
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"{r['param_set'][:11]:11} {r['param_dtype']:5} {r['peer']:46} skipped: {r['skipped']}")
            continue
        label = r["label"] + ("" if r["fp32_ema"] else " *")
        lines.append(
            f"{r['param_set'][:11]:11} {r['param_dtype']:5} {label[:46]:46} {r['ema_dtype']:5} {r['median_ms']:9.3f} "
            f"{r['GB/s']:7.2f} {r['sema_auto_speedup']:9.2f}x {r['sema_torch_speedup']:9.2f}x"
        )
    lines.append("sema auto / sema torch: how many times faster SwitchEMA.update is than the row (row ms / sema ms)")
    lines.append(
        "* no fp32-EMA option for low-precision params: the EMA stays in the params' dtype; its 'sema auto' is "
        "against sema with ema_dtype=None (the same bytes)"
    )
    drop_ins = [r for r in result["rows"] if r.get("replaces")]
    if drop_ins:
        lines += ["", format_drop_in_table(drop_ins)]
    return "\n".join(lines)


def format_drop_in_table(rows: list[dict[str, Any]]) -> str:
    """One line per (drop-in, row of the peer it replaces): both times and peer ms / drop-in ms."""
    head = (
        f"{'set':11} {'param':5} {'drop-in':46} {'vs peer':36} {'ema':5} "
        f"{'drop-in ms':>10} {'peer ms':>9} {'speed-up':>9}"
    )
    lines = ["drop-ins vs the peer they replace (peer ms / drop-in ms; > 1: the drop-in is faster)", head]
    lines.append("-" * len(head))
    measured = {(r["param_set"], r["param_dtype"], r["peer"]): r for r in rows}
    for r in rows:
        where = f"{r['param_set'][:11]:11} {r['param_dtype']:5} {r['label'][:46]:46}"
        if "skipped" in r:
            lines.append(f"{where} skipped: {r['skipped']}")
            continue
        del measured[(r["param_set"], r["param_dtype"], r["peer"])]
        for name, speedup in r["peer_speedup"].items():
            peer_ms = r["median_ms"] * speedup
            lines.append(
                f"{where} {PEERS[name].label[:36]:36} {r['ema_dtype']:5} {r['median_ms']:10.3f} {peer_ms:9.3f} "
                f"{speedup:8.2f}x"
            )
        for name, note in r.get("peer_speedup_notes", {}).items():
            lines.append(f"{where} {PEERS[name].label[:36]:36} {note}")
        if not r["peer_speedup"] and not r.get("peer_speedup_notes"):
            lines.append(f"{where} (none of {', '.join(r['replaces'])} was run)")
    return "\n".join(lines)


def _flat(row: dict[str, Any]) -> dict[str, Any]:
    """A row for CSV: a dict value becomes one column per key (``peer_speedup:diffusers``), a list
    one comma separated cell."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            flat.update({f"{key}:{sub}": v for sub, v in value.items()})
        else:
            flat[key] = ",".join(value) if isinstance(value, list) else value
    return flat


def write_csv(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [_flat(row) for row in result["rows"]]
    fields = list(dict.fromkeys(key for row in rows for key in row))
    prov_fields = ("device", "threads", "torch", "sema", "date", "git_commit", "note")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields + list(prov_fields))
        writer.writeheader()
        for row in rows:
            writer.writerow({**row, **{k: result["provenance"].get(k) for k in prov_fields}})


def write_plot(result: dict[str, Any], path: Path) -> None:
    """sema's speed-up over each peer (log scale), one panel per param dtype, bars per set."""
    plt = profile.pyplot()
    rows = [r for r in result["rows"] if "skipped" not in r and not r["peer"].startswith("sema_")]
    if not rows:
        raise ValueError("nothing to plot: no peer was measured")
    dtypes = list(dict.fromkeys(r["param_dtype"] for r in rows))
    sets = list(dict.fromkeys(r["param_set"] for r in rows))
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    drop_in_rows = [r for r in rows if r.get("peer_speedup")]
    n_rows = 2 if drop_in_rows else 1
    fig, axes = plt.subplots(
        n_rows, len(dtypes), figsize=(6.5 * len(dtypes), 5.0 * n_rows), squeeze=False, sharey="row"
    )
    width = 0.8 / len(sets)
    if drop_in_rows:
        _plot_drop_ins(axes[1], drop_in_rows, dtypes, sets, width)
    for ax, dtype_name in zip(axes[0], dtypes, strict=True):
        mine = [r for r in rows if r["param_dtype"] == dtype_name]
        for s, set_name in enumerate(sets):
            picked = {r["peer"]: r for r in mine if r["param_set"] == set_name}
            xs = [i + (s - (len(sets) - 1) / 2) * width for i, p in enumerate(peers) if p in picked]
            ax.bar(xs, [picked[p]["sema_auto_speedup"] for p in peers if p in picked], width, label=set_name)
        _log_speedup_axis(ax)
        names = {r["peer"]: r["label"] + ("" if r["fp32_ema"] else f"\n({r['ema_dtype']} EMA)") for r in mine}
        ax.set_xticks(range(len(peers)))
        ax.set_xticklabels([names.get(p, p) for p in peers], rotation=35, ha="right", fontsize=7)
        ax.set_title(f"{dtype_name} params; sema keeps an fp32 EMA", fontsize=9)
        ax.set_ylabel("sema SwitchEMA.update speed-up (x)", fontsize=8)
        ax.legend(fontsize=7)
    prov = result["provenance"]
    fig.suptitle(
        f"sema {prov['sema']} (auto backend) vs peers on {prov['device']} ({prov['threads']} threads), "
        f"torch {prov['torch']}, {prov['date'][:10]}" + (f"\n{prov['note']}" if prov.get("note") else ""),
        fontsize=9,
    )
    fig.tight_layout(rect=(0, 0, 1, 0.93 if n_rows == 1 else 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log_speedup_axis(ax: Any) -> None:
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(FixedLocator([0.5, 1, 2, 5, 10, 20, 50, 100]))
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_locator(NullLocator())


def _plot_drop_ins(
    axes: Sequence[Any], rows: list[dict[str, Any]], dtypes: list[str], sets: list[str], width: float
) -> None:
    """Each drop-in's speed-up over each configuration of the peer it replaces, bars per set."""
    pairs = list(dict.fromkeys((r["peer"], name) for r in rows for name in r["peer_speedup"]))
    for ax, dtype_name in zip(axes, dtypes, strict=True):
        mine = [r for r in rows if r["param_dtype"] == dtype_name]
        for s, set_name in enumerate(sets):
            picked = {r["peer"]: r["peer_speedup"] for r in mine if r["param_set"] == set_name}
            shown = [(i, picked[d][p]) for i, (d, p) in enumerate(pairs) if p in picked.get(d, {})]
            if shown:
                xs = [i + (s - (len(sets) - 1) / 2) * width for i, _ in shown]
                ax.bar(xs, [v for _, v in shown], width, label=set_name)
        _log_speedup_axis(ax)
        ax.set_xticks(range(len(pairs)))
        ax.set_xticklabels(
            [f"{PEERS[d].label}\nvs {PEERS[p].label}" for d, p in pairs], rotation=35, ha="right", fontsize=7
        )
        ax.set_title(f"{dtype_name} params: drop-in vs the peer it replaces (same options)", fontsize=9)
        ax.set_ylabel("drop-in speed-up over the peer (x)", fontsize=8)
        ax.legend(fontsize=7)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog=f"peers: {', '.join(PEERS)}\n{DROPINS}: every drop-in and the peers it replaces",
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--sets", default=None, help=f"comma separated, or 'all' (default: {','.join(DEFAULT_SETS)})")
    parser.add_argument("--dtypes", default="fp32,bf16", help="param dtypes, comma separated (default: fp32,bf16)")
    parser.add_argument(
        "--peers",
        default=None,
        help=f"comma separated peer names (default: all); '{DROPINS}': the drop-ins and their peers. "
        "A drop-in brings the peers it replaces",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when present)")
    parser.add_argument(
        "--repeats", type=int, default=None, help="timed calls per candidate (default: 11 CPU, 50 CUDA)"
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--quick", action="store_true", help="tiny set, 5 repeats: a smoke run for CI (< 1 minute)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--csv", type=Path, default=None)
    parser.add_argument("--plot", type=Path, default=None, help="PNG of sema's speed-ups (needs matplotlib)")
    parser.add_argument("--note", default=None, help="free text kept in the provenance (e.g. 'shared machine')")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.sets == "all":
        sets = list(MODEL_SETS)
    elif args.sets:
        sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    else:
        sets = list(QUICK_SETS if args.quick else DEFAULT_SETS)
    unknown = [s for s in sets if s not in PARAM_SETS]
    if unknown:
        parser.error(f"unknown set(s) {unknown}; choose from {', '.join(PARAM_SETS)}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    if not dtypes or any(d not in profile.DTYPES for d in dtypes):
        parser.error(f"--dtypes: choose from {', '.join(profile.DTYPES)}")
    try:
        peer_names = (
            select_peers([p.strip() for p in args.peers.split(",") if p.strip()]) if args.peers else list(PEERS)
        )
    except ValueError as exc:
        parser.error(f"--peers: {exc}")
    if args.plot is not None:
        try:
            profile.pyplot()
        except ImportError as exc:
            parser.error(f"--plot: {exc}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (QUICK_REPEATS if args.quick else DEFAULT_REPEATS.get(device.type, 11))

    result = run(sets, dtypes, device, repeats, args.warmup, peer_names, progress=not args.no_progress)
    if args.note:
        result["provenance"]["note"] = args.note
    prov = result["provenance"]
    print(
        f"sema {prov['sema']} | torch {prov['torch']} | {prov['device']} ({prov['threads']} threads) | {prov['date']}"
    )
    print(format_table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.csv:
        write_csv(result, args.csv)
        print(f"wrote {args.csv}")
    if args.plot:
        write_plot(result, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
