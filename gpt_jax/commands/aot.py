"""`gpt-jax aot --topology=v5e-8 [--preset=124M] [--flags]`: compile for a TPU slice on a CPU host.

Compiles the exact sharded train step (and a cached decode step) of a config for the named
slice and prints per-chip memory against HBM (fits / does not fit, by how much), XLA's FLOPs
and estimated step time, and the projected MFU; the record is also printed as one JSON line.
Needs libtpu (`pip install 'libtpu==0.0.42.*'`); no TPU is touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

from absl import flags

from gpt_jax.commands.common import (
    CommandError,
    config_with_overrides,
    define_config_flag,
    print_record,
    usage_error,
)
from gpt_jax.model import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES
from gpt_jax.presets import preset_path

define_config_flag("default")
flags.DEFINE_string("topology", None, "TPU slice, e.g. v4-8, v5e-8, v5p-8, v5e-256, v5p-128.")
flags.DEFINE_string("preset", None, "124M, 350M, 774M, 1558M or a configs/ name (else --config).")
flags.DEFINE_string("mesh", None, "data,fsdp,tensor sizes, e.g. 1,8,1 (-1: the rest); "
                    "default: the config's mesh section.")
flags.DEFINE_integer("batch_size", None, "Global batch size (default: the config's).")
flags.DEFINE_enum("dtype", None, DTYPES, "Compute dtype (params stay model.param_dtype).")
flags.DEFINE_enum("remat_policy", None, REMAT_POLICIES, "Rematerialisation policy.")
flags.DEFINE_enum("attention_impl", None, ATTENTION_IMPLS, "Attention implementation.")
flags.DEFINE_bool("scan_layers", None, "Scan over layers (default: the config's).")
flags.DEFINE_bool("decode", True, "Also compile one cached decoding step.")
flags.DEFINE_integer("decode_batch_size", 0, "Decode rows (0: 8 per data*fsdp shard).")
flags.DEFINE_integer("serve_slots", 0, "Compile the serving engine's decode step for this "
                     "many slots of the full context instead of the train step: memory per "
                     "chip, decode tokens/s per chip and the HBM bound (mesh: heads over the "
                     "largest tensor axis that divides them, slots over the rest).")
flags.DEFINE_string("json_out", "", "Also append the JSON record (--search: the ranking) to "
                    "this file (--published: write the runs and the fit to it).")
flags.DEFINE_bool("xla_overlap_flags", True, "Compile with gpt_jax.tpu_flags' libtpu "
                  "collective-overlap flags (LIBTPU_INIT_ARGS; yours are appended and win).")
flags.DEFINE_bool("search", False, "Search meshes, batches, remat, scan, attention and "
                  "loss_chunks for the fastest config that fits (gpt_jax/aot_search.py).")
flags.DEFINE_bool("published", False, "Compile the published measured runs of "
                  "configs/published/ (cached), print each one's measured tokens/s per chip "
                  "beside the roofline bound and the realistic estimate, and fit the estimate's "
                  "efficiencies to them (gpt_jax/projection.py).")
flags.DEFINE_integer("tokens_per_step", None, "--search: fix the global batch to this many "
                     "tokens (else powers of two up to the config's batch).")
flags.DEFINE_float("budget_s", 1200.0, "--search: start no compile after this many seconds.")
flags.DEFINE_integer("workers", 2, "--search: compiles at once (each in its own process).")
flags.DEFINE_integer("top", 8, "--search: compile the best-estimated candidates until this "
                     "many fit.")
FLAGS = flags.FLAGS


def _mesh_flag(text: str | None) -> tuple[int, int, int] | None:
    if text is None:
        return None
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise usage_error(f"--mesh={text!r} must be three integers data,fsdp,tensor")
    return sizes  # type: ignore[return-value]


def main(argv: list[str]) -> None:
    del argv
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile for TPU; never probe for one here
    # Imported here, not at the top: flag parsing and --help stay fast.
    from gpt_jax import aot

    if FLAGS.published:
        return _published()
    if not FLAGS.topology:
        raise usage_error(f"--topology is required; one of: {', '.join(aot.SLICES)}")
    if FLAGS.search:
        return _search()
    if FLAGS.serve_slots:
        return _serving()
    try:
        aot.get_slice(FLAGS.topology)
        config = aot.apply_overrides(_config(), batch_size=FLAGS.batch_size,
                                     attention_impl=FLAGS.attention_impl,
                                     remat_policy=FLAGS.remat_policy,
                                     scan_layers=FLAGS.scan_layers, dtype=FLAGS.dtype,
                                     mesh=_mesh_flag(FLAGS.mesh))
        record = aot.project(config, FLAGS.topology, decode=FLAGS.decode,
                             decode_batch_size=FLAGS.decode_batch_size,
                             overlap_flags=FLAGS.xla_overlap_flags)
    except aot.AotError as e:
        raise CommandError(str(e)) from e
    _report(record, aot.format_report)


def _report(record: dict, render) -> None:
    """The human report on stderr, the record (with its command line) as JSON on stdout."""
    record["command"] = "gpt-jax " + " ".join(sys.argv[1:])
    print(render(record), file=sys.stderr)
    print_record(record, FLAGS.json_out)


def _config():
    """--config, or --preset with the command line's --config.x=v overrides applied to it."""
    from gpt_jax import aot

    if not FLAGS.preset:
        return FLAGS.config
    if FLAGS["config"].present:
        raise usage_error(f"--preset={FLAGS.preset} and --config={FLAGS['config'].config_filename}"
                          " both name a config; give one (--config.x=v overrides apply to it)")
    aot.resolve_preset(FLAGS.preset)  # AotError naming the choices
    return config_with_overrides(preset_path(aot.PRESETS.get(FLAGS.preset, FLAGS.preset)),
                                 sys.argv[1:])


def _serving() -> None:
    from gpt_jax import aot

    for name in ("batch_size", "remat_policy", "decode_batch_size", "tokens_per_step"):
        if FLAGS[name].present:
            raise usage_error(f"--{name} has no meaning for --serve_slots (a decode step)")
    try:
        config = aot.apply_overrides(_config(), dtype=FLAGS.dtype,
                                     attention_impl=FLAGS.attention_impl,
                                     scan_layers=FLAGS.scan_layers)
        record = aot.project_serving(config, FLAGS.topology, FLAGS.serve_slots,
                                     mesh=_mesh_flag(FLAGS.mesh),
                                     overlap_flags=FLAGS.xla_overlap_flags)
    except aot.AotError as e:
        raise CommandError(str(e)) from e
    _report(record, aot.format_serving)


def _search() -> None:
    from gpt_jax import aot, aot_search  # as in main: --help stays fast

    for name in ("mesh", "batch_size", "remat_policy", "attention_impl", "scan_layers"):
        if FLAGS[name].present:
            raise usage_error(f"--{name} is searched by --search; leave it out (or drop --search)")
    t0 = time.monotonic()
    try:
        tpu = aot.get_slice(FLAGS.topology)
        config = aot.apply_overrides(_config(), dtype=FLAGS.dtype)
        rows = aot_search.search(config, FLAGS.topology, tokens_per_step=FLAGS.tokens_per_step,
                                 top=FLAGS.top, workers=FLAGS.workers, budget_s=FLAGS.budget_s,
                                 overlap=FLAGS.xla_overlap_flags)
    except aot.AotError as e:
        raise CommandError(str(e)) from e
    shown = [r for r in rows if r.record is not None] or rows[:FLAGS.top]
    print(aot_search.table(shown, tpu))
    winner = rows[0] if rows and rows[0].fits else None
    config_arg = (f"configs/{aot.PRESETS.get(FLAGS.preset, FLAGS.preset)}.py" if FLAGS.preset
                  else FLAGS["config"].config_filename)
    given = tuple(a for a in sys.argv[1:] if a.startswith("--config."))
    given += (f"--config.model.dtype={FLAGS.dtype}",) if FLAGS.dtype else ()
    if winner:
        print("\nwinner:\n  " + "\n  ".join(aot_search.commands(winner, config_arg,
                                                                 FLAGS.topology, given)))
        print("bound by " + aot.bound(winner.record))
    else:
        print("\nno compiled candidate fits yet (budget spent?); rows above are estimates")
    print(f"search took {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if FLAGS.json_out:
        out = aot_search.ranking_json(rows, FLAGS.topology, {
            "command": "gpt-jax " + " ".join(sys.argv[1:]), "preset": FLAGS.preset,
            "search_s": time.monotonic() - t0})
        with open(FLAGS.json_out, "a") as fh:
            fh.write(json.dumps(out) + "\n")


def _published() -> None:
    from gpt_jax import aot_search, projection
    from gpt_jax.config import typed

    given = [name for name in ("topology", "preset", "config", "search", "serve_slots", "mesh",
                               "batch_size", "dtype", "remat_policy", "attention_impl",
                               "scan_layers", "decode", "decode_batch_size", "tokens_per_step",
                               "budget_s", "workers", "top") if FLAGS[name].present]
    given += [a.split("=")[0][2:] for a in sys.argv[1:] if a.startswith("--config.")]
    if given:
        raise usage_error(f"--{given[0]} has no meaning for --published (each published run "
                          "is its own config and slice)")
    runs = []
    for run in projection.published_runs():
        config = typed(config_with_overrides(run.file, []))
        print(f"{run.run} on {run.topology} ...", file=sys.stderr, flush=True)
        record, cached = aot_search.cached_compile(config, run.topology,
                                                   FLAGS.xla_overlap_flags)
        if "error" in record:
            raise CommandError(f"{run.run} on {run.topology}: {record['error']}")
        tokens = record["batch_size"] * record["seq_len"] / record["chips"]
        runs.append(projection.Calibration(
            run.run, run.topology, run.measured, projection.terms(record, config.model), tokens,
            {k: record[k] for k in projection.TERM_FIELDS}))
        print(f"  {'cached' if cached else 'compiled in %.0f s' % record.get('wall_s', 0)}",
              file=sys.stderr)
    fitted, held_out = projection.calibrate(runs)
    print(projection.calibration_table(runs, fitted, held_out))
    if FLAGS.json_out:  # what the fit saw: tests/test_projection.py refits it
        with open(FLAGS.json_out, "w") as fh:
            json.dump({"command": "gpt-jax " + " ".join(sys.argv[1:]),
                       "runs": [dataclasses.asdict(r) for r in runs],
                       "fit": dataclasses.asdict(fitted)}, fh, indent=1)
            fh.write("\n")
