"""`gpt-jax sweep --config=configs/ablations/position.py --workdir=runs/position [--only=...]`.

Runs every (variant, seed) of an ablation file one after another, each as an ordinary run
directory `<workdir>/<variant>/seed_<s>/`; re-running skips finished members and resumes the
others. `--only` runs one member (an index, `variant,seed`) or one variant's seeds, so that a
launcher can spread the members over machines. `--list` shows the members and their states.
"""

from __future__ import annotations

import ast
import sys

from absl import flags

from gpt_jax.commands import common

common.define_distributed_flags()
flags.DEFINE_string("config", None, "An ablation file with get_sweep(), e.g. "
                    "configs/ablations/position.py.", required=True)
flags.DEFINE_string("workdir", None, "The sweep's directory: one run directory per member and "
                    "sweep.json.", required=True)
flags.DEFINE_string("only", None, "Run one member: its index, or <variant>,<seed>; or "
                    "<variant> for all its seeds.")
flags.DEFINE_multi_string("set", [], "key=value applied to every member after the ablation "
                          "file's overrides, e.g. --set=train.num_steps=100 (repeatable).")
flags.DEFINE_bool("list", False, "Validate, print the members and their states, run nothing.")
FLAGS = flags.FLAGS


def parse_sets(items: list[str]) -> dict:
    """['train.num_steps=100', 'model.norm=rmsnorm'] -> {'train.num_steps': 100, ...}."""
    out = {}
    for item in items:
        key, eq, text = item.partition("=")
        if not eq or not key.strip():
            raise common.usage_error(f"--set={item!r} is not key=value")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare word: a string
        out[key.strip()] = value
    return out


def print_members(summary: dict) -> None:
    print(f"{'#':>3}  {'member':<32} {'state':<12} {'step':>12}  error")
    for m in summary["members"]:
        member = f"{m['variant']}/seed_{m['seed']}"
        print(f"{m['index']:>3}  {member:<32} {m['state']:<12} "
              f"{m['step']:>5}/{m['num_steps']:<6}  {m['error']}")
    print("counts: " + ", ".join(f"{k} {v}" for k, v in summary["counts"].items() if v))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise common.usage_error(f"unexpected arguments {argv[1:]}; use --flags")
    # Imported here, not at the top: flag parsing and --help stay fast.
    from gpt_jax import sweep as sweep_lib

    extra = parse_sets(FLAGS.set)
    try:
        sweep = sweep_lib.load_sweep(FLAGS.config)
        if FLAGS.list:
            members = sweep_lib.plan(sweep, FLAGS.workdir, extra)
            sweep_lib.check_existing(members)
            chosen = {m.index for m in sweep_lib.select(members, FLAGS.only)}
            summary = sweep_lib.summarize(sweep, members, FLAGS.workdir, FLAGS.config)
            print_members({**summary, "members": [m for m in summary["members"]
                                                  if m["index"] in chosen]})
            return
        common.init_distributed()
        summary = sweep_lib.run_sweep(sweep, FLAGS.workdir, only=FLAGS.only,
                                      extra_overrides=extra, source=FLAGS.config)
    except sweep_lib.SweepError as e:
        raise common.CommandError(str(e)) from e
    print_members(summary)
    unfinished = [m for m in summary["members"]
                  if m["index"] in summary["selected"] and m["state"] != "done"]
    if unfinished:
        sys.exit(1)
    if not FLAGS.only:
        print(f"next: gpt-jax compare {FLAGS.workdir}")
