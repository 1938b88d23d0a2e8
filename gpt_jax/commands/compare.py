"""`gpt-jax compare runs/position [more run or sweep directories] [--out=DIR]`.

Writes report.md (a table per variant: mean ± std over seeds, delta vs the baseline) and PNG
plots into --out (default: the one directory given, else the directories' common parent).
"""

from __future__ import annotations

import os

from absl import flags

from gpt_jax.commands.common import CommandError, usage_error

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # parameter counts only; no accelerator needed

flags.DEFINE_string("out", None, "Where report.md and the PNGs go (default: the directory "
                    "given, or the common parent of several).")
flags.DEFINE_string("baseline", None, "The variant the deltas are taken against (default: "
                    "the sweep's baseline, else the first variant).")
flags.DEFINE_float("smoothing", 0.6, "EMA smoothing of the train loss plot, in [0, 1).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise usage_error("give one or more sweep or run directories, e.g. "
                          "gpt-jax compare runs/position")
    if not 0 <= FLAGS.smoothing < 1:
        raise usage_error(f"--smoothing={FLAGS.smoothing} must be in [0, 1)")
    # Imported here, not at the top: flag parsing and --help stay fast.
    from gpt_jax import report

    try:
        result = report.compare(paths, FLAGS.out, FLAGS.baseline, FLAGS.smoothing)
    except report.ReportError as e:
        raise CommandError(str(e)) from e
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    for s in result["stats"]:
        print(f"{s.name:<24} n={s.n}  final eval loss {s.final_mean:.4f}"
              + (f" ± {s.final_std:.4f}" if s.final_std is not None else ""))
    print(f"wrote {result['report']} and {len(result['plots'])} plots")
