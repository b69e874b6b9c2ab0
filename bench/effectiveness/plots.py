"""Learning-curve and summary plots (PNG, matplotlib's Agg backend) from the results JSON."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .arms import ARMS
from .stats import mean_ci

COLORS = {"plain": "tab:gray", "ema": "tab:blue", "sema": "tab:red"}
LABELS = {"plain": "plain", "ema": "EMA (swapped)", "sema": "SEMA (switch each epoch)"}


def _band(curves: list[list[float]], scale: float = 1.0) -> tuple[list[float], list[float], list[float]]:
    """Mean and 95% CI per epoch over seeds."""
    stats = [mean_ci([c[e] * scale for c in curves]) for e in range(len(curves[0]))]
    mean = [s["mean"] for s in stats]
    low = [s["ci_low"] if s["ci_low"] is not None else s["mean"] for s in stats]
    high = [s["ci_high"] if s["ci_high"] is not None else s["mean"] for s in stats]
    return mean, low, high


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_e1(results: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    cfg = results["config"]
    lrs, decays = cfg["lrs"], cfg["decays"]
    cells = {(c["lr"], c["decay"]): c for c in results["cells"]}
    epochs = list(range(1, cfg["epochs"] + 1))

    fig, axes = plt.subplots(len(decays), len(lrs), figsize=(3.2 * len(lrs), 2.6 * len(decays)), squeeze=False)
    for i, decay in enumerate(decays):
        for j, lr in enumerate(lrs):
            ax = axes[i][j]
            cell = cells[(lr, decay)]
            lowest = 100.0
            for arm in ARMS:
                mean, low, high = _band(cell["curves"][arm]["test"], 100.0)
                ax.plot(epochs, mean, color=COLORS[arm], label=LABELS[arm], lw=1.4)
                ax.fill_between(epochs, low, high, color=COLORS[arm], alpha=0.2, lw=0)
                lowest = min(lowest, *mean[min(2, len(mean) - 1) :])
            ax.set_ylim(max(0.0, lowest - 1.0), 100.0)
            ax.set_title(f"lr {lr}, decay {decay} (×: {cell['iters_per_epoch_x_1_minus_decay']:g})", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("test accuracy %", fontsize=8)
            if i == len(decays) - 1:
                ax.set_xlabel("epoch", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        f"E1 load_digits MLP: test accuracy, mean and 95% CI over {len(cfg['seeds'])} seeds "
        "(×: iterations per epoch × (1 − decay))",
        fontsize=10,
    )
    fig.tight_layout()
    curves_path = out_dir / "e1_curves.png"
    fig.savefig(curves_path, dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(2, len(decays), figsize=(4.2 * len(decays), 6.4), squeeze=False, sharex=True)
    for i, decay in enumerate(decays):
        top, bottom = axes[0][i], axes[1][i]
        finals = {arm: [cells[(lr, decay)]["summary_test"]["final"][arm] for lr in lrs] for arm in ARMS}
        # Zoom on the region where the arms are close; points below it (divergent runs) are written as numbers.
        floor = min(s["mean"] * 100 for stats in finals.values() for s in stats if s["mean"] >= 0.85) - 1.5
        for k, arm in enumerate(ARMS):
            _errorbars(top, lrs, finals[arm], k, COLORS[arm], LABELS[arm], (floor, 100.0))
        paired = {
            name: [cells[(lr, decay)]["summary_test"]["paired_final"][name] for lr in lrs]
            for name in ("sema_minus_ema", "sema_minus_plain")
        }
        near = [s["mean"] * 100 for stats in paired.values() for s in stats if abs(s["mean"]) < 0.1]
        limits = (min(0.0, *near) - 1.0, max(0.0, *near) + 1.0)
        for k, (name, color) in enumerate((("sema_minus_ema", "tab:purple"), ("sema_minus_plain", "tab:orange"))):
            label = {"sema_minus_ema": "SEMA − EMA", "sema_minus_plain": "SEMA − plain"}[name]
            _errorbars(bottom, lrs, paired[name], k, color, label, limits)
        bottom.axhline(0.0, color="black", lw=0.8)
        product = cells[(lrs[0], decay)]["iters_per_epoch_x_1_minus_decay"]
        top.set_title(f"decay {decay} (iters/epoch × (1 − decay) = {product:g})", fontsize=9)
        bottom.set_xlabel("peak learning rate", fontsize=8)
        for ax in (top, bottom):
            ax.set_xscale("log")
            ax.minorticks_off()
            ax.set_xticks(lrs, [f"{lr:g}" for lr in lrs])
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
    axes[0][0].set_ylabel("final test accuracy % (95% CI)", fontsize=8)
    axes[1][0].set_ylabel("paired difference, points (95% CI)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    axes[1][0].legend(fontsize=7)
    fig.suptitle(
        "E1: final test accuracy per grid cell (top) and paired SEMA differences (bottom), mean and 95% CI; "
        "numbers mark means outside the zoomed axis",
        fontsize=9,
    )
    fig.tight_layout()
    final_path = out_dir / "e1_final.png"
    fig.savefig(final_path, dpi=90)
    plt.close(fig)
    return [curves_path, final_path]


def _errorbars(
    ax: Any, lrs: list[float], stats: list[dict[str, Any]], index: int, color: str, label: str, limits: tuple
) -> None:
    """Mean ± CI (in points) against the LR, slightly shifted per series; means outside ``limits``
    are written at the axis edge instead of stretching it."""
    xs = [lr * (1 + 0.05 * (index - 1)) for lr in lrs]
    means = [s["mean"] * 100 for s in stats]
    ax.errorbar(
        xs,
        means,
        yerr=[(s["half_width"] or 0.0) * 100 for s in stats],
        color=color,
        label=label,
        marker="o",
        ms=3,
        capsize=3,
    )
    low, high = limits
    ax.set_ylim(low, high)
    for x, m in zip(xs, means, strict=True):
        if not low <= m <= high:
            edge = high if m > high else low
            ax.annotate(
                f"{m:+.1f}" if low < 0 else f"{m:.1f}",
                (x, edge),
                xytext=(0, -10 - 9 * index if m > high else 4 + 9 * index),
                textcoords="offset points",
                color=color,
                fontsize=7,
                ha="center",
            )


def plot_e2(results: dict[str, Any], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    cfg = results["config"]
    epochs = list(range(1, cfg["epochs"] + 1))
    cells = results["cells"]
    fig, axes = plt.subplots(len(cells), 2, figsize=(10, 3.6 * len(cells)), squeeze=False)
    for (left, right), cell in zip(axes, cells, strict=True):
        curves = cell["curves"]
        means = {}
        for arm in ARMS:
            mean, low, high = _band(curves[arm])
            means[arm] = mean
            left.plot(epochs, mean, color=COLORS[arm], label=LABELS[arm], lw=1.5)
            left.fill_between(epochs, low, high, color=COLORS[arm], alpha=0.2, lw=0)
        late = [v for m in means.values() for v in m[min(1, len(m) - 1) :]]
        left.set_ylim(min(late) - 0.05, max(late) + 0.05)
        left.set_xlabel("epoch")
        left.set_ylabel("validation bits per character")
        left.set_title(
            f"lr {cell['lr']:g}, decay {cell['decay']:g} (iters/epoch × (1 − decay) = "
            f"{cell['iters_per_epoch_x_1_minus_decay']:g})",
            fontsize=9,
        )
        left.legend(fontsize=8)
        for name, a, b, color in (
            ("SEMA − EMA", "sema", "ema", "tab:purple"),
            ("SEMA − plain", "sema", "plain", "tab:orange"),
            ("EMA − plain", "ema", "plain", "tab:cyan"),
        ):
            diffs = [[x - y for x, y in zip(ca, cb, strict=True)] for ca, cb in zip(curves[a], curves[b], strict=True)]
            mean, low, high = _band(diffs)
            right.plot(epochs, mean, color=color, label=name, lw=1.5)
            right.fill_between(epochs, low, high, color=color, alpha=0.2, lw=0)
        right.axhline(0.0, color="black", lw=0.8)
        right.set_xlabel("epoch")
        right.set_ylabel("paired difference, bits/char")
        right.set_title("per seed, then mean and 95% CI; below 0: the first arm is better", fontsize=8)
        right.legend(fontsize=8)
        for ax in (left, right):
            ax.grid(alpha=0.3)
    fig.suptitle(f"E2 char-level GRU on stdlib source: mean and 95% CI over {len(cfg['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    path = out_dir / "e2_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return [path]
