"""Run directories gathered into variants and summarised over seeds.

A variant is a sweep member's variant (sweep.json / sweep_member.json), else the parent folder
of a `seed_<n>` directory, else the run directory's own name. Statistics over seeds are the
mean and the *sample* standard deviation (ddof=1); one seed has no spread.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
from functools import lru_cache

import numpy as np

from gpt_jax.config import flatten
from gpt_jax.data.files import read_json
from gpt_jax.errors import ReportError
from gpt_jax.flops import count_params
from gpt_jax.metrics import read_metrics
from gpt_jax.model import ModelConfig

SUMMARY_FILE = "sweep.json"  # written by gpt_jax.sweep into a sweep's directory
MEMBER_FILE = "sweep_member.json"  # ... and into each member's run directory
DOWNSTREAM = "downstream/"  # gpt_jax.evals.PREFIX: downstream/<task>/<metric|n>
REPORTED = ("acc_norm", "acc_per_token", "exact_match")  # the report's: the first logged


@dataclasses.dataclass
class Run:
    path: str
    variant: str
    events: list[dict]
    config: dict  # config.json, flattened ("model.n_layer": 4); {} if missing
    member: dict  # sweep_member.json; {} if not a sweep member

    @property
    def evals(self) -> list[tuple[int, float]]:
        return [(e["step"], e["eval_loss"]) for e in self.events if "eval_loss" in e]

    def downstream(self, task: str, metric: str = "acc_norm") -> list[tuple[int, float]]:
        key = f"{DOWNSTREAM}{task}/{metric}"
        return [(e["step"], e[key]) for e in self.events if key in e]

    @property
    def tasks(self) -> list[str]:
        """Downstream tasks logged by this run (train.eval_tasks), in the order first seen."""
        names = [k[len(DOWNSTREAM):].rsplit("/", 1)[0] for e in self.events for k in e
                 if k.startswith(DOWNSTREAM) and k.endswith("/n")]
        return list(dict.fromkeys(names))

    @property
    def losses(self) -> list[tuple[int, float]]:
        return [(e["step"], e["loss"]) for e in self.events if "loss" in e]

    @property
    def final_step(self) -> int:
        return max((int(e["step"]) for e in self.events), default=0)

    @property
    def tokens_per_step(self) -> int | None:
        c = self.config
        if "train.global_batch_size" in c and "model.block_size" in c:
            return int(c["train.global_batch_size"]) * int(c["model.block_size"])
        return None

    def throughput(self, key: str) -> float | None:
        """Mean of `key` over the logged intervals, the first left out (it may hold compiling)."""
        values = [e[key] for e in self.events if key in e]
        values = values[1:] if len(values) > 1 else values
        return statistics.fmean(values) if values else None

    @property
    def train_time(self) -> list[tuple[int, float]]:
        """(step, training seconds up to it) at each logged interval, from (0, 0): the sum of
        step_time_s x steps per interval (compilation, eval and checkpoints excluded)."""
        points = [(0, 0.0)]
        for e in self.events:
            if "step_time_s" in e and e["step"] > points[-1][0]:
                step, total = points[-1]
                points.append((e["step"], total + e["step_time_s"] * (e["step"] - step)))
        return points

    def train_time_at(self, step: float) -> float | None:
        """Training seconds at `step`, linear within a logged interval (each of its steps took
        its step_time_s); None past the last logged step or without step times."""
        points = self.train_time
        if step > points[-1][0]:
            return None
        return float(np.interp(step, *zip(*points)))

    @property
    def wall_s(self) -> float | None:
        """The sweep's wall time of the member; else the sum of the logged step times."""
        if self.member.get("wall_s") is not None:
            return float(self.member["wall_s"])
        return self.train_time[-1][1] or None

    def crossing(self, target: float) -> tuple[int, float] | None:
        """(first eval step with eval loss <= target, the step interpolated linearly between
        the two evals bracketing the crossing); None if no eval reaches the target."""
        previous = None
        for step, loss in self.evals:
            if loss <= target:
                if previous is None or previous[1] == loss:
                    return step, float(step)
                s0, l0 = previous
                return step, s0 + (l0 - target) / (l0 - loss) * (step - s0)
            previous = (step, loss)
        return None


@dataclasses.dataclass
class VariantStats:
    name: str
    runs: list[Run]
    final: list[float]  # final eval loss of each run
    best: list[float]
    params: list[int]
    tokens: list[int]
    delta: float | None = None  # mean final eval loss minus the baseline's
    within_noise: bool | None = None

    @property
    def n(self) -> int:
        return len(self.runs)

    @property
    def final_mean(self) -> float:
        return statistics.fmean(self.final)

    @property
    def final_std(self) -> float | None:
        return std(self.final)

    @property
    def tasks(self) -> list[str]:
        return list(dict.fromkeys(t for r in self.runs for t in r.tasks))

    def final_downstream(self, task: str, metric: str = "acc_norm") -> list[float]:
        """Each run's last logged `metric` on `task` (runs that did not log it left out)."""
        return [r.downstream(task, metric)[-1][1] for r in self.runs
                if r.downstream(task, metric)]

    def mean_of(self, values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return statistics.fmean(known) if known else None


@dataclasses.dataclass
class TimeToTarget:
    """When a variant's seeds first reach the target eval loss; seeds that never do are left
    out of the lists (counted in `n`)."""
    name: str
    n: int  # seeds in all
    first_eval: list[int]  # first eval step at or below the target, per seed that reached it
    steps: list[float]  # the interpolated crossing step, per seed that reached it
    seconds: list[float]  # training seconds at that step (the seeds with logged step times)
    whole_runs: bool = False  # the lists hold whole runs (see time_to_target's full_run)

    @property
    def reached(self) -> int:
        return len(self.steps)

    @property
    def reached_text(self) -> str:
        return f"{self.n} whole runs" if self.whole_runs else f"{self.reached}/{self.n} reached"


def time_to_target(stats: list[VariantStats], target: float,
                   full_run: str | None = None) -> list[TimeToTarget]:
    """Per variant, when its seeds cross `target`. The variant named `full_run` (the baseline,
    when the target is its own mean final eval loss) counts its whole runs instead: on average
    it gets there at its last step, while a crossing would pick out its luckier seeds only."""
    out = []
    for s in stats:
        if s.name == full_run:
            hits = [(r, (r.evals[-1][0], float(r.evals[-1][0]))) for r in s.runs if r.evals]
        else:
            hits = [(r, c) for r in s.runs if (c := r.crossing(target)) is not None]
        seconds = [r.train_time_at(c[1]) for r, c in hits]
        out.append(TimeToTarget(s.name, s.n, [c[0] for _, c in hits], [c[1] for _, c in hits],
                                [t for t in seconds if t is not None], s.name == full_run))
    return out


def std(values: list[float]) -> float | None:
    """Sample standard deviation (ddof=1); None for fewer than two values."""
    return statistics.stdev(values) if len(values) > 1 else None



def is_run_dir(path: str) -> bool:
    return any(os.path.exists(os.path.join(path, f)) for f in ("metrics.jsonl", "config.json"))


def load_run(path: str, variant: str | None = None) -> Run:
    member = (read_json(os.path.join(path, MEMBER_FILE)) or {})
    if variant is None:
        base, parent = os.path.basename(os.path.normpath(path)), os.path.dirname(
            os.path.normpath(path))
        variant = member.get("variant") or (
            os.path.basename(parent) if re.fullmatch(r"seed_\d+", base) and parent else base)
    config = flatten(read_json(os.path.join(path, "config.json")) or {})
    return Run(path, variant, [upgrade_event(e) for e in read_metrics(path)], config, member)


def upgrade_event(event: dict) -> dict:
    """A metrics.jsonl event under today's metric names (`evals.upgrade`: a run logged before
    `acc_per_token` existed called it `acc_norm`)."""
    old = [k for k in event if k.startswith(DOWNSTREAM) and k.endswith("/acc_norm")
           and k[:-len("acc_norm")] + "acc_per_token" not in event]
    if not old:
        return event
    event = dict(event)
    for k in old:
        event[k[:-len("acc_norm")] + "acc_per_token"] = event.pop(k)
    return event


def discover(paths: list[str]) -> tuple[list[Run], str | None, dict]:
    """(runs, the first sweep's baseline, the first sweep's summary) from the given paths."""
    runs, baseline, summary = [], None, {}
    for path in paths:
        if not os.path.isdir(path):
            raise ReportError(f"{path} is not a directory")
        sweep = (read_json(os.path.join(path, SUMMARY_FILE)) or {})
        if sweep:
            summary = summary or sweep
            baseline = baseline or sweep.get("baseline")
            runs += [load_run(os.path.join(path, m["dir"]), m["variant"])
                     for m in sweep.get("members", [])
                     if is_run_dir(os.path.join(path, m["dir"]))]
        elif is_run_dir(path):
            runs.append(load_run(path))
        else:
            found = sorted(os.path.dirname(os.path.join(root, f))
                           for root, _, files in os.walk(path) for f in files
                           if f == "metrics.jsonl")
            if not found:
                raise ReportError(f"{path}: no run directory (no metrics.jsonl) in it")
            runs += [load_run(p) for p in found]
    return runs, baseline, summary


def split_without_eval(runs: list[Run]) -> tuple[list[Run], list[Run]]:
    """(runs with eval metrics, runs without); ReportError if none has any."""
    good = [r for r in runs if r.evals]
    bad = [r for r in runs if not r.evals]
    if not good:
        listing = "\n  ".join(r.path for r in bad) or "(none)"
        raise ReportError("no eval metrics (eval_loss in metrics.jsonl) in any of these run "
                          f"directories:\n  {listing}\nhave they trained to train.eval_every?")
    return good, bad


@lru_cache(maxsize=None)
def _count_params(model_json: str) -> int | None:
    try:
        return count_params(ModelConfig.from_dict(json.loads(model_json), strict=False))
    except Exception:  # an old or foreign config: the count is simply unknown
        return None


def params_of(run: Run) -> int | None:
    model = {k[len("model."):]: v for k, v in run.config.items() if k.startswith("model.")}
    return _count_params(json.dumps(model, sort_keys=True)) if model else None


def group(runs: list[Run], baseline: str | None) -> list[VariantStats]:
    """Per-variant statistics with deltas vs the baseline, sorted best (lowest) first."""
    names = list(dict.fromkeys(r.variant for r in runs))
    baseline = baseline if baseline in names else names[0]
    stats = []
    for name in names:
        members = [r for r in runs if r.variant == name]
        stats.append(VariantStats(
            name, members, final=[r.evals[-1][1] for r in members],
            best=[min(v for _, v in r.evals) for r in members],
            params=[p for p in map(params_of, members) if p is not None],
            tokens=[r.final_step * r.tokens_per_step for r in members if r.tokens_per_step]))
    base = next(s for s in stats if s.name == baseline)
    for s in stats:
        s.delta = s.final_mean - base.final_mean
        spreads = [x for x in (s.final_std, base.final_std) if x is not None]
        s.within_noise = abs(s.delta) < max(spreads) if spreads else None
    return sorted(stats, key=lambda s: s.final_mean)


def config_warnings(runs: list[Run]) -> list[str]:
    """Runs that differ beyond the seed within a variant, or beyond the sweep's variant keys
    across variants (a run from another base config mixed in)."""
    known = [r for r in runs if r.config]
    warnings, firsts = [], {}
    for r in known:
        first = firsts.setdefault(r.variant, r)
        if first is not r:
            warnings += _differs(r, first, {"train.seed"})
    members = [r for r in known if r.member]
    if members:  # the sweep files say which keys the variants may change
        varied = {"train.seed", "model.vocab_size"}.union(
            *(r.member.get("overrides", {}) for r in members))
        warnings += [w for r in firsts.values() if r is not members[0]
                     for w in _differs(r, members[0], varied)]
    return warnings


def _differs(run: Run, other: Run, ignore: set[str]) -> list[str]:
    diff = [k for k in sorted(set(run.config) | set(other.config))
            if k not in ignore and run.config.get(k) != other.config.get(k)]
    if not diff:
        return []
    shown = ", ".join(f"{k}={run.config.get(k)!r} vs {other.config.get(k)!r}"
                      for k in diff[:4]) + (" ..." if len(diff) > 4 else "")
    return [f"{run.path} was trained from a different base config than {other.path}: {shown}"]


def varied_keys(stats: list[VariantStats]) -> list[str]:
    """Config keys whose value differs between the variants' first runs (seed left out)."""
    firsts = [s.runs[0].config for s in stats if s.runs[0].config]
    keys = sorted(set().union(*firsts)) if firsts else []
    return [k for k in keys
            if k != "train.seed" and len({json.dumps(c.get(k)) for c in firsts}) > 1]


def default_out(paths: list[str]) -> str:
    return paths[0] if len(paths) == 1 else os.path.commonpath(
        [os.path.abspath(p) for p in paths])


def reported_metric(runs: list[Run], task: str) -> str:
    """The downstream metric the report shows for `task`: lm-eval's acc_norm where any run
    logged it, else (runs from before it) the per-token one."""
    return next((m for m in REPORTED if any(r.downstream(task, m) for r in runs)), REPORTED[0])
