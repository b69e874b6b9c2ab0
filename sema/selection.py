"""Which of a model's params a ``SwitchEMA`` tracks, and how.

- ``include`` / ``exclude``: ``fnmatch`` patterns on param names (``"encoder.*"``, ``"*.bias"``);
  a param is selected when it matches an ``include`` pattern (all do without ``include``) and no
  ``exclude`` pattern.
- Of the selected params, those with ``requires_grad`` are tracked. ``copy_only`` patterns pick
  tracked params whose EMA is a copy, refreshed at every update instead of averaged (ema-pytorch's
  ``param_or_buffer_names_no_ema``); they live in buckets of their own, updated with weight 1.
- Selected params that are frozen now are remembered: if one becomes trainable later, it is not
  averaged (the buckets were built without it), and :meth:`ParamSelection.newly_trainable` names
  it once so ``SwitchEMA`` can warn.
"""

from __future__ import annotations

from collections.abc import Sequence
from fnmatch import fnmatchcase

from torch import nn


def _patterns(name: str, value: Sequence[str] | str | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, Sequence) and all(isinstance(v, str) for v in value):
        return list(value)
    raise TypeError(f"SwitchEMA: {name} must be a str or a list of str (fnmatch patterns), got {value!r}")


class ParamSelection:
    def __init__(
        self,
        model: nn.Module,
        include: Sequence[str] | str | None = None,
        exclude: Sequence[str] | str | None = None,
        copy_only: Sequence[str] | str | None = None,
    ) -> None:
        includes, excludes, copies = (
            _patterns("include", include),
            _patterns("exclude", exclude),
            _patterns("copy_only", copy_only),
        )
        named = list(model.named_parameters())
        names = [n for n, _ in named]
        for kind, patterns in (("include", includes), ("exclude", excludes)):
            unmatched = [pat for pat in patterns if not any(fnmatchcase(n, pat) for n in names)]
            if unmatched:
                raise ValueError(
                    f"SwitchEMA: {kind} pattern(s) {unmatched} match no param name; names look like "
                    f"{names[:4]} (fnmatch patterns, e.g. 'encoder.*' or '*.bias')"
                )
        selected = [
            (n, p)
            for n, p in named
            if (not includes or any(fnmatchcase(n, pat) for pat in includes))
            and not any(fnmatchcase(n, pat) for pat in excludes)
        ]
        self.tracked = [(n, p) for n, p in selected if p.requires_grad]
        tracked_names = [n for n, _ in self.tracked]
        unmatched = [pat for pat in copies if not any(fnmatchcase(n, pat) for n in tracked_names)]
        if unmatched:
            raise ValueError(
                f"SwitchEMA: copy_only pattern(s) {unmatched} match no tracked param (trainable and selected by "
                f"include/exclude); tracked names look like {tracked_names[:4]}"
            )
        self.copy_only = {n for n in tracked_names if any(fnmatchcase(n, pat) for pat in copies)}
        self._frozen = [(n, p) for n, p in selected if not p.requires_grad]
        self._reported: set[str] = set()

    def newly_trainable(self) -> list[str]:
        """Selected params frozen when the EMA was built that train now, each named once."""
        names = [n for n, p in self._frozen if p.requires_grad and n not in self._reported]
        self._reported.update(names)
        return names
