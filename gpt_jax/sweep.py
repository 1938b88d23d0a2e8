"""Sweeps: every (variant, seed) of an ablation file as an ordinary run directory.

An ablation file (`configs/ablations/<name>.py`) defines `get_sweep()` returning a `Sweep`:

    Sweep(base="default", variants=[("learned", {"model.position": "learned"}),
                                    ("rope", {"model.position": "rope"})],
          seeds=[0, 1, 2], overrides={"train.num_steps": 500})

Member `i` trains in `<workdir>/<variant>/seed_<s>/` (seed-major order: every variant of the
first seed, then the second seed, ...). Each member directory holds `sweep_member.json` (its
variant, overrides and state, written only by the process running it); `<workdir>/sweep.json`
summarises them all and is rewritten (atomically) at every change of state.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import importlib.util
import itertools
import json
import os
import re
import socket
import time
from typing import Any, Callable, Sequence

import ml_collections

from gpt_jax import config as config_lib
from gpt_jax.data.files import atomic_write_json, read_json
from gpt_jax.errors import ConfigError, SweepError
from gpt_jax.metrics import read_metrics
from gpt_jax.processes import process_exited
from gpt_jax.report.runs import MEMBER_FILE, SUMMARY_FILE
from gpt_jax.run import RESOLVED_FIELDS
from gpt_jax.train import train

STATES = ("pending", "running", "done", "failed", "interrupted")
_NAME_RE = re.compile(r"^[A-Za-z0-9_.=+-]+$")


@dataclasses.dataclass
class Sweep:
    """What an ablation file describes.

    base: a preset name ("default", "tiny") or the path of a config file with get_config().
    variants: ordered (name, overrides) pairs (or a dict); overrides use dotted keys.
    seeds: one member per variant and seed; the seed sets `train.seed` (init and batch order).
    overrides: applied to every member before the variant's own.
    baseline: the variant the report compares against (default: the first).
    """
    base: str
    variants: Sequence[tuple[str, dict]] | dict[str, dict]
    seeds: Sequence[int] = (0, 1, 2)
    overrides: dict = dataclasses.field(default_factory=dict)
    baseline: str | None = None
    description: str = ""


@dataclasses.dataclass
class Member:
    index: int
    variant: str
    seed: int
    workdir: str
    config: ml_collections.ConfigDict
    overrides: dict  # the variant's own

    @property
    def key(self) -> str:
        return f"{self.variant}/seed_{self.seed}"


def grid(axes: dict[str, Sequence[Any]],
         name: Callable[[dict], str] | None = None) -> list[tuple[str, dict]]:
    """Variants for every combination of `axes` ({dotted key: values}), e.g.

    grid({"optim.lr": [1e-3, 3e-3]}) -> [("lr=0.001", {"optim.lr": 0.001}), ("lr=0.003", ...)].
    """
    keys = list(axes)
    out = []
    for values in itertools.product(*(axes[k] for k in keys)):
        overrides = dict(zip(keys, values))
        label = name(overrides) if name else "_".join(
            f"{k.rsplit('.', 1)[-1]}={v}" for k, v in overrides.items())
        out.append((label, overrides))
    return out


# ----------------------------------------------------------------------------- loading

def _load_module(path: str, what: str):
    if not os.path.exists(path):
        raise SweepError(f"{what} {path!r} does not exist")
    spec = importlib.util.spec_from_file_location(
        f"_gpt_jax_{what}_{abs(hash(os.path.abspath(path)))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_sweep(path: str) -> Sweep:
    """`get_sweep()` of an ablation file, checked (names, seeds, not empty)."""
    module = _load_module(path, "ablation file")
    if not hasattr(module, "get_sweep"):
        raise SweepError(f"ablation file {path!r} has no get_sweep()")
    sweep = module.get_sweep()
    if not isinstance(sweep, Sweep):
        raise SweepError(f"{path}: get_sweep() returned {type(sweep).__name__}, not a Sweep")
    check_sweep(sweep)
    return sweep


def variant_items(sweep: Sweep) -> list[tuple[str, dict]]:
    items = sweep.variants.items() if isinstance(sweep.variants, dict) else sweep.variants
    return [(name, dict(overrides)) for name, overrides in items]


def check_sweep(sweep: Sweep) -> None:
    """Raise SweepError for an empty sweep, duplicate or unusable names, duplicate seeds."""
    items = variant_items(sweep)
    if not items:
        raise SweepError("the sweep has no variants; give at least one (name, overrides) pair")
    if not sweep.seeds:
        raise SweepError("the sweep has no seeds; give at least one, e.g. seeds=[0]")
    names = [name for name, _ in items]
    for name in names:
        if not isinstance(name, str) or not _NAME_RE.match(name) or name.isdigit():
            raise SweepError(f"variant name {name!r} is not usable as a directory name: use "
                             "letters, digits and _ . = + - (and not only digits)")
        if names.count(name) > 1:
            raise SweepError(f"duplicate variant name {name!r}: each variant needs its own name")
    for seed in sweep.seeds:
        if not isinstance(seed, int) or sweep.seeds.count(seed) > 1:
            raise SweepError(f"seeds={list(sweep.seeds)}: seeds must be distinct integers")
    if sweep.baseline is not None and sweep.baseline not in names:
        raise SweepError(f"baseline={sweep.baseline!r} is not a variant; one of {names}")


def load_base(base: str) -> ml_collections.ConfigDict:
    """A preset name or the path of a config file -> its get_config()."""
    if base.endswith(".py"):
        return _load_module(base, "config file").get_config()
    return config_lib.load_preset(base)


# ----------------------------------------------------------------------------- overrides

def apply_overrides(config: ml_collections.ConfigDict, overrides: dict, where: str) -> None:
    """Set each dotted key; one-line SweepError for an unknown key or a value of the wrong type."""
    for key, value in overrides.items():
        *sections, field = key.split(".")
        node, path = config, []
        for part in sections:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise SweepError(f"{where}: unknown config key {key!r}"
                                 f"{_suggest(node, part, '.'.join(path))}")
            node, path = node[part], path + [part]
        if field not in node:
            raise SweepError(f"{where}: unknown config key {key!r}"
                             f"{_suggest(node, field, '.'.join(path))}")
        if isinstance(node[field], ml_collections.ConfigDict):
            raise SweepError(f"{where}: {key!r} is a section; name one of its fields, e.g. "
                             f"'{key}.{next(iter(node[field].keys()))}'")
        try:
            node[field] = value
        except (TypeError, ValueError):
            raise SweepError(f"{where}: {key}={value!r} has the wrong type "
                             f"({type(value).__name__}; the field holds "
                             f"{type(node[field]).__name__}, e.g. {node[field]!r})") from None


def _suggest(node: ml_collections.ConfigDict, part: str, prefix: str) -> str:
    where = f"{prefix} has" if prefix else "sections are"
    close = difflib.get_close_matches(part, list(node.keys()), n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f" ({where}: {', '.join(sorted(node.keys()))}{hint})"


def plan(sweep: Sweep, workdir: str, extra: dict | None = None) -> list[Member]:
    """Every member with its resolved, validated config; raises before anything runs."""
    check_sweep(sweep)
    base = load_base(sweep.base)
    members = []
    for index, (seed, (name, overrides)) in enumerate(
            itertools.product(sweep.seeds, variant_items(sweep))):
        config = copy.deepcopy(base)
        apply_overrides(config, sweep.overrides, "sweep overrides")
        apply_overrides(config, extra or {}, "--set")
        apply_overrides(config, overrides, f"variant {name!r}")
        config.train.seed = seed
        try:
            config_lib.validate(config)
        except ConfigError as e:
            raise SweepError(f"variant {name!r} (seed {seed}): {e}") from None
        members.append(Member(index, name, seed, os.path.join(workdir, name, f"seed_{seed}"),
                              config, overrides))
    return members


def select(members: list[Member], only: str | None) -> list[Member]:
    """--only=<index> | <variant> | <variant>,<seed>."""
    if not only:
        return members
    only = only.strip()
    if only.isdigit():
        if int(only) >= len(members):
            raise SweepError(f"--only={only}: the sweep has members 0..{len(members) - 1}")
        return [members[int(only)]]
    variant, _, seed = only.partition(",")
    chosen = [m for m in members if m.variant == variant.strip()
              and (not seed.strip() or str(m.seed) == seed.strip())]
    if not chosen:
        variants = sorted({m.variant for m in members}, key=[m.variant for m in members].index)
        seeds = sorted({m.seed for m in members})
        raise SweepError(f"--only={only} matches no member; variants: {', '.join(variants)}; "
                         f"seeds: {', '.join(map(str, seeds))}; or an index 0..{len(members) - 1}")
    return chosen


# ----------------------------------------------------------------------------- state files

def _now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def last_step(workdir: str) -> int:
    """The highest step metrics.jsonl reached (0 if none)."""
    return max((int(e.get("step", 0)) for e in read_metrics(workdir)), default=0)


def member_state(member: Member) -> dict:
    """The member's record; a 'running' left by a dead process on this host -> 'interrupted'."""
    info = read_json(os.path.join(member.workdir, MEMBER_FILE)) or {"state": "pending"}
    if (info.get("state") == "running" and info.get("host") == socket.gethostname()
            and info.get("pid") != os.getpid() and process_exited(int(info.get("pid", 0)))):
        info = {**info, "state": "interrupted", "error": "the process running it died"}
    return info


def _set_state(member: Member, state: str, **fields) -> None:
    os.makedirs(member.workdir, exist_ok=True)
    path = os.path.join(member.workdir, MEMBER_FILE)
    info = read_json(path) or {}
    info.update(index=member.index, variant=member.variant, seed=member.seed,
                overrides=member.overrides, num_steps=member.config.train.num_steps,
                state=state, updated=_now(), **fields)
    atomic_write_json(path, info)


def is_done(member: Member) -> bool:
    """Its train() returned normally and metrics.jsonl reached train.num_steps."""
    return (member_state(member).get("state") == "done"
            and last_step(member.workdir) >= member.config.train.num_steps)


def summarize(sweep: Sweep, members: list[Member], workdir: str, source: str = "") -> dict:
    """The sweep's definition and each member's state, step and error."""
    rows = []
    for m in members:
        info = member_state(m)
        rows.append({"index": m.index, "variant": m.variant, "seed": m.seed,
                     "dir": os.path.relpath(m.workdir, workdir), "state": info["state"],
                     "step": last_step(m.workdir), "num_steps": m.config.train.num_steps,
                     "error": info.get("error", ""), "wall_s": info.get("wall_s"),
                     "host": info.get("host")})
    items = variant_items(sweep)
    summary = {"ablation": source, "base": sweep.base, "description": sweep.description,
               "baseline": sweep.baseline or items[0][0], "seeds": list(sweep.seeds),
               "overrides": dict(sweep.overrides), "variants": dict(items), "updated": _now(),
               "counts": {s: sum(r["state"] == s for r in rows) for s in STATES},
               "members": rows}
    return summary


def write_summary(sweep: Sweep, members: list[Member], workdir: str, source: str = "") -> dict:
    """Rewrite <workdir>/sweep.json (atomically); returns what it wrote."""
    summary = summarize(sweep, members, workdir, source)
    atomic_write_json(os.path.join(workdir, SUMMARY_FILE), summary)
    return summary


def check_existing(members: list[Member]) -> None:
    """Refuse to resume a member directory that was trained with a different config."""
    for m in members:
        path = os.path.join(m.workdir, "config.json")
        if not os.path.exists(path):
            continue
        with open(path) as f:
            old = config_lib.flatten(json.load(f))
        new = config_lib.flatten(json.loads(config_lib.to_json(m.config)))
        for key in sorted(set(old) & set(new)):  # a field the schema gained or lost is fine
            if key not in RESOLVED_FIELDS and old[key] != new[key]:
                raise SweepError(
                    f"variant {m.variant!r} (seed {m.seed}): {m.workdir} was trained with "
                    f"{key}={old[key]!r} but the sweep now sets {new[key]!r}; delete "
                    "that directory or undo the change")



# ----------------------------------------------------------------------------- running

TrainFn = Callable[[ml_collections.ConfigDict, str], Any]


def error_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


def run_member(member: Member, train_fn: TrainFn, log: Callable[[str], None],
               on_start: Callable[[], Any] = lambda: None) -> str:
    """Train (or resume) one member; returns its new state: done | failed | interrupted."""
    previous = member_state(member)
    start_step, t0 = last_step(member.workdir), time.time()
    _set_state(member, "running", host=socket.gethostname(), pid=os.getpid(), error="",
               started=_now(), attempts=previous.get("attempts", 0) + 1)
    on_start()
    log(f"[{member.index}] {member.key}: " + (f"resuming at step {start_step}" if start_step
                                              else "starting") + f" in {member.workdir}")
    wall = lambda: round(previous.get("wall_s", 0.0) + time.time() - t0, 1)  # noqa: E731
    try:
        train_fn(copy.deepcopy(member.config), member.workdir)
    except Exception as e:  # a failed member must not stop the others
        _set_state(member, "failed", error=error_line(e), wall_s=wall())
        log(f"[{member.index}] {member.key}: failed: {error_line(e)}")
        return "failed"
    except BaseException as e:  # KeyboardInterrupt, SystemExit: stop the sweep too
        _set_state(member, "interrupted", error=error_line(e), wall_s=wall())
        raise
    step, total = last_step(member.workdir), member.config.train.num_steps
    if step < total:  # train() saved and returned early: a signal asked it to stop
        _set_state(member, "interrupted", wall_s=wall(),
                   error=f"stopped at step {step} of {total}; re-run to resume")
        return "interrupted"
    _set_state(member, "done", wall_s=wall(), finished=_now())
    log(f"[{member.index}] {member.key}: done at step {step} ({wall():.0f} s)")
    return "done"


def run_sweep(sweep: Sweep | str, workdir: str, only: str | None = None,
              train_fn: TrainFn | None = None, extra_overrides: dict | None = None,
              log: Callable[[str], None] = print, source: str = "") -> dict:
    """Run the selected members one after another, skipping done ones; returns the summary
    (plus "selected": the indices this call was asked to run).

    Every member config is resolved and validated before anything runs. A member that raises
    is recorded as failed and the sweep goes on; one stopped by a signal stops the sweep.
    """
    if isinstance(sweep, str):
        source, sweep = sweep, load_sweep(sweep)
    members = plan(sweep, workdir, extra_overrides)
    chosen = select(members, only)
    sweep = dataclasses.replace(sweep, overrides={**sweep.overrides, **(extra_overrides or {})})
    check_existing(members)
    os.makedirs(workdir, exist_ok=True)
    write_summary(sweep, members, workdir, source)
    try:
        for member in chosen:
            if is_done(member):
                log(f"[{member.index}] {member.key}: done already; skipped")
                continue
            state = run_member(member, train_fn or train, log,
                               on_start=lambda: write_summary(sweep, members, workdir, source))
            write_summary(sweep, members, workdir, source)
            if state == "interrupted":
                log("sweep stopped; re-run the same command to resume")
                break
    finally:
        summary = write_summary(sweep, members, workdir, source)
    return {**summary, "selected": [m.index for m in chosen]}
