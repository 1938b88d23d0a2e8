"""`gpt-jax compare runs/position [more run or sweep directories] [--out=DIR]`.

Writes report.md (a table per variant: mean ± std over seeds, delta vs the baseline) and PNG
plots into --out (default: the one directory given, else the directories' common parent).
"""

from __future__ import annotations

import math
import os
import statistics

from absl import flags

from gpt_jax.commands.common import CommandError, usage_error

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # parameter counts only; no accelerator needed

flags.DEFINE_string("out", None, "Where report.md and the PNGs go (default: the directory "
                    "given, or the common parent of several).")
flags.DEFINE_string("baseline", None, "The variant the deltas are taken against (default: "
                    "the sweep's baseline, else the first variant).")
flags.DEFINE_float("smoothing", 0.6, "EMA smoothing of the train loss plot, in [0, 1).")
flags.DEFINE_float("target_loss", None, "The eval loss of the time-to-target table (default: "
                   "the baseline's mean final eval loss).")
FLAGS = flags.FLAGS


def main(argv: list[str]) -> None:
    paths = argv[1:]
    if not paths:
        raise usage_error("give one or more sweep or run directories, e.g. "
                          "gpt-jax compare runs/position")
    if not 0 <= FLAGS.smoothing < 1:
        raise usage_error(f"--smoothing={FLAGS.smoothing} must be in [0, 1)")
    if FLAGS.target_loss is not None and not (math.isfinite(FLAGS.target_loss)
                                              and FLAGS.target_loss >= 0):
        raise usage_error(f"--target_loss={FLAGS.target_loss} must be a finite number >= 0")
    # Imported here, not at the top: flag parsing and --help stay fast.
    from gpt_jax import report

    try:
        result = report.compare(paths, FLAGS.out, FLAGS.baseline, FLAGS.smoothing,
                                FLAGS.target_loss)
    except report.ReportError as e:
        raise CommandError(str(e)) from e
    for warning in result["warnings"]:
        print(f"warning: {warning}")
    for s in result["stats"]:
        print(f"{s.name:<24} n={s.n}  final eval loss {s.final_mean:.4f}"
              + (f" ± {s.final_std:.4f}" if s.final_std is not None else ""))
    print(f"time to eval loss {result['target']:.4f} ({result['target_source']}):")
    for t in result["time_to_target"]:
        steps = f"{statistics.fmean(t.steps):.1f} steps" if t.steps else "never"
        secs = f", {statistics.fmean(t.seconds):.1f} s" if t.seconds else ""
        print(f"{t.name:<24} {t.reached_text}  {steps}{secs}")
    print(f"wrote {result['report']} and {len(result['plots'])} plots")
