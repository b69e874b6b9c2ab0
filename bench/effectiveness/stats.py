"""Small-sample statistics for the study: Student-t confidence intervals, paired differences,
win counts and time-to-target. Pure Python (no scipy), so every number is reproducible bit for bit."""

from __future__ import annotations

import math
from collections.abc import Sequence


def student_t_two_sided(t: float, df: int) -> float:
    """P(|T| < t) for Student's t with ``df`` degrees of freedom (exact, closed form for integer df:
    Abramowitz & Stegun 26.7.3 and 26.7.4)."""
    if t <= 0:
        return 0.0
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    if df % 2 == 1:
        series, term = 0.0, 1.0
        for k in range(1, (df - 1) // 2 + 1):
            series += term
            term *= c2 * (2 * k) / (2 * k + 1)
        return 2.0 / math.pi * (theta + math.sin(theta) * math.cos(theta) * series)
    series, term = 0.0, 1.0
    for k in range(1, df // 2 + 1):
        series += term
        term *= c2 * (2 * k - 1) / (2 * k)
    return math.sin(theta) * series


def t_critical(df: int, level: float = 0.95) -> float:
    """The two-sided critical value: P(|T| < value) = level (bisection to machine precision)."""
    if df < 1:
        raise ValueError(f"t_critical needs df >= 1, got {df}")
    lo, hi = 0.0, 1.0
    while student_t_two_sided(hi, df) < level:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if student_t_two_sided(mid, df) < level:
            lo = mid
        else:
            hi = mid
    return hi


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict[str, float | int | None]:
    """Mean, sample standard deviation and the t confidence interval of the mean (None for one value)."""
    n = len(values)
    if n == 0:
        raise ValueError("mean_ci of no values")
    mean = math.fsum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "sd": None, "half_width": None, "ci_low": None, "ci_high": None}
    sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_critical(n - 1, level) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "half_width": half, "ci_low": mean - half, "ci_high": mean + half}


def paired_difference(
    a: Sequence[float], b: Sequence[float], higher_is_better: bool, level: float = 0.95
) -> dict[str, object]:
    """``a - b`` per seed (same seed = same init and data order): its mean with a t interval, and
    how often ``a`` is better, equal or worse (``higher_is_better`` says which way is better)."""
    if len(a) != len(b):
        raise ValueError(f"paired_difference: {len(a)} vs {len(b)} values")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    sign = 1.0 if higher_is_better else -1.0
    wins = sum(sign * d > 0 for d in diffs)
    ties = sum(d == 0 for d in diffs)
    return {
        **mean_ci(diffs, level),
        "wins": wins,
        "ties": ties,
        "losses": len(diffs) - wins - ties,
        "win_fraction": wins / len(diffs),
    }


def first_reaching(curve: Sequence[float], target: float, higher_is_better: bool) -> int | None:
    """The first epoch (1-based) at which ``curve`` is at least as good as ``target``; None if never."""
    for epoch, value in enumerate(curve, start=1):
        if (value >= target) if higher_is_better else (value <= target):
            return epoch
    return None
