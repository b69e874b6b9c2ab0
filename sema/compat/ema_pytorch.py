"""``EMA``: a drop-in for ema-pytorch's ``ema_pytorch.EMA`` (0.8.3) on sema's flat buckets.

Change ``from ema_pytorch import EMA`` to ``from sema.compat.ema_pytorch import EMA``. The
constructor takes the same arguments with the same defaults, ``update()`` follows the same
schedule (a copy on the first call and on every ``update_every``-th call up to
``update_after_step``, then ``lerp`` with ema-pytorch's power warmup on every ``update_every``-th
call), ``ema(x)`` runs ``ema.ema_model``, and ``state_dict()``/``load_state_dict()`` use
ema-pytorch's keys (``initted``, ``step``, ``online_model.*`` with ``include_online_model``,
``ema_model.*``), so checkpoints move both ways.

Kept as ema-pytorch does it, on purpose: frozen float params are averaged too, integer buffers
(``num_batches_tracked``) of ``ema_model`` keep the value they had when it was built, ignored
names are still copied by the warm-start copies, and ``forward_eval`` runs ``ema_model`` in its
current mode (ema-pytorch never sets eval there).
``update_model_with_ema_every`` with ``update_model_with_ema_beta=0`` is Switch EMA's switch
(``param <- ema``, fused per bucket); with a beta > 0 the model moves toward the EMA.

How it runs: the model's trainable float params are moved into sema's flat buckets (a
``SwitchEMA`` with ``switch_every=None``) and averaged by one fused pass per bucket, with the
decay computed on the host exactly as ema-pytorch computes it (float32 tensor math on the step).
Everything else ema-pytorch averages or copies (float buffers such as BatchNorm running stats,
frozen float params, ``ignore_names``) is kept in tensors of ``ema_model`` and updated with
one multi-tensor op per kind, as ema-pytorch's ``use_foreach=True`` does.

What differs from ema-pytorch:

- ``ema_model`` is not a free-standing deep copy: its trainable params are views of sema's EMA
  buckets (in-place edits of them do reach the EMA, as in ema-pytorch). Rebinding one
  (``ema.ema_model.fc.weight = nn.Parameter(...)``, ``load_state_dict(assign=True)``,
  ``param.data = ...``), assigning ``ema.ema_model = other``, replacing a submodule of
  ``ema_model`` or of the model (``ema.ema_model.fc = nn.Linear(...)``) or pointing
  ``ema.online_model`` at another model would cut the EMA off from what it averages, so the next
  ``update()`` (and ``copy_params_from_*``, ``load_state_dict``) raises instead; ema-pytorch follows
  the new module by name. Load new weights into the existing modules in place instead.
  A user ``ema_model=`` module is adopted in place: its params are re-pointed to the EMA
  buckets (``ema.ema_model is`` that module).
- The EMA lives on the model's device. Moving or converting ``ema`` / ``ema.ema_model``
  (``.to()``, ``.cuda()``, ``.half()``) is refused when it would move any tensor of the models
  (moving only the ``step``/``initted`` buffers is fine): move the model before building the
  EMA. Hence ``allow_different_devices`` and ``move_ema_to_online_device`` are accepted but
  never have anything to do, and ``restore_ema_model_device()`` only succeeds as a no-op.
- An ``ema_model`` whose dtype differs from the model's needs ``coerce_dtype=True`` at
  construction (ema-pytorch fails at its first averaging update); an fp32 ``ema_model`` of a
  bf16/fp16 model gives an fp32 EMA in sema's buckets. An EMA in a lower precision than its
  param (a bf16 ``ema_model`` of an fp32 model) is refused.
- ``ignore_names``, ``ignore_startswith_names`` and ``param_or_buffer_names_no_ema`` are read at
  construction (they decide the buckets); changing them later raises at the next ``update()``.
- ``init_ema()`` runs once (ema-pytorch lets it replace the EMA model later).
- A model that cannot be deep-copied raises (ema-pytorch prints and calls ``exit()``); pass
  your own ``ema_model=`` there, as with ema-pytorch.
- Building the EMA moves the model's trainable params into sema's buckets (``param.data`` is
  re-pointed; the ``Parameter`` objects, and optimizers built before or after, are unaffected):
  move, convert, wrap or compile the model afterwards and the next ``update()`` says so.
- A non-module ``model`` (ema-pytorch's ``EMAPytree``) and pickling / ``copy.deepcopy`` of the
  EMA are not supported (the params live in buckets shared with the model): save
  ``ema.state_dict()`` instead. ``torch.save(ema.ema_model)`` / ``pickle`` of ``ema_model``
  works, and what loads is an ordinary module (no move guard, its own tensors).
- ``ema.state_dict()`` returns views: tensors of one bucket share a storage, which ``torch.save``
  writes once but safetensors refuses (clone them first).
"""

from __future__ import annotations

import glob
import operator
import weakref
from collections.abc import Callable, Iterator
from copy import deepcopy
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from sema import ops
from sema.switch_ema import SwitchEMA

# The dtypes whose params sema's buckets hold; other float params (complex) go the tensor path.
_BUCKET_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)

_NAME = "sema.compat.ema_pytorch.EMA"

# Modules of an ``ema_model`` whose params are views of a live EMA: ``_apply`` (``.to()``,
# ``.half()``, ...) refuses to move them (see _refuse_moves).
_GUARDED: weakref.WeakSet[nn.Module] = weakref.WeakSet()


def exists(val: object) -> bool:
    return val is not None


def default(val: Any, d: Any) -> Any:
    return val if exists(val) else (d() if callable(d) else d)


def divisible_by(num: int, den: int) -> bool:
    return (num % den) == 0


def maybe_coerce_dtype(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def inplace_copy(tgt: Tensor, src: Tensor, *, auto_move_device: bool = False, coerce_dtype: bool = False) -> None:
    """ema-pytorch's ``inplace_copy``: ``tgt <- src`` (moved / cast first when asked)."""
    if auto_move_device:
        src = src.to(tgt.device)
    if coerce_dtype:
        src = maybe_coerce_dtype(src, tgt.dtype)
    tgt.copy_(src)


def inplace_lerp(
    tgt: Tensor, src: Tensor, weight: float, *, auto_move_device: bool = False, coerce_dtype: bool = False
) -> None:
    """ema-pytorch's ``inplace_lerp``: ``tgt <- lerp(tgt, src, weight)``."""
    if auto_move_device:
        src = src.to(tgt.device)
    if coerce_dtype:
        src = maybe_coerce_dtype(src, tgt.dtype)
    tgt.lerp_(src, weight)


def _refuse_moves(module: nn.Module, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> nn.Module:
    """``_apply`` of an ``ema_model`` module: a call that leaves every tensor where it is
    (``.to()`` the same device and dtype) is a no-op; one that would move or convert a tensor
    raises before anything changes."""
    if module not in _GUARDED:  # a deep copy of a guarded module: its tensors are its own
        return nn.Module._apply(module, fn, recurse)
    _check_unmoved(module, fn, "ema_model")
    return module


def _check_unmoved(module: nn.Module, fn: Callable[[Tensor], Tensor], what: str) -> None:
    with torch.no_grad():
        moved = [
            name
            for name, t in (*module.named_parameters(remove_duplicate=False), *module.named_buffers())
            if fn(t) is not t
        ]
    if moved:
        raise RuntimeError(
            f"sema.compat.ema_pytorch.EMA: moving or converting {what} would move {len(moved)} tensor(s) "
            f"({', '.join(moved[:4])}{' ...' if len(moved) > 4 else ''}). sema keeps the EMA in flat buckets on the "
            "model's device, with ema_model's params as views of them: move or convert the model before building "
            "the EMA (the EMA follows the model's device and dtype)."
        )


def _slot(module: nn.Module, name: str, kind: str) -> tuple[dict, str]:
    """The dict and key under which ``module`` holds the param or buffer ``name``."""
    path, _, key = name.rpartition(".")
    owner = module.get_submodule(path) if path else module
    return (owner._parameters if kind == "param" else owner._buffers), key


def _names_pattern(name: str) -> str:
    return glob.escape(name)


class _ModuleEdges:
    """Every (parent, name) -> child link of a module tree, as built: ``replaced()`` names the
    links that now hold another module (or none), one C-level identity pass when none does."""

    def __init__(self, root: nn.Module) -> None:
        edges = [
            (f"{path}.{key}" if path else key, parent._modules, key, child)
            for path, parent in root.named_modules()
            for key, child in parent._modules.items()
        ]
        self._names = [n for n, _, _, _ in edges]
        self._dicts = [d for _, d, _, _ in edges]
        self._keys = [k for _, _, k, _ in edges]
        self._children = [c for _, _, _, c in edges]

    def replaced(self) -> list[str]:
        if all(map(operator.is_, map(dict.get, self._dicts, self._keys), self._children)):
            return []
        return [
            n
            for n, d, k, c in zip(self._names, self._dicts, self._keys, self._children, strict=True)
            if d.get(k) is not c
        ]


class _TensorGroup:
    """Pairs (EMA tensor, model tensor) found through their modules' dicts at every use, so a
    rebinding on either side is followed as ema-pytorch's name lookup follows it."""

    def __init__(self, ema_module: nn.Module, model: nn.Module, names: list[tuple[str, str]]) -> None:
        self.names = [n for n, _ in names]
        ema_slots = [_slot(ema_module, n, k) for n, k in names]
        model_slots = [_slot(model, n, k) for n, k in names]
        self._ema_dicts = [d for d, _ in ema_slots]
        self._ema_keys = [k for _, k in ema_slots]
        self._model_dicts = [d for d, _ in model_slots]
        self._model_keys = [k for _, k in model_slots]

    def __bool__(self) -> bool:
        return bool(self.names)

    def emas(self) -> list[Tensor]:
        return list(map(dict.__getitem__, self._ema_dicts, self._ema_keys))

    def sources(self) -> list[Tensor]:
        return list(map(dict.__getitem__, self._model_dicts, self._model_keys))


class EMA(nn.Module):
    """ema-pytorch's ``EMA`` on sema's fused buckets: same arguments, defaults, schedule,
    ``state_dict`` keys and ``ema(x)``. What differs: the module docstring.

    Args (as ema-pytorch 0.8.3):
        model: the online model (an ``nn.Module``; ema-pytorch's pytree form is not supported).
        ema_model: a module (or a callable returning one) to hold the EMA, of the model's
            structure; by default a copy of the model whose trainable params are views of the
            EMA buckets.
        beta: the largest decay (1.0: frozen, ``update()`` only copies during the warm start).
        update_after_step, update_every: copy on the first ``update()`` and on each
            ``update_every``-th call while ``step <= update_after_step``, then average on each
            ``update_every``-th call.
        inv_gamma, power, min_value: the warmup ``1 - (1 + t / inv_gamma) ** -power`` clamped to
            ``[min_value, beta]``, ``t = step - update_after_step - 1``.
        param_or_buffer_names_no_ema: names copied instead of averaged at each averaging update.
        ignore_names, ignore_startswith_names: names left out of averaging updates (still copied
            by the warm-start copies and ``copy_params_from_*``).
        include_online_model: whether ``state_dict()`` holds the online model too.
        allow_different_devices, move_ema_to_online_device: accepted; the EMA always lives on
            the model's device here.
        use_foreach: accepted; every path here is fused or multi-tensor already.
        update_model_with_ema_every, update_model_with_ema_beta: every N steps, put the EMA into
            the model (``beta=0``: the Switch EMA switch, ``param <- ema``), or move the model
            toward it: ``param <- lerp(param, ema, 1 - beta)``.
        forward_method_names: methods of ``ema_model`` exposed on this object.
        coerce_dtype: cast the model's tensors to ``ema_model``'s dtype (needed when they differ).
        lazy_init_ema: build the EMA at the first ``update()`` (or ``init_ema()``).
    """

    def __init__(
        self,
        model: nn.Module,
        ema_model: nn.Module | Callable[[], nn.Module] | None = None,
        beta: float = 0.9999,
        update_after_step: int = 100,
        update_every: int = 10,
        inv_gamma: float = 1.0,
        power: float = 2 / 3,
        min_value: float = 0.0,
        param_or_buffer_names_no_ema: set[str] | list[str] = frozenset(),
        ignore_names: set[str] = frozenset(),
        ignore_startswith_names: set[str] = frozenset(),
        include_online_model: bool = True,
        allow_different_devices: bool = False,
        use_foreach: bool = False,
        update_model_with_ema_every: int | None = None,
        update_model_with_ema_beta: float = 0.0,
        forward_method_names: tuple[str, ...] = (),
        move_ema_to_online_device: bool = False,
        coerce_dtype: bool = False,
        lazy_init_ema: bool = False,
    ) -> None:
        where = "sema.compat.ema_pytorch.EMA"
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{where}: model must be an nn.Module, got {type(model).__name__}. ema-pytorch's EMA of a pytree of "
                "tensors (EMAPytree) is not supported: use ema_pytorch.EMAPytree, or wrap the tensors in a module"
            )
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"{where}: beta={beta!r} must be a float in [0, 1] (1.0 freezes the EMA)")
        for name, value, low in (("update_after_step", update_after_step, 0), ("update_every", update_every, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{where}: {name}={value!r} must be an int >= {low}")
        if update_model_with_ema_every is not None and (
            isinstance(update_model_with_ema_every, bool)
            or not isinstance(update_model_with_ema_every, int)
            or update_model_with_ema_every < 1
        ):
            raise ValueError(
                f"{where}: update_model_with_ema_every={update_model_with_ema_every!r} must be None or an int >= 1"
            )
        if not 0.0 <= update_model_with_ema_beta <= 1.0:
            raise ValueError(f"{where}: update_model_with_ema_beta={update_model_with_ema_beta!r} must be in [0, 1]")
        names_args = {
            "param_or_buffer_names_no_ema": param_or_buffer_names_no_ema,
            "ignore_names": ignore_names,
            "ignore_startswith_names": ignore_startswith_names,
        }
        for name, value in names_args.items():
            if isinstance(value, str) or not isinstance(value, (set, frozenset, list, tuple)):
                raise TypeError(f"{where}: {name} must be a set or list of names, got {value!r}")
        if lazy_init_ema and ema_model is not None:
            raise ValueError(f"{where}: lazy_init_ema=True builds the EMA model itself; do not pass ema_model")

        super().__init__()
        self.beta = beta
        self.is_frozen = beta == 1.0
        self.include_online_model = include_online_model
        if include_online_model:
            self.online_model = model
        else:
            self.online_model = [model]
        if not isinstance(ema_model, nn.Module) and callable(ema_model):
            ema_model = ema_model()
        self.ema_model = None
        self.forward_method_names = forward_method_names
        self.inplace_copy = partial(inplace_copy, auto_move_device=allow_different_devices, coerce_dtype=coerce_dtype)
        self.inplace_lerp = partial(inplace_lerp, auto_move_device=allow_different_devices, coerce_dtype=coerce_dtype)
        self.update_every = update_every
        self.update_after_step = update_after_step
        self.inv_gamma = inv_gamma
        self.power = power
        self.min_value = min_value
        self.param_or_buffer_names_no_ema = set(param_or_buffer_names_no_ema)
        self.ignore_names = set(ignore_names)
        self.ignore_startswith_names = set(ignore_startswith_names)
        self._names_at_build = {k: set(v) for k, v in names_args.items()}
        self.update_model_with_ema_every = update_model_with_ema_every
        self.update_model_with_ema_beta = update_model_with_ema_beta
        self.allow_different_devices = allow_different_devices
        self.coerce_dtype = coerce_dtype
        self.move_ema_to_online_device = move_ema_to_online_device
        self.use_foreach = use_foreach
        self.switch_ema: SwitchEMA | None = None
        object.__setattr__(self, "_view", None)  # not a submodule: ema_model is
        self._step_seen: tuple[Tensor | None, int, int] = (None, -1, 0)
        self._initted_seen: tuple[Tensor | None, int, bool] = (None, -1, False)
        if not lazy_init_ema:
            self.init_ema(ema_model)
        self.register_buffer("initted", torch.tensor(False))
        self.register_buffer("step", torch.tensor(0))

    # --- building the EMA ----------------------------------------------------------------------

    def init_ema(self, ema_model: nn.Module | None = None) -> None:
        """Build the EMA: sema's buckets for the trainable float params, ``ema_model`` (a copy of
        the model, or the given module adopted in place) for the rest. Runs once."""
        where = "sema.compat.ema_pytorch.EMA.init_ema"
        if self._view is not None:
            raise RuntimeError(
                f"{where}: the EMA is built already; its params live in sema's buckets, which cannot be handed to "
                "another ema_model. Build a new EMA instead"
            )
        model = self.model
        template = ema_model
        if template is not None and not isinstance(template, nn.Module):
            raise TypeError(f"{where}: ema_model must be an nn.Module (or a callable returning one), got {template!r}")
        trainable, problems = self._plan(model, template)
        if problems:
            raise ValueError(f"{where}: ema_model does not fit the model:\n  " + "\n  ".join(problems))
        missing = [n for n in self.forward_method_names if not hasattr(template or model, n)]
        if missing:
            raise AttributeError(f"{where}: forward_method_names {missing} are not attributes of the EMA model")
        # The copy of the model comes first, with placeholders where the bucketed params go:
        # a model that cannot be deep-copied fails here, before any param moves into a bucket.
        placeholders: dict[str, nn.Parameter] = {}
        if template is None:
            memo: dict[int, Any] = {}
            for name, p in model.named_parameters():
                if name in trainable:
                    placeholders[name] = memo[id(p)] = nn.Parameter(
                        torch.empty(0, dtype=p.dtype, device=p.device), requires_grad=False
                    )
            view = deepcopy(model, memo)
        else:
            view = template
        switch_ema = None
        if trainable:
            ema_dtype = self._ema_dtype(model, template, trainable)
            excluded = [
                _names_pattern(n) for n, p in model.named_parameters() if p.requires_grad and n not in trainable
            ]
            copies = [_names_pattern(n) for n in trainable if n in self.param_or_buffer_names_no_ema]
            # The decay passed here is never used: each update hands the storage its own weight.
            switch_ema = SwitchEMA(
                model,
                decay=0.0,
                switch_every=None,
                buffers="ignore",
                ema_dtype=ema_dtype,
                exclude=excluded or None,
                copy_only=copies or None,
            )
            # Its placement errors (a moved or converted model) name this class, not SwitchEMA.
            switch_ema._placement.owner = _NAME
        views = {} if switch_ema is None else {name: e for name, _, e in switch_ema.storage.named_emas()}
        with torch.no_grad():
            if template is None:
                for name, p in placeholders.items():
                    p.data = views[name]
            else:
                for name, p in view.named_parameters():
                    if name in views:
                        p.data = views[name]
        for p in view.parameters():
            p.detach_()
        self.ema_model = view
        object.__setattr__(self, "_view", view)
        self.switch_ema = switch_ema
        for module in view.modules():
            _GUARDED.add(module)
            # A partial of a module-level function, not a bound method: ``torch.save`` /
            # ``pickle`` of ema_model writes it by reference, and the loaded copy (not guarded)
            # is an ordinary module.
            object.__setattr__(module, "_apply", partial(_refuse_moves, module))
        for name in self.forward_method_names:
            setattr(self, name, getattr(view, name))

        self.parameter_names = {
            n for n, p in view.named_parameters() if torch.is_floating_point(p) or torch.is_complex(p)
        }
        self.buffer_names = {n for n, b in view.named_buffers() if torch.is_floating_point(b) or torch.is_complex(b)}
        self._trainable = set(trainable)
        self._build_groups(model, view)
        tracked = [] if switch_ema is None else [(n, e) for n, _, e in switch_ema.storage.named_emas()]
        view_params = dict(view.named_parameters(remove_duplicate=False))
        view_slots = [_slot(view, n, "param") for n, _ in tracked]
        self._view_dicts = [d for d, _ in view_slots]
        self._view_keys = [k for _, k in view_slots]
        self._view_params = [view_params[n] for n, _ in tracked]
        self._ema_views = [e for _, e in tracked]
        self._view_names = [n for n, _ in tracked]
        self._devices = [] if switch_ema is None else list(switch_ema.storage.backends)
        object.__setattr__(self, "_online", model)  # not a submodule: online_model is (or a list)
        self._view_edges = _ModuleEdges(view)
        self._model_edges = _ModuleEdges(model)

    def _is_ignored(self, name: str) -> bool:
        return name in self.ignore_names or any(name.startswith(prefix) for prefix in self.ignore_startswith_names)

    def _plan(self, model: nn.Module, template: nn.Module | None) -> tuple[list[str], list[str]]:
        """The params sema's buckets average (trainable, bucketable, not ignored), and what makes
        ``template`` unfit, checked before anything moves."""
        problems: list[str] = []
        ours = dict(model.named_parameters())
        if template is not None:
            theirs = dict(template.named_parameters())
            for kind, a, b in (
                ("param", ours, theirs),
                ("buffer", dict(model.named_buffers()), dict(template.named_buffers())),
            ):
                for name in a.keys() - b.keys():
                    problems.append(f"{kind} {name} is in the model but not in ema_model")
                for name in b.keys() - a.keys():
                    problems.append(f"{kind} {name} is in ema_model but not in the model")
                for name in a.keys() & b.keys():
                    x, y = a[name], b[name]
                    if x.shape != y.shape:
                        problems.append(f"{kind} {name}: shape {tuple(y.shape)} in ema_model, {tuple(x.shape)} here")
                    elif x.device != y.device:
                        problems.append(
                            f"{kind} {name}: on {y.device} in ema_model, {x.device} in the model (sema keeps the EMA "
                            "on the model's device: put ema_model there)"
                        )
                    elif x.dtype != y.dtype and x.is_floating_point() and not self.coerce_dtype:
                        problems.append(
                            f"{kind} {name}: dtype {y.dtype} in ema_model, {x.dtype} in the model; pass "
                            "coerce_dtype=True (ema-pytorch's lerp needs it too)"
                        )
        trainable = []
        for name, p in ours.items():
            if not p.requires_grad or p.dtype not in _BUCKET_DTYPES or self._is_ignored(name):
                continue
            if template is not None and name in theirs:
                e = theirs[name].dtype
                if e != p.dtype and not (e == torch.float32 and p.dtype in (torch.bfloat16, torch.float16)):
                    problems.append(
                        f"param {name}: an EMA in {e} of a {p.dtype} param; sema keeps the EMA in the param's dtype "
                        "or in float32 for bf16/fp16 params"
                    )
            trainable.append(name)
        return trainable, problems

    @staticmethod
    def _ema_dtype(model: nn.Module, template: nn.Module | None, trainable: list[str]) -> torch.dtype | None:
        """``None`` (each param's dtype) unless ``template`` keeps bf16/fp16 params in float32."""
        if template is None:
            return None
        ours, theirs = dict(model.named_parameters()), dict(template.named_parameters())
        widened = {theirs[n].dtype != ours[n].dtype for n in trainable}
        if widened == {True, False} and any(
            ours[n].dtype in (torch.bfloat16, torch.float16) and theirs[n].dtype == ours[n].dtype for n in trainable
        ):
            raise ValueError(
                "sema.compat.ema_pytorch.EMA: ema_model keeps some bf16/fp16 params in float32 and others in their "
                "own dtype; sema keeps all of them in one: make ema_model's dtypes uniform"
            )
        return torch.float32 if True in widened else None

    def _build_groups(self, model: nn.Module, view: nn.Module) -> None:
        averaged, copied, ignored = [], [], []
        kinds = [("param", n) for n in self.parameter_names - self._trainable]
        kinds += [("buffer", n) for n in self.buffer_names]
        order = {n: i for i, (n, _) in enumerate((*model.named_parameters(), *model.named_buffers()))}
        for kind, name in sorted(kinds, key=lambda kn: order.get(kn[1], -1)):
            if name not in order:
                continue
            if self._is_ignored(name):
                ignored.append((name, kind))
            elif name in self.param_or_buffer_names_no_ema:
                copied.append((name, kind))
            else:
                averaged.append((name, kind))
        self._averaged = _TensorGroup(view, model, averaged)
        self._copied = _TensorGroup(view, model, copied)
        self._ignored = _TensorGroup(view, model, ignored)

    # --- checks ----------------------------------------------------------------------------------

    def _check(self, where: str) -> None:
        """Everything ``update()`` relies on, before it changes anything: params still in their
        buckets, ``ema_model`` still this object with its params still the EMA views, the
        name sets as at construction."""
        if self._modules.get("ema_model") is not self._view:
            raise RuntimeError(
                f"{_NAME}.{where}(): ema.ema_model was replaced by another module; sema's EMA lives in buckets "
                "that the original ema_model's params view. Put it back and load weights into it instead "
                "(ema.ema_model.load_state_dict)"
            )
        if self.model is not self._online:
            raise RuntimeError(
                f"{_NAME}.{where}(): ema.online_model is no longer the model this EMA was built on; sema's buckets "
                "hold that model's params (ema-pytorch would average toward the new model). Build a new EMA on the "
                "new model, or copy its weights into the original one in place (ema.model.load_state_dict(...))"
            )
        for edges, prefix in ((self._view_edges, "ema.ema_model."), (self._model_edges, "model.")):
            replaced = [prefix + n for n in edges.replaced()]
            if replaced:
                raise RuntimeError(
                    f"{_NAME}.{where}(): submodule {', '.join(replaced[:8])} was replaced or removed after the EMA "
                    "was built; sema's buckets hold the original module's params (ema-pytorch would average the new "
                    f"module's). Load the new weights into the existing module in place "
                    f"({replaced[0]}.load_state_dict(new_module.state_dict())), or build the EMA after changing the "
                    "model's structure"
                )
        current = {
            "param_or_buffer_names_no_ema": self.param_or_buffer_names_no_ema,
            "ignore_names": self.ignore_names,
            "ignore_startswith_names": self.ignore_startswith_names,
        }
        for name, value in current.items():
            if set(value) != self._names_at_build[name]:
                raise RuntimeError(
                    f"{_NAME}.{where}(): {name} changed after construction; sema decides what to average when it "
                    f"builds its buckets. Pass {name} to the constructor"
                )
        if self.switch_ema is not None:
            self.switch_ema._check_placement(where, hot=where == "update")
        if not all(map(operator.is_, map(dict.get, self._view_dicts, self._view_keys), self._view_params)) or tuple(
            map(Tensor.data_ptr, self._view_params)
        ) != tuple(map(Tensor.data_ptr, self._ema_views)):
            cut = [
                n
                for n, d, k, p, e in zip(
                    self._view_names, self._view_dicts, self._view_keys, self._view_params, self._ema_views, strict=True
                )
                if d.get(k) is not p or p.data_ptr() != e.data_ptr()
            ]
            raise RuntimeError(
                f"{_NAME}.{where}(): ema_model param(s) {', '.join(cut[:8])} no longer view sema's EMA (rebound, "
                "load_state_dict(assign=True) or param.data = ...). Write into them in place instead "
                "(ema.ema_model.load_state_dict(sd), param.copy_(...))"
            )

    # --- counters --------------------------------------------------------------------------------

    def _host_step(self) -> int:
        """``self.step`` as an int, re-read only when the tensor was replaced or written."""
        t = self.step
        seen, version, value = self._step_seen
        if t is not seen or t._version != version:
            value = int(t.item())
            self._step_seen = (t, t._version, value)
        return value

    def _host_initted(self) -> bool:
        t = self.initted
        seen, version, value = self._initted_seen
        if t is not seen or t._version != version:
            value = bool(t.item())
            self._initted_seen = (t, t._version, value)
        return value

    # --- the peer's API --------------------------------------------------------------------------

    @property
    def model(self) -> nn.Module:
        return self.online_model if self.include_online_model else self.online_model[0]

    def eval(self) -> nn.Module:
        """As ema-pytorch: ``ema_model.eval()`` (the online model's mode is not touched)."""
        return self.ema_model.eval()

    @torch.no_grad()
    def forward_eval(self, *args: Any, **kwargs: Any) -> Any:
        """Run ``ema_model`` without grad. As in ema-pytorch 0.8.3, it runs in ``ema_model``'s
        current mode (the peer saves and restores the mode but never sets eval): call
        ``ema.eval()`` first for eval mode."""
        training = self.ema_model.training
        out = self.ema_model(*args, **kwargs)
        self.ema_model.train(training)
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.ema_model(*args, **kwargs)

    def restore_ema_model_device(self) -> None:
        """ema-pytorch moves ``ema_model`` to ``initted``'s device; here it already lives on the
        model's device, so this succeeds only where that is a no-op."""
        self.ema_model.to(self.initted.device)

    def add_to_optimizer_post_step_hook(self, optimizer: torch.optim.Optimizer) -> Any:
        """``update()`` after every ``optimizer.step()``; returns the hook handle."""
        assert hasattr(optimizer, "register_step_post_hook")

        def hook(*_: object) -> None:
            self.update()

        return optimizer.register_step_post_hook(hook)

    def get_params_iter(self, model: nn.Module) -> Iterator[tuple[str, Tensor]]:
        for name, param in model.named_parameters():
            if name in self.parameter_names:
                yield name, param

    def get_buffers_iter(self, model: nn.Module) -> Iterator[tuple[str, Tensor]]:
        for name, buffer in model.named_buffers():
            if name in self.buffer_names:
                yield name, buffer

    def get_current_decay(self) -> float:
        """The decay of an averaging update at the current ``step``, computed as ema-pytorch
        computes it (float32 tensor math)."""
        return self._decay_at(self._host_step())

    def _decay_at(self, step: int) -> float:
        epoch = (torch.tensor(step) - self.update_after_step - 1).clamp(min=0.0)
        value = 1 - (1 + epoch / self.inv_gamma) ** -self.power
        if epoch.item() <= 0:
            return 0.0
        return value.clamp(min=self.min_value, max=self.beta).item()

    @torch.no_grad()
    def copy_params_from_model_to_ema(self) -> None:
        """EMA <- model for every float param and buffer (ignored names and copies included)."""
        self._check("copy_params_from_model_to_ema")
        self._copy_model_to_ema()

    @torch.no_grad()
    def _copy_model_to_ema(self) -> None:
        if self.switch_ema is not None:
            self.switch_ema.storage.copy_params_to_ema_()
        for group in (self._averaged, self._copied, self._ignored):
            if group:
                self._copy_into(group.emas(), group.sources())

    @torch.no_grad()
    def copy_params_from_ema_to_model(self) -> None:
        """model <- EMA for every float param and buffer: for the trainable params, Switch EMA's
        switch (one fused pass per bucket)."""
        self._check("copy_params_from_ema_to_model")
        if self.switch_ema is not None:
            # The storage's switch, not SwitchEMA.switch(): that one warns about params frozen at
            # construction as if they were not averaged, and here the tensor path averages them.
            self.switch_ema.storage.switch_()
        for group in (self._averaged, self._copied, self._ignored):
            if group:
                self._copy_into(group.sources(), group.emas())

    def update_model_with_ema(self, decay: float | None = None) -> None:
        """Put the EMA into the model: ``decay == 0`` copies it (the Switch EMA switch), else
        ``param <- lerp(param, ema, 1 - decay)`` (names in ``param_or_buffer_names_no_ema`` are
        copied, ignored names are left alone)."""
        decay = default(decay, self.update_model_with_ema_beta)
        if decay == 0.0:
            return self.copy_params_from_ema_to_model()
        self.update_moving_average(self.model, self.ema_model, decay)

    def update(self) -> None:
        """ema-pytorch's ``update()``: counts the call, copies the model into the EMA on the
        first call and on each ``update_every``-th one up to ``update_after_step``, averages on
        each ``update_every``-th one after it, and puts the EMA into the model every
        ``update_model_with_ema_every`` steps."""
        if self._view is not None:
            self._check("update")
        step = self._host_step()
        self.step += 1
        self._step_seen = (self.step, self.step._version, step + 1)
        if not self._host_initted():
            if self._view is None:
                self.init_ema()
            self._copy_model_to_ema()
            self.initted.data.copy_(torch.tensor(True))
            self._initted_seen = (self.initted, self.initted._version, True)  # .data writes bump no version
            return
        should_update = divisible_by(step, self.update_every)
        if should_update and step <= self.update_after_step:
            self._copy_model_to_ema()
            return
        if should_update:
            self._average(self._decay_at(step + 1))
        if exists(self.update_model_with_ema_every) and divisible_by(step, self.update_model_with_ema_every):
            self.update_model_with_ema()

    @torch.no_grad()
    def update_moving_average(
        self, ma_model: nn.Module, current_model: nn.Module, current_decay: float | None = None
    ) -> None:
        """``ma_model <- lerp(ma_model, current_model, 1 - decay)`` by name. ``(ema_model, model)``
        is one fused pass per bucket; ``(model, ema_model)`` moves the model toward the EMA, one
        op per bucket; any other pair of modules runs ema-pytorch's per-tensor loop."""
        if self.is_frozen:
            return
        current_decay = default(current_decay, self.get_current_decay)
        if ma_model is self.ema_model and current_model is self.model and self._view is not None:
            self._check("update_moving_average")
            self._average(current_decay)
        elif ma_model is self.model and current_model is self.ema_model and self._view is not None:
            self._check("update_moving_average")
            self._pull_model(current_decay)
        else:
            self._average_any(ma_model, current_model, current_decay)

    # --- the fused paths -------------------------------------------------------------------------

    def _copy_into(self, targets: list[Tensor], sources: list[Tensor]) -> None:
        if self.allow_different_devices:
            sources = [s.to(t.device) for t, s in zip(targets, sources, strict=True)]
        torch._foreach_copy_(targets, sources)

    def _lerp_into(self, targets: list[Tensor], sources: list[Tensor], weight: float) -> None:
        if self.allow_different_devices:
            sources = [s.to(t.device) for t, s in zip(targets, sources, strict=True)]
        if self.coerce_dtype:
            sources = [maybe_coerce_dtype(s, t.dtype) for t, s in zip(targets, sources, strict=True)]
        torch._foreach_lerp_(targets, sources, weight)

    @torch.no_grad()
    def _average(self, decay: float) -> None:
        """EMA <- lerp(EMA, model, 1 - decay): one fused pass per bucket (copy-only buckets
        copy), one multi-tensor op for the other float params and buffers."""
        if self.is_frozen:
            return
        weight = 1.0 - decay
        if self.switch_ema is not None:
            self.switch_ema.storage.update_(dict.fromkeys(self._devices, weight), False)
        if self._copied:
            self._copy_into(self._copied.emas(), self._copied.sources())
        if self._averaged:
            self._lerp_into(self._averaged.emas(), self._averaged.sources(), weight)

    @torch.no_grad()
    def _pull_model(self, decay: float) -> None:
        """model <- lerp(model, EMA, 1 - decay), in the model's dtype; copies for the names in
        ``param_or_buffer_names_no_ema``; ignored names untouched."""
        weight = 1.0 - decay
        storage = None if self.switch_ema is None else self.switch_ema.storage
        if storage is not None:
            for bucket in storage.buckets:
                if storage.is_copy_only(bucket):
                    ops.dispatch_switch(bucket.ema_flat, bucket.param_flat, storage.backend_of(bucket))
                else:
                    bucket.param_flat.lerp_(bucket.ema_flat.to(bucket.dtype), weight)
            for group in storage.tensor_groups:
                for e, v in zip(group.emas, group.views, strict=True):
                    if storage.is_copy_only(group):
                        v.copy_(e)
                    else:
                        v.lerp_(e.to(v.dtype), weight)
        if self._copied:
            self._copy_into(self._copied.sources(), self._copied.emas())
        if self._averaged:
            targets = self._averaged.sources()
            sources = [maybe_coerce_dtype(e, t.dtype) for t, e in zip(targets, self._averaged.emas(), strict=True)]
            torch._foreach_lerp_(targets, sources, weight)

    def _average_any(self, ma_model: nn.Module, current_model: nn.Module, decay: float) -> None:
        """ema-pytorch's per-tensor loop, for a pair of modules other than (ema_model, model)."""
        device_of = _module_device
        if self.move_ema_to_online_device and device_of(ma_model) != device_of(current_model):
            ma_model.to(device_of(current_model))
        to_copy, to_lerp = [], []
        pairs = zip(self.get_params_iter(current_model), self.get_params_iter(ma_model), strict=False)
        buffer_pairs = zip(self.get_buffers_iter(current_model), self.get_buffers_iter(ma_model), strict=False)
        for (name, current), (_, ma) in (*pairs, *buffer_pairs):
            if self._is_ignored(name):
                continue
            (to_copy if name in self.param_or_buffer_names_no_ema else to_lerp).append((ma.data, current.data))
        for tgt, src in to_copy:
            self.inplace_copy(tgt, src)
        for tgt, src in to_lerp:
            self.inplace_lerp(tgt, src, 1.0 - decay)

    # --- nn.Module plumbing ----------------------------------------------------------------------

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True) -> EMA:
        """``.to()``, ``.cuda()``, ``.half()`` ...: the ``step``/``initted`` buffers follow; the
        models' tensors must already be where the call would put them (see the module docstring)."""
        if recurse:
            for name, child in self._modules.items():
                if child is not None:
                    _check_unmoved(child, fn, f"EMA.{name}")
        return super()._apply(fn, recurse=False)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """ema-pytorch's format (``initted``, ``step``, ``online_model.*``, ``ema_model.*``),
        written into the existing tensors. ``assign=True`` is refused: it would replace the
        params that view sema's buckets."""
        if assign:
            raise ValueError(
                f"{_NAME}.load_state_dict(assign=True) would replace the EMA params, which are views of sema's buckets "
                "(and the model's params, which live in them); load with assign=False (the default)"
            )
        if self._view is not None:
            self._check("load_state_dict")
        return super().load_state_dict(state_dict, strict=strict)

    def __deepcopy__(self, memo: dict) -> EMA:
        raise TypeError(
            "sema.compat.ema_pytorch.EMA cannot be deep-copied: the model's params live in sema's buckets. Build a new "
            "EMA on a copy of the model and load ema.state_dict() into it"
        )

    def __reduce_ex__(self, protocol: object) -> object:
        raise TypeError(
            "sema.compat.ema_pytorch.EMA cannot be pickled (torch.save(ema)): save ema.state_dict() and load it into "
            "an EMA built on the model with ema.load_state_dict()"
        )


def _module_device(m: nn.Module) -> torch.device:
    return next(m.parameters()).device
