"""`gpt-jax aot --topology=v5e-8 [--preset=124M] [--flags]`: compile for a TPU slice on a CPU host.

Compiles the exact sharded train step (and a cached decode step) of a config for the named
slice and prints per-chip memory against HBM (fits / does not fit, by how much), XLA's FLOPs
and estimated step time, and the projected MFU; the record is also printed as one JSON line.
Needs libtpu (`pip install 'libtpu==0.0.42.*'`); no TPU is touched.
"""

from __future__ import annotations

import os
import sys

from absl import flags

from gpt_jax.commands.common import (CommandError, define_config_flag, print_record,
                                     usage_error)
from gpt_jax.config import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES

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
flags.DEFINE_string("json_out", "", "Also append the JSON record to this file.")
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

    if not FLAGS.topology:
        raise usage_error(f"--topology is required; one of: {', '.join(aot.SLICES)}")
    try:
        aot.get_slice(FLAGS.topology)
        config = aot.resolve_preset(FLAGS.preset) if FLAGS.preset else FLAGS.config
        config = aot.apply_overrides(config, batch_size=FLAGS.batch_size,
                                     attention_impl=FLAGS.attention_impl,
                                     remat_policy=FLAGS.remat_policy,
                                     scan_layers=FLAGS.scan_layers, dtype=FLAGS.dtype,
                                     mesh=_mesh_flag(FLAGS.mesh))
        record = aot.project(config, FLAGS.topology, decode=FLAGS.decode,
                             decode_batch_size=FLAGS.decode_batch_size)
    except aot.AotError as e:
        raise CommandError(str(e)) from e
    record["command"] = "gpt-jax " + " ".join(sys.argv[1:])
    print(aot.format_report(record), file=sys.stderr)
    print_record(record, FLAGS.json_out)
