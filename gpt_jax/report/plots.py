"""The PNG plots of a comparison (matplotlib, headless): one colour per variant, one line per
variant (the mean over seeds) with a band from the lowest to the highest seed."""

from __future__ import annotations

import os
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gpt_jax.report.runs import Run, VariantStats, reported_metric  # noqa: E402

Curve = Callable[[Run], list[tuple[float, float]]]


def ema(values: list[float], smoothing: float) -> list[float]:
    """Exponential moving average, debiased like TensorBoard's (smoothing 0 = none)."""
    out, avg = [], 0.0
    for i, v in enumerate(values, 1):
        avg = smoothing * avg + (1 - smoothing) * v
        out.append(avg / (1 - smoothing ** i) if smoothing > 0 else v)
    return out


def band(curves: list[list[tuple[float, float]]]) -> tuple[np.ndarray, ...]:
    """(x, mean, low, high) over the runs, at every x any run has."""
    xs = sorted({x for c in curves for x, _ in c})
    per_run = [dict(c) for c in curves]
    at = [[r[x] for r in per_run if x in r] for x in xs]
    return (np.array(xs), np.array([np.mean(v) for v in at]), np.array([min(v) for v in at]),
            np.array([max(v) for v in at]))


def colours(stats: list[VariantStats]) -> dict[str, tuple]:
    """A fixed colour per variant, in the order the variants were found."""
    order = sorted(stats, key=lambda s: min(r.path for r in s.runs))
    cmap = plt.get_cmap("tab10")
    return {s.name: cmap(i % 10) for i, s in enumerate(order)}


def line_plot(stats: list[VariantStats], curve: Curve, path: str, xlabel: str, ylabel: str,
              title: str, marker: str | None = None) -> int:
    """One mean line + min-max band per variant; returns the number of lines drawn."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colour = colours(stats)
    for s in stats:
        x, mean, low, high = band([curve(r) for r in s.runs])
        if not len(x):
            continue
        ax.plot(x, mean, color=colour[s.name], lw=1.8, marker=marker, ms=3,
                label=f"{s.name} (n={s.n})")
        if s.n > 1:
            ax.fill_between(x, low, high, color=colour[s.name], alpha=0.2, lw=0)
    _zoom(ax, stats, curve)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    n = len(ax.get_lines())
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return n


def _zoom(ax, stats: list[VariantStats], curve: Curve) -> None:
    """With many points, leave out the first quarter's high loss so that the curves' ends can
    be told apart; with few (eval curves), show them whole."""
    curves = [curve(r) for s in stats for r in s.runs]
    ys = [y for c in curves for _, y in c]
    tails = [y for c in curves if len(c) >= 10 for _, y in c[len(c) // 4:]]
    if tails:
        lo, hi = min(ys), max(tails)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), hi + 0.1 * (hi - lo + 1e-9))


def bar_plot(stats: list[VariantStats], path: str) -> int:
    """Final eval loss per variant (best first), error bars ± one sample std; returns #bars."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(stats), 4.5), dpi=110)
    colour = colours(stats)
    means = [s.final_mean for s in stats]
    stds = [s.final_std or 0.0 for s in stats]
    bars = ax.bar(range(len(stats)), means, yerr=stds, capsize=6,
                  color=[colour[s.name] for s in stats], alpha=0.85)
    ax.set_xticks(range(len(stats)), [f"{s.name}\n(n={s.n})" for s in stats])
    lo = min(m - d for m, d in zip(means, stds))
    hi = max(m + d for m, d in zip(means, stds))
    pad = max(hi - lo, 0.01 * hi) * 0.6
    ax.set_ylim(lo - pad, hi + pad)
    for rect, m, d in zip(bars, means, stds):
        ax.annotate(f"{m:.4f}", (rect.get_x() + rect.get_width() / 2, m + d), ha="center",
                    va="bottom", xytext=(0, 3), textcoords="offset points", fontsize=8)
    ax.set(ylabel="final eval loss (mean ± std)", title="final eval loss (axis not from 0)")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return len(bars)


def target_plot(stats: list[VariantStats], target: float, path: str) -> int:
    """Eval loss vs training time per variant (both the mean over seeds at each eval step),
    the target as a dashed horizontal line; returns the number of variants drawn."""
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=110)
    colour, n = colours(stats), 0
    for s in stats:
        timed = [[(step, r.train_time_at(step), loss) for step, loss in r.evals] for r in s.runs]
        steps, times = band([[(st, t) for st, t, _ in c if t is not None] for c in timed])[:2]
        losses = band([[(st, loss) for st, t, loss in c if t is not None] for c in timed])[1]
        if len(steps):
            ax.plot(times, losses, color=colour[s.name], lw=1.8, marker="o", ms=3,
                    label=f"{s.name} (n={s.n})")
            n += 1
    ax.axhline(target, color="black", ls="--", lw=1, label=f"target {target:.4f}")
    ax.set(xlabel="training time (s; compilation, eval, checkpoints excluded)",
           ylabel="eval loss", title="eval loss vs training time (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return n


def plot_all(stats: list[VariantStats], out_dir: str, smoothing: float = 0.6,
             target: float | None = None) -> dict:
    """Write the four PNGs, time_to_target.png (with a target and logged step times), plus
    one per downstream task, into out_dir; returns {file name: variants drawn in it}."""
    def tokens(r: Run) -> list[tuple[float, float]]:
        return [(step * (r.tokens_per_step or 0), y) for step, y in r.evals]

    def smoothed(r: Run) -> list[tuple[float, float]]:
        steps, losses = zip(*r.losses) if r.losses else ((), ())
        return list(zip(steps, ema(list(losses), smoothing)))

    plots = {
        "eval_loss_vs_step.png": line_plot(
            stats, lambda r: r.evals, os.path.join(out_dir, "eval_loss_vs_step.png"), "step",
            "eval loss", "eval loss vs step (band: min–max over seeds)", marker="o"),
        "eval_loss_vs_tokens.png": line_plot(
            stats, tokens, os.path.join(out_dir, "eval_loss_vs_tokens.png"), "tokens seen",
            "eval loss", "eval loss vs tokens (band: min–max over seeds)", marker="o"),
        "train_loss.png": line_plot(
            stats, smoothed, os.path.join(out_dir, "train_loss.png"), "step",
            "train loss (smoothed)", f"train loss, EMA smoothing {smoothing}"),
        "final_eval_loss.png": bar_plot(stats, os.path.join(out_dir, "final_eval_loss.png")),
    }
    if target is not None and any(len(r.train_time) > 1 for s in stats for r in s.runs):
        plots["time_to_target.png"] = target_plot(stats, target,
                                                  os.path.join(out_dir, "time_to_target.png"))
    runs = [r for s in stats for r in s.runs]
    for task in dict.fromkeys(t for s in stats for t in s.tasks):  # train.eval_tasks
        metric = reported_metric(runs, task)
        name = f"{task}_{metric}_vs_step.png"
        plots[name] = line_plot(stats, lambda r, t=task, m=metric: r.downstream(t, m),
                                os.path.join(out_dir, name), "step", f"{task} {metric}",
                                f"{task} {metric} vs step (band: min–max over seeds)",
                                marker="o")
    return plots
