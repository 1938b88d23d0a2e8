"""Flags and start-up steps that several commands share."""

from __future__ import annotations

import glob
import json
import os
import sys

from absl import flags, logging
from ml_collections import config_flags

from gpt_jax.errors import CommandError
from gpt_jax.presets import preset_path


def usage_error(message: str) -> CommandError:
    return CommandError(message, exit_code=2)


def define_config_flag(default_preset: str = "default") -> None:
    """--config=path/to/config.py (default: the shipped preset), overridable per field."""
    config_flags.DEFINE_config_file("config", preset_path(default_preset),
                                    "A config file with get_config(); override fields with "
                                    "--config.section.field=value.", lock_config=True)


def config_with_overrides(path: str, argv: list[str]):
    """The config of file `path` with the `--config.section.field=value` arguments of `argv`
    applied (typed as the field, as --config parses them), e.g. for a --preset."""
    values = flags.FlagValues()
    saved, sys.argv = sys.argv, ["gpt-jax", f"--config={path}",
                                 *(a for a in argv if a.startswith("--config."))]
    try:  # ml_collections reads the overrides from sys.argv, also when a default is given,
        # so none is: a default would define them once more when --config is parsed
        config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True)
        values(sys.argv)
        return values.config
    finally:
        sys.argv = saved


def explicit_fields(argv: list[str]) -> frozenset[str]:
    """The "section.field" names that `--config.section.field=value` arguments set."""
    return frozenset(a[len("--config."):].split("=", 1)[0] for a in argv
                     if a.startswith("--config."))


def define_distributed_flags() -> None:
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0, for multi-process runs off TPU VMs.")
    flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process runs).")
    flags.DEFINE_integer("process_id", None, "This process's index (multi-process runs).")


def init_distributed() -> None:
    """jax.distributed.initialize() before any device is touched.

    On TPU VMs it discovers the slice by itself; elsewhere it needs the explicit flags (or the
    GPT_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID environment variables).
    """
    f = flags.FLAGS
    start_distributed(f.coordinator_address, f.num_processes, f.process_id)


def start_distributed(address: str | None, num: int | None, pid: int | None) -> None:
    """`init_distributed` with the three settings given (None: from the environment)."""
    import jax  # here: every command imports this module, not every command needs JAX

    address = address or os.environ.get("GPT_JAX_COORDINATOR")
    num = num or int(os.environ.get("GPT_JAX_NUM_PROCESSES", "0")) or None
    pid = pid if pid is not None else os.environ.get("GPT_JAX_PROCESS_ID")
    if address:
        if num is None or pid is None:
            raise usage_error("--coordinator_address needs --num_processes and --process_id")
        pid = int(pid)
        if not 0 <= pid < num:
            raise usage_error(f"--process_id={pid} must be in [0, {num}) for --num_processes={num}")
        if jax.config.jax_platforms in (None, "", "cpu") or "cpu" in str(jax.config.jax_platforms):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(address, num_processes=num, process_id=pid)
    elif on_tpu_vm():
        jax.distributed.initialize()  # discovers the slice from the TPU VM's metadata


def on_tpu_vm() -> bool:
    """TPU chips attached (/dev/accel* on v4/v5p, /dev/vfio on v5e/v6e) or a TPU slice env."""
    if os.environ.get("JAX_PLATFORMS", "").strip() == "cpu":
        return False
    return bool(glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
                or os.environ.get("TPU_WORKER_HOSTNAMES")
                or os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def print_record(record: dict, json_out: str | None) -> None:
    """`record` as one JSON line on stdout, also appended to the file `json_out` if given."""
    line = json.dumps(record)
    print(line)
    if json_out:
        with open(json_out, "a") as f:
            f.write(line + "\n")


def quiet_logging() -> None:
    """Keep the console to our own lines: absl INFO from TFDS/Orbax only with --verbosity=0."""
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
