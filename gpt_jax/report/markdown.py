"""report.md of a comparison: the per-variant table, findings, variants, plots, runs."""

from __future__ import annotations

import statistics

from gpt_jax.report.runs import TimeToTarget, VariantStats, reported_metric, std, varied_keys


def fmt_pm(values: list[float], spec: str = ".4f") -> str:
    s = std(values)
    mean = statistics.fmean(values)
    return f"{mean:{spec}} ± {s:{spec}}" if s is not None else f"{mean:{spec}}"


def human(v: float) -> str:
    """3 significant digits with k / M / B: 2560 -> 2.56k, 1228800 -> 1.23M."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if v >= scale:
            return f"{v / scale:.3g}{suffix}"
    return f"{v:g}"


def fmt_count(values: list[int], unit: str = "") -> str:
    if not values:
        return "?"
    lo, hi = min(values), max(values)
    one = human if unit == "M" else (lambda v: f"{v:,}")
    return one(lo) if lo == hi else f"{one(lo)}–{one(hi)}"


def fmt_delta(s: VariantStats, baseline: str) -> str:
    if s.name == baseline:
        return "baseline"
    if s.within_noise is None:
        return f"{s.delta:+.4f} (no spread: 1 seed)"
    return f"{s.delta:+.4f}" + (" ≈ within noise" if s.within_noise else "")


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    return f"{seconds / 60:.1f} min" if seconds >= 90 else f"{seconds:.0f} s"


def table(stats: list[VariantStats], baseline: str) -> list[str]:
    rows = ["| # | variant | seeds | params | tokens seen | final eval loss | best eval loss "
            "| Δ final vs baseline | tokens/s | MFU | wall time / run |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i, s in enumerate(stats, 1):
        tps = s.mean_of([r.throughput("tokens_per_s") for r in s.runs])
        mfu = s.mean_of([r.throughput("mfu") for r in s.runs])
        wall = s.mean_of([r.wall_s for r in s.runs])
        rows.append(f"| {i} | {s.name} | {s.n} | {fmt_count(s.params)} | "
                    f"{fmt_count(s.tokens, 'M')} | {fmt_pm(s.final)} | {fmt_pm(s.best)} | "
                    f"{fmt_delta(s, baseline)} | {f'{tps:,.0f}' if tps else '?'} | "
                    f"{f'{mfu:.1%}' if mfu is not None else 'n/a'} | {fmt_time(wall)} |")
    return rows


def task_size(stats: list[VariantStats], task: str) -> str:
    key = f"downstream/{task}/n"
    sizes = [e[key] for s in stats for r in s.runs for e in r.events if key in e]
    return f"{int(sizes[-1])}" if sizes else "?"


def downstream_table(stats: list[VariantStats]) -> list[str]:
    """Final acc_norm (or, for runs from before it, acc_per_token) of each downstream task
    (train.eval_tasks) per variant; [] if none."""
    tasks = list(dict.fromkeys(t for s in stats for t in s.tasks))
    if not tasks:
        return []
    runs = [r for s in stats for r in s.runs]
    metrics = {t: reported_metric(runs, t) for t in tasks}
    rows = ["## Downstream tasks", "",
            "| variant | " + " | ".join(f"{t} {metrics[t]}" for t in tasks) + " |",
            "|---|" + "---|" * len(tasks)]
    for s in stats:
        cells = [fmt_pm(v) if (v := s.final_downstream(t, metrics[t])) else "–" for t in tasks]
        rows.append(f"| {s.name} | " + " | ".join(cells) + " |")
    sizes = ", ".join(f"{t} {task_size(stats, t)}" for t in tasks)
    return rows + ["", "Accuracy at the last evaluation (mean ± sample std over seeds): "
                   "acc_norm picks the ending with the highest log-likelihood per character "
                   "(lm-evaluation-harness), acc_per_token the highest per token (llm.c); "
                   f"examples per task: {sizes}. See docs/evaluation.md.", ""]


def findings(stats: list[VariantStats], baseline: str) -> list[str]:
    base = next(s for s in stats if s.name == baseline)
    lines = [] if len(stats) > 1 else ["- Only one variant: nothing to compare it with."]
    for s in stats:
        if s is base:
            continue
        verdict = "better" if s.delta < 0 else "worse"
        spread = max(x for x in (s.final_std, base.final_std, 0.0) if x is not None)
        if s.within_noise is None:
            note = "with one seed there is no spread to judge it against"
        elif s.within_noise:
            note = f"**smaller than the seed spread** ({spread:.4f}): not a difference"
        else:
            note = f"larger than the seed spread ({spread:.4f})"
        lines.append(f"- **{s.name}** ends {abs(s.delta):.4f} {verdict} than **{base.name}** "
                     f"in final eval loss ({s.final_mean:.4f} vs {base.final_mean:.4f}; "
                     f"{s.n} vs {base.n} seeds): {note}.")
    return lines


def _ratio(values: list[float], base: list[float]) -> str:
    if not values or not base:
        return "–"
    return f"{statistics.fmean(values) / statistics.fmean(base):.2f}×"


def target_table(target: float, source: str, ttt: list[TimeToTarget], baseline: str
                 ) -> list[str]:
    base = next(t for t in ttt if t.name == baseline)
    rows = ["## Time to target", "", f"Target eval loss: **{target:.4f}** ({source}).", "",
            "| variant | seeds reached | first eval step ≤ target | steps to target "
            "| × baseline steps | training time to target | × baseline time |",
            "|---|---|---|---|---|---|---|"]
    for t in ttt:
        rows.append(
            f"| {t.name} | {t.reached_text} | "
            f"{fmt_pm(t.first_eval, '.0f') if t.first_eval else '–'} | "
            f"{fmt_pm(t.steps, '.1f') if t.steps else '–'} | {_ratio(t.steps, base.steps)} | "
            f"{fmt_pm(t.seconds, '.1f') + ' s' if t.seconds else '–'} | "
            f"{_ratio(t.seconds, base.seconds)} |")
    return rows + [
        "", "Steps to target: the step at which a seed's eval loss crosses the target, "
        "interpolated linearly between the two evaluations around the crossing (the first "
        "evaluation at or below the target is its own step if it is the run's first "
        "evaluation); the first eval step at or below the target is shown beside it, so the "
        "eval interval bounds the error. Training time: the sum of the logged step_time_s × "
        "steps up to that step (linear within a log interval): the train steps' own time, "
        "without the first step's compilation, evaluation or checkpointing. Mean ± sample std "
        "over the seeds that reached the target; the others are left out of the means and "
        "counted in *seeds reached*. × baseline: the variant's mean over the baseline's "
        f"(**{baseline}**)"
        + (f"; the target being {baseline}'s own mean final eval loss, its row is its whole "
           "runs (last eval step, all training time), where it gets there on average."
           if base.whole_runs else "."), ""]


def target_finding(target: float, ttt: list[TimeToTarget]) -> str:
    timed = [t for t in ttt if t.seconds]
    if not timed:
        reached = [t.name for t in ttt if t.reached]
        return (f"- No variant has step times to reach eval loss {target:.4f} in; reached by: "
                f"{', '.join(reached) or 'none'}.")
    fastest = min(timed, key=lambda t: statistics.fmean(t.seconds))
    never = [t.name for t in ttt if not t.reached]
    return (f"- **{fastest.name}** reaches eval loss {target:.4f} first in training time "
            f"({statistics.fmean(fastest.seconds):.1f} s, {fastest.reached}/{fastest.n} seeds)"
            + (f"; never reached by {', '.join(never)}." if never else "."))


def per_run(stats: list[VariantStats]) -> list[str]:
    rows = ["| run | variant | seed | last step | final eval loss | best eval loss |",
            "|---|---|---|---|---|---|"]
    for s in stats:
        for r in s.runs:
            rows.append(f"| `{r.path}` | {s.name} | {r.config.get('train.seed', '?')} | "
                        f"{r.final_step} | {r.evals[-1][1]:.4f} | "
                        f"{min(v for _, v in r.evals):.4f} |")
    return rows


def variant_lines(stats: list[VariantStats]) -> list[str]:
    keys = varied_keys(stats)
    lines = []
    for s in stats:
        overrides = s.runs[0].member.get("overrides") or {
            k: s.runs[0].config.get(k) for k in keys}
        shown = ", ".join(f"`{k}={v!r}`" for k, v in overrides.items()) or "(no overrides)"
        lines.append(f"- **{s.name}**: {shown}")
    return lines


def render(stats: list[VariantStats], baseline: str, plots: list[str], paths: list[str],
           warnings: list[str], summary: dict,
           target: tuple[float, str, list[TimeToTarget]] | None = None) -> str:
    """`target`: (target eval loss, where it came from, each variant's time to it)."""
    seeds = ", ".join(f"{s.name} {s.n}" for s in stats)
    out = [f"# Comparison: {', '.join(paths)}", ""]
    if summary.get("description"):
        out += [summary["description"], ""]
    if summary.get("ablation"):
        out += [f"Ablation file: `{summary['ablation']}`; base config `{summary['base']}`.", ""]
    out += table(stats, baseline) + [
        "", f"Sorted best first. Each mean rests on this many seeds: {seeds}. "
        "± is the sample standard deviation over seeds (ddof=1); one seed shows none. "
        f"Δ is the variant's mean final eval loss minus the baseline's (**{baseline}**); "
        "negative is better. *≈ within noise*: |Δ| is smaller than the larger of the two "
        "variants' seed standard deviations. Tokens/s and MFU: mean over the logged intervals "
        "after the first (which may include compilation); MFU is n/a where the device's peak "
        "is unknown (CPU). Wall time: the sweep's time per member (setup and compilation "
        "included), else the sum of the logged step times.", ""]
    out += downstream_table(stats)
    if target is not None:
        out += target_table(*target, baseline)
    out += ["## Findings", ""] + findings(stats, baseline)
    if target is not None:
        out.append(target_finding(target[0], target[2]))
    out += ["", "## Variants", ""] + variant_lines(stats)
    out += ["", "## Plots", ""] + [f"![{p[:-4]}]({p})" for p in plots]
    out += ["", "Lines: mean over seeds; bands: min to max over seeds. Train loss is smoothed "
            "(exponential moving average, debiased) before averaging. The bar chart's error "
            "bars are ± one sample standard deviation; its y axis does not start at zero.",
            "", "## Runs", ""] + per_run(stats)
    if warnings:
        out += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    return "\n".join(out) + "\n"
