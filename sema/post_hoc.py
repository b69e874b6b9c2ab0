"""``PostHocEMA``: EDM2's post-hoc EMA (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", arXiv 2312.02696, section 3 and Algorithms 1-3).

K power-function EMAs of a model's trainable params, each with a relative standard deviation
``sigma_rel``, are updated by one fused K-EMA pass over the flat buckets (:class:`EMAStorage`).
Every ``snapshot_every`` updates each EMA is written to ``snapshot_dir``. After training,
:meth:`PostHocEMA.synthesize` reconstructs the EMA of any other ``sigma_rel`` as the
least-squares combination of the snapshots' averaging profiles.

Convention (EDM2's code, which follows the paper): the t-th update (t = 1, 2, ..., counted on the
device) uses ``beta_t = (1 - 1/t) ** (gamma + 1)``, so the first update copies the params and after
t updates the EMA weighs the params of update i by ``(i**(gamma+1) - (i-1)**(gamma+1)) / t**(gamma+1)``:
exactly the power-function profile ``p(tau) = (gamma+1) tau**gamma / t**(gamma+1)`` on [0, t]
with the params held constant on each (i-1, i]. A snapshot taken after t updates is the profile
ending at t, which is what the synthesis assumes. (ema-pytorch's ``PostHocEMA`` counts t one
higher, ``beta = (1 - 1/(n+1)) ** (gamma+1)`` after n earlier updates, on a different
first step; its results differ from these by that offset.)
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from sema import ops
from sema.buckets import plan_buckets
from sema.selection import ParamSelection
from sema.storage import EMAStorage, ModelSlots, PlacementGuard

STATE_FORMAT = "sema.PostHocEMA"
SNAPSHOT_FORMAT = "sema.PostHocEMA.snapshot"
STATE_VERSION = 1

# update() runs the O(params) placement check on one call in this many (and whenever a bucket
# lost a storage reference or a module registered a param), as SwitchEMA does.

# A synthesized profile whose relative L2 distance from the requested one exceeds this is refused:
# the snapshots cannot express that sigma_rel (too short or too long an average for them).
DEFAULT_MAX_PROFILE_ERROR = 0.05


def sigma_rel_of(gamma: float) -> float:
    """The relative standard deviation of the power-function profile of exponent ``gamma``."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


# sigma_rel(gamma) rises from 0 at gamma = -1 to this maximum, then falls back to 0.
_GAMMA_AT_MAX = (math.sqrt(5.0) - 3.0) / 2.0  # the root of d/dgamma log sigma_rel = 0, gamma**2 + 3 gamma + 1
MAX_SIGMA_REL = sigma_rel_of(_GAMMA_AT_MAX)


def gamma_of(sigma_rel: float) -> float:
    """The exponent ``gamma`` of the power-function EMA with relative standard deviation
    ``sigma_rel``: the largest real root of ``g**3 + 7 g**2 + (16 - s) g + (12 - s)`` with
    ``s = sigma_rel**-2``."""
    if isinstance(sigma_rel, bool) or not isinstance(sigma_rel, (int, float)) or not math.isfinite(sigma_rel):
        raise ValueError(f"sigma_rel={sigma_rel!r} must be a finite float in (0, {MAX_SIGMA_REL:.4f})")
    if not 0 < sigma_rel < MAX_SIGMA_REL:
        raise ValueError(
            f"sigma_rel={sigma_rel!r} is outside (0, {MAX_SIGMA_REL:.4f}), the relative standard deviations a "
            "power-function EMA can have; EDM2 uses values such as 0.05 and 0.10"
        )
    s = float(sigma_rel) ** -2
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(max(r.real for r in roots if abs(r.imag) <= 1e-9 * max(1.0, abs(r.real))))


def profile_dot(t_a: np.ndarray, gamma_a: np.ndarray, t_b: np.ndarray, gamma_b: np.ndarray) -> np.ndarray:
    """The inner product of two power-function profiles (Algorithm 3): profile a ends at ``t_a``
    with exponent ``gamma_a``; broadcasts, float64."""
    t_a, gamma_a, t_b, gamma_b = (np.asarray(x, dtype=np.float64) for x in (t_a, gamma_a, t_b, gamma_b))
    ratio = t_a / t_b
    exponent = np.where(t_a < t_b, gamma_b, -gamma_a)
    return (gamma_a + 1) * (gamma_b + 1) * ratio**exponent / ((gamma_a + gamma_b + 1) * np.maximum(t_a, t_b))


def solve_coefficients(
    steps: Sequence[int], gammas: Sequence[float], step: int, gamma: float
) -> tuple[np.ndarray, float]:
    """Least-squares coefficients of the snapshots (ending at ``steps`` with ``gammas``) for the
    profile ending at ``step`` with ``gamma``, normalised to sum to 1 (Algorithm 3, float64), and
    the relative L2 distance between the combined profile and the requested one."""
    t = np.asarray(steps, dtype=np.float64)
    g = np.asarray(gammas, dtype=np.float64)
    gram = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    target = profile_dot(t, g, np.float64(step), np.float64(gamma))
    x = np.linalg.lstsq(gram, target, rcond=None)[0]
    x = x / x.sum()
    norm = float(profile_dot(step, gamma, step, gamma))
    squared = norm - 2 * float(x @ target) + float(x @ gram @ x)
    return x, math.sqrt(max(squared, 0.0) / norm)


def _check_sigma_rels(sigma_rels: object) -> tuple[float, ...]:
    if isinstance(sigma_rels, (int, float)) and not isinstance(sigma_rels, bool):
        sigma_rels = (sigma_rels,)
    if not isinstance(sigma_rels, (list, tuple)) or not sigma_rels:
        raise ValueError(
            f"PostHocEMA: sigma_rels={sigma_rels!r} must be a non-empty tuple of floats, e.g. (0.05, 0.10)"
        )
    for s in sigma_rels:
        try:
            gamma_of(s)
        except ValueError as error:
            raise ValueError(f"PostHocEMA: sigma_rels: {error}") from None
    if len(set(sigma_rels)) != len(sigma_rels) or len({f"{s:.6g}" for s in sigma_rels}) != len(sigma_rels):
        raise ValueError(f"PostHocEMA: sigma_rels={tuple(sigma_rels)} holds a value twice (to 6 digits); drop it")
    return tuple(float(s) for s in sigma_rels)


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".phema-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise ValueError(
            f"PostHocEMA: snapshot_dir={str(directory)!r} is not a writable directory ({error}); pass a directory "
            "this process can create files in"
        ) from None


class PostHocEMA:
    """EDM2's post-hoc EMA of ``model``'s trainable params.

    Build it before the optimizer (the params move into flat buckets, as with
    :class:`sema.SwitchEMA`), call :meth:`update` after every optimizer step, and afterwards
    :meth:`synthesize` the EMA of any ``sigma_rel`` the snapshots can express.

    Args:
        model: the module whose trainable params are averaged.
        sigma_rels: the relative standard deviations of the K tracked EMAs, each in
            (0, ``MAX_SIGMA_REL`` ~ 0.28); EDM2 tracks (0.05, 0.10).
        snapshot_every: write every EMA to ``snapshot_dir`` after every this many updates.
        snapshot_dir: where the snapshots go: ``phema-<step>-ema<k>-sigma<sigma_rel>.pt``, one
            ``torch.save`` file per snapshot and EMA (its step and sigma_rel inside too), written to
            a hidden temp file first and renamed into place, so a killed run leaves no corrupt one.
        snapshot_dtype: the dtype of the saved snapshots (the EMAs themselves are fp32).
        backend: as for :class:`sema.SwitchEMA`; it must have the fused K-EMA op when K > 1.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] = (0.05, 0.10),
        snapshot_every: int = 1000,
        snapshot_dir: str | os.PathLike = "phema",
        snapshot_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"PostHocEMA: model must be an nn.Module, got {type(model).__name__}")
        sigma_rels = _check_sigma_rels(sigma_rels)
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or snapshot_every < 1:
            raise ValueError(
                f"PostHocEMA: snapshot_every={snapshot_every!r} must be an int >= 1 (updates between snapshots)"
            )
        if snapshot_dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            raise TypeError(
                f"PostHocEMA: snapshot_dtype={snapshot_dtype!r} must be a float dtype such as torch.float32"
            )
        if not isinstance(backend, str):
            raise TypeError(f"PostHocEMA: backend must be a str such as 'auto', got {backend!r}")
        named = ParamSelection(model).tracked
        if not named:
            raise ValueError("PostHocEMA: the model has no trainable parameters (requires_grad=True) to average")
        bad = [f"{n} ({p.dtype})" for n, p in named if p.dtype not in (*ops.PARAM_DTYPES, torch.float64)]
        if bad:
            raise TypeError(f"PostHocEMA: params must be float32, bfloat16, float16 or float64: {', '.join(bad)}")
        resolved = {device: ops.resolve_backend(backend, device) for device, _ in plan_buckets(named)}
        lacking = sorted({b for b in resolved.values() if len(sigma_rels) > 1 and not ops.has_update_k(b)})
        if lacking:
            raise ValueError(
                f"PostHocEMA: {len(sigma_rels)} EMAs need the fused K-EMA op; the {', '.join(lacking)} backend has "
                "none. Pick one that has it (backend='torch' always does)"
            )
        directory = Path(snapshot_dir)
        _check_writable(directory)

        self.model = model
        self.sigma_rels = sigma_rels
        self.gammas = tuple(gamma_of(s) for s in sigma_rels)
        self.snapshot_every = snapshot_every
        self.snapshot_dir = directory
        self.snapshot_dtype = snapshot_dtype
        self._slots = ModelSlots(model, named)
        self.storage = EMAStorage(named, torch.float32, True, resolved, num_emas=len(sigma_rels))
        # The update count on each device, in float64 (exact to 2**53): the weights need it as a float.
        self._steps = {device: torch.zeros((), dtype=torch.float64, device=device) for device in resolved}
        self._exponents = {
            device: torch.tensor([g + 1 for g in self.gammas], dtype=torch.float64, device=device)
            for device in resolved
        }
        self._updates = 0  # the host's count of update() calls: when to snapshot, with no sync
        self.snapshots: list[dict[str, object]] = []
        self._placement = PlacementGuard("PostHocEMA", self.storage, self._slots)

    @property
    def step(self) -> int:
        """Number of updates so far."""
        return self._updates

    def _weights(self, step: Tensor, dtype: torch.dtype) -> Tensor:
        """``1 - (1 - 1/t) ** (gamma + 1)`` per EMA for update ``t = step + 1``, on the device,
        computed in float64 (a (K,) tensor; 0-d for one EMA)."""
        beta = torch.pow(step / (step + 1), self._exponents[step.device])  # (1 - 1/t) ** (gamma + 1)
        w = (1 - beta).to(dtype)
        return w if len(self.sigma_rels) > 1 else w[0]

    def update(self) -> None:
        """Fold the current params into the K EMAs (one fused pass per bucket), then write the
        snapshots when the update count reaches a multiple of ``snapshot_every``."""
        self._check_placement()
        weights = {device: self._weights(step, torch.float32) for device, step in self._steps.items()}
        weights64 = None
        if self.storage.has_fp64:
            weights64 = {device: self._weights(step, torch.float64) for device, step in self._steps.items()}
        self.storage.update_(weights, False, weights64=weights64)
        for step in self._steps.values():
            step.add_(1)
        self._updates += 1
        if self._updates % self.snapshot_every == 0:
            self.snapshot()

    def _check_placement(self) -> None:
        self._placement.check("update", hot=True)

    def snapshot_name(self, step: int, index: int) -> str:
        return f"phema-{step:010d}-ema{index}-sigma{self.sigma_rels[index]:.6g}.pt"

    def snapshot(self) -> None:
        """Write every EMA, as of now, to ``snapshot_dir`` (also called by :meth:`update`)."""
        step = self._updates
        if step == 0:
            raise RuntimeError("PostHocEMA.snapshot(): no update yet, so there is no average to save")
        for k, sigma_rel in enumerate(self.sigma_rels):
            if any(s["step"] == step and s["index"] == k for s in self.snapshots):
                continue
            name = self.snapshot_name(step, k)
            content = {
                "format": SNAPSHOT_FORMAT,
                "step": step,
                "index": k,
                "sigma_rel": sigma_rel,
                "gamma": self.gammas[k],
                "ema": {
                    n: e.detach().to("cpu", self.snapshot_dtype, copy=True) for n, _, e in self.storage.named_emas(k)
                },
            }
            _save_atomically(content, self.snapshot_dir / name)
            self.snapshots.append({"step": step, "index": k, "sigma_rel": sigma_rel, "file": name})

    def state_dict(self) -> dict[str, object]:
        """Step, sigma_rels, the K EMAs by param name (one storage per tensor) and the list of
        snapshots written so far (file names in ``snapshot_dir``)."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "step": self._updates,
            "sigma_rels": list(self.sigma_rels),
            "snapshot_every": self.snapshot_every,
            "emas": [
                {n: e.detach().clone() for n, _, e in self.storage.named_emas(k)} for k in range(len(self.sigma_rels))
            ],
            "snapshots": [dict(s) for s in self.snapshots],
        }

    def load_state_dict(self, state: dict[str, object]) -> None:
        """Load what :meth:`state_dict` returned; everything (the EMAs' names, shapes and dtypes,
        and that each listed snapshot is in ``snapshot_dir``) is checked before anything changes."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("PostHocEMA.load_state_dict: not a PostHocEMA state dict (no format='sema.PostHocEMA')")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"PostHocEMA.load_state_dict: state version {state.get('version')!r}, this reads 1")
        problems = []
        if [float(s) for s in state.get("sigma_rels", [])] != list(self.sigma_rels):
            problems.append(f"sigma_rels {state.get('sigma_rels')!r} in the state, {list(self.sigma_rels)} here")
        if state.get("snapshot_every") != self.snapshot_every:
            problems.append(f"snapshot_every {state.get('snapshot_every')!r} in the state, {self.snapshot_every} here")
        step = state.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            problems.append(f"step {step!r}: a non-negative int expected")
        emas = state.get("emas")
        ours = [{n: e for n, _, e in self.storage.named_emas(k)} for k in range(len(self.sigma_rels))]
        if not isinstance(emas, list) or len(emas) != len(ours):
            problems.append(f"emas: {len(self.sigma_rels)} expected")
        else:
            for k, (mine, theirs) in enumerate(zip(ours, emas, strict=True)):
                if not isinstance(theirs, dict) or mine.keys() != theirs.keys():
                    problems.append(f"EMA {k}: param names differ from this model's")
                    continue
                for n, e in mine.items():
                    t = theirs[n]
                    if not isinstance(t, Tensor) or t.shape != e.shape or t.dtype != e.dtype:
                        problems.append(f"EMA {k} param {n}: expected {e.dtype} {tuple(e.shape)}")
        snapshots = state.get("snapshots", [])
        if not isinstance(snapshots, list) or not all(
            isinstance(s, dict)
            and isinstance(s.get("step"), int)
            and s.get("index") in range(len(self.sigma_rels))
            and isinstance(s.get("file"), str)
            for s in snapshots
        ):
            problems.append("snapshots: a list of {'step', 'index', 'sigma_rel', 'file'} dicts expected")
            snapshots = []
        missing = [s.get("file") for s in snapshots if not (self.snapshot_dir / str(s.get("file"))).is_file()]
        if missing:
            problems.append(f"snapshots not in {str(self.snapshot_dir)!r}: {', '.join(map(str, missing[:8]))}")
        if problems:
            raise ValueError("PostHocEMA.load_state_dict: the state does not fit:\n  " + "\n  ".join(problems))
        with torch.no_grad():
            for mine, theirs in zip(ours, emas, strict=True):
                for n, e in mine.items():
                    e.copy_(theirs[n])
            for counter in self._steps.values():
                counter.fill_(step)
        self._updates = step
        self.snapshots = [dict(s) for s in snapshots]

    def synthesize(
        self, sigma_rel: float, step: int | None = None, max_error: float | None = DEFAULT_MAX_PROFILE_ERROR
    ) -> dict[str, Tensor]:
        """A ``model.state_dict()``-shaped dict holding the EMA of ``sigma_rel`` as of update
        ``step`` (default: the last snapshot), the least-squares combination (Algorithm 3) of all
        snapshots taken at or before ``step``. Snapshots are read one at a time (memory-mapped)
        into one fp32 accumulator per param on the param's device, so memory stays at about two
        copies of the weights. Untracked params and buffers come from the live model.

        ``max_error`` bounds the relative L2 distance between the combined averaging profile and
        the requested one; a ``sigma_rel`` the snapshots cannot express raises (``None``: no bound).
        """
        try:
            gamma = gamma_of(sigma_rel)
        except ValueError as error:
            raise ValueError(f"PostHocEMA.synthesize: {error}") from None
        if not self.snapshots:
            raise RuntimeError(
                f"PostHocEMA.synthesize: no snapshot yet (one is written every {self.snapshot_every} updates, or "
                "call snapshot())"
            )
        last = max(int(s["step"]) for s in self.snapshots)
        first = min(int(s["step"]) for s in self.snapshots)
        if step is None:
            step = last
        if isinstance(step, bool) or not isinstance(step, int) or not first <= step <= last:
            raise ValueError(
                f"PostHocEMA.synthesize: step={step!r} must be an int between the first and the last snapshot "
                f"({first}..{last}); the snapshots hold nothing beyond the last one"
            )
        used = [s for s in self.snapshots if int(s["step"]) <= step]
        coefficients, error = solve_coefficients(
            [int(s["step"]) for s in used], [self.gammas[int(s["index"])] for s in used], step, gamma
        )
        if max_error is not None and not error <= max_error:
            raise ValueError(
                f"PostHocEMA.synthesize: the snapshots cannot express sigma_rel={sigma_rel} at step {step}: the "
                f"best combination's averaging profile is {error:.3g} away from it (relative L2), over max_error="
                f"{max_error}. Ask for a sigma_rel nearer the tracked ones {self.sigma_rels}, or pass a larger "
                "max_error (or None)"
            )
        params = {n: p for n, p, _ in self.storage.named_emas(0)}
        accumulators: dict[str, Tensor] = {}
        for snapshot, coefficient in zip(used, coefficients.tolist(), strict=True):
            content = torch.load(self.snapshot_dir / str(snapshot["file"]), mmap=True, weights_only=True)
            saved = content["ema"]
            if saved.keys() != params.keys():
                raise ValueError(
                    f"PostHocEMA.synthesize: snapshot {snapshot['file']} holds other params than this model"
                )
            for n, p in params.items():
                value = saved[n].to(p.device, torch.float32)
                if n in accumulators:
                    accumulators[n].add_(value, alpha=coefficient)
                else:
                    accumulators[n] = value.mul(coefficient)
            del content, saved
        out: dict[str, Tensor] = {}
        by_id = {id(p): n for n, p in params.items()}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            if id(p) in by_id:
                out[name] = accumulators[by_id[id(p)]].to(p.dtype)
        for key, value in self.model.state_dict().items():
            if key not in out:
                out[key] = value.detach().clone()
        return {key: out[key] for key in self.model.state_dict()}


def _save_atomically(content: object, path: Path) -> None:
    """``torch.save`` into a hidden temp file beside ``path``, flushed to disk, then renamed over
    ``path``: a reader sees the old file or the complete new one, never a partial one."""
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temp, "wb") as f:
            torch.save(content, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except Exception:
        temp.unlink(missing_ok=True)  # a failure we live through; a killed process leaves the temp file
        raise
