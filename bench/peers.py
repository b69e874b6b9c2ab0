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
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
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

    def availability(self) -> tuple[bool, str]:
        if self.stands_in_for is not None and _installed(self.stands_in_for):
            return False, f"{self.stands_in_for} is installed: its own class runs instead"
        if self.package is None:
            return True, "reimplemented here" if self.reimplementation else "part of torch"
        if not _installed(self.package):
            torch_pin = torch.__version__.split("+")[0]  # keep pip from replacing this torch
            return False, f"{self.package} is not installed (pip install {self.package} torch=={torch_pin})"
        return True, f"{self.package} {importlib.metadata.version(self.package)}"


def _installed(package: str) -> bool:
    module = {"ema-pytorch": "ema_pytorch", "torch-ema": "torch_ema"}.get(package, package)
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _low_precision(model: nn.Module) -> bool:
    return any(p.dtype != torch.float32 for p in model.parameters())


def _timm_model_ema_v3(model: nn.Module, decay: float, fp32: bool) -> PeerSetup:
    from timm.utils import ModelEmaV3

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


def _ema_pytorch(use_foreach: bool) -> Callable[[nn.Module, float, bool], PeerSetup]:
    def build(model: nn.Module, decay: float, fp32: bool) -> PeerSetup:
        from ema_pytorch import EMA

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


def _torch_ema(model: nn.Module, decay: float, fp32: bool) -> PeerSetup:
    from torch_ema import ExponentialMovingAverage

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


def _diffusers(foreach: bool) -> Callable[[nn.Module, float, bool], PeerSetup]:
    def build(model: nn.Module, decay: float, fp32: bool) -> PeerSetup:
        from diffusers.training_utils import EMAModel

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
    )
}


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


def memory_needed(n: int, param_dtype: torch.dtype, n_peers: int) -> int:
    """Peak bytes: four models (peers', sema auto's, sema torch's, sema same-dtype's), two fp32
    sema EMAs and one in the params' dtype, one EMA per peer (fp32 at most), the fp32 temporaries
    some peers make, and slack."""
    p = param_dtype.itemsize
    return n * (5 * p + 2 * 4 + n_peers * 4 + 2 * 4) + (256 << 20)


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
    need, have = memory_needed(n, param_dtype, len(runnable)), profile.available_memory(device)
    if need > profile.MEMORY_FRACTION * have:
        reason = (
            f"needs about {need / 1e9:.1f} GB on {device}, {have / 1e9:.1f} GB available "
            f"(at most {profile.MEMORY_FRACTION:.0%} used); pick fewer peers or a smaller set"
        )
        return [{**base, "peer": "(all)", "skipped": reason}]

    torch.manual_seed(0)
    model = profile.module_of(shapes, param_dtype, device)
    setups: dict[str, PeerSetup] = {}
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
        try:  # a peer whose installed version does not take these arguments is reported, not fatal
            setup = peer.build(model, decay, True)
            setup.update()
        except Exception as exc:
            rows.append({**base, "peer": name, "label": peer.label, "skipped": f"failed: {type(exc).__name__}: {exc}"})
            continue
        setups[name] = setup

    flush = torch.ones(2 * profile.cache_bytes(device), dtype=torch.uint8, device=device)
    candidates = {
        name: profile.Candidate(lambda i, s=setup: s.update(), lambda i, f=flush: f.fill_(i & 0xFF))
        for name, setup in setups.items()
    }
    timings = profile.measure(candidates, device, repeats, warmup, progress)
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
            }
        )
    del setups, candidates, model, flush
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
        },
        "peers": {name: {"label": p.label, "availability": p.availability()[1]} for name, p in PEERS.items()},
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
    return "\n".join(lines)


def write_csv(result: dict[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = list(dict.fromkeys(key for row in result["rows"] for key in row))
    prov_fields = ("device", "threads", "torch", "sema", "date", "git_commit", "note")
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields + list(prov_fields))
        writer.writeheader()
        for row in result["rows"]:
            writer.writerow({**row, **{k: result["provenance"].get(k) for k in prov_fields}})


def write_plot(result: dict[str, Any], path: Path) -> None:
    """sema's speed-up over each peer (log scale), one panel per param dtype, bars per set."""
    plt = profile.pyplot()
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter

    rows = [r for r in result["rows"] if "skipped" not in r and not r["peer"].startswith("sema_")]
    if not rows:
        raise ValueError("nothing to plot: no peer was measured")
    dtypes = list(dict.fromkeys(r["param_dtype"] for r in rows))
    sets = list(dict.fromkeys(r["param_set"] for r in rows))
    peers = list(dict.fromkeys(r["peer"] for r in rows))
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6.5 * len(dtypes), 5.0), squeeze=False, sharey=True)
    width = 0.8 / len(sets)
    for ax, dtype_name in zip(axes[0], dtypes, strict=True):
        mine = [r for r in rows if r["param_dtype"] == dtype_name]
        for s, set_name in enumerate(sets):
            picked = {r["peer"]: r for r in mine if r["param_set"] == set_name}
            xs = [i + (s - (len(sets) - 1) / 2) * width for i, p in enumerate(peers) if p in picked]
            ax.bar(xs, [picked[p]["sema_auto_speedup"] for p in peers if p in picked], width, label=set_name)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(FixedLocator([0.5, 1, 2, 5, 10, 20, 50, 100]))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_locator(NullLocator())
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
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="peers: " + ", ".join(PEERS),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("--sets", default=None, help=f"comma separated, or 'all' (default: {','.join(DEFAULT_SETS)})")
    parser.add_argument("--dtypes", default="fp32,bf16", help="param dtypes, comma separated (default: fp32,bf16)")
    parser.add_argument("--peers", default=None, help="comma separated peer names (default: all)")
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
    peer_names = [p.strip() for p in args.peers.split(",")] if args.peers else list(PEERS)
    if any(p not in PEERS for p in peer_names):
        parser.error(f"--peers: choose from {', '.join(PEERS)}")
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
