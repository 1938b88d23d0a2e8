"""`gpt-jax compare`: gather run directories into variants, summarise them over seeds, write
report.md (`markdown`) and PNG plots (`plots`); the runs and their statistics are `runs`."""

from __future__ import annotations

import os

from gpt_jax.report import markdown
from gpt_jax.report import plots as plots_lib
from gpt_jax.report.runs import (
    ReportError,
    Run,
    TimeToTarget,
    VariantStats,
    config_warnings,
    default_out,
    discover,
    group,
    split_without_eval,
    time_to_target,
)

__all__ = ["ReportError", "Run", "TimeToTarget", "VariantStats", "compare"]


def compare(paths: list[str], out_dir: str | None = None, baseline: str | None = None,
            smoothing: float = 0.6, target_loss: float | None = None) -> dict:
    """Write <out_dir>/report.md and the plots; returns {"report", "plots", "stats",
    "warnings", "target", "target_source", "time_to_target"}.

    The target eval loss of the time-to-target table is `target_loss`, else the baseline's
    mean final eval loss.

    "plots" maps each PNG's file name to the number of variants drawn in it (lines or bars).
    """
    runs, sweep_baseline, summary = discover(paths)
    runs, no_eval = split_without_eval(runs)
    warnings = [f"{r.path}: no eval metrics yet; left out" for r in no_eval]
    warnings += config_warnings(runs)
    names = list(dict.fromkeys(r.variant for r in runs))
    if baseline and baseline not in names:
        raise ReportError(f"--baseline={baseline!r} is not a variant; one of {', '.join(names)}")
    baseline = baseline or (sweep_baseline if sweep_baseline in names else names[0])
    stats = group(runs, baseline)
    if target_loss is None:
        target = next(s for s in stats if s.name == baseline).final_mean
        source = f"the baseline {baseline}'s mean final eval loss"
    else:
        target, source = target_loss, "--target_loss"
    ttt = time_to_target(stats, target, full_run=baseline if target_loss is None else None)
    out_dir = out_dir or default_out(paths)
    os.makedirs(out_dir, exist_ok=True)
    plots = plots_lib.plot_all(stats, out_dir, smoothing, target)
    path = os.path.join(out_dir, "report.md")
    with open(path, "w") as f:
        f.write(markdown.render(stats, baseline, list(plots), paths, warnings, summary,
                                (target, source, ttt)))
    return {"report": path, "plots": plots, "stats": stats, "warnings": warnings,
            "target": target, "target_source": source, "time_to_target": ttt}
