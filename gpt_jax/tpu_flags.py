"""libtpu / XLA flags for collective-compute overlap into a process's LIBTPU_INIT_ARGS.

The flags per TPU generation are in the hardware table (`gpt_jax.hardware`): the
`LIBTPU_INIT_ARGS` MaxText's scripts and benchmark recipes set for dense models. Every name
was checked against the libtpu jax 0.10.2 pins (0.0.42.1): libtpu aborts on an unknown flag
("ERROR: Unknown command line flag"), and a compile with all of them for v4, v5p, v5e and v6e
topologies succeeds (tests/test_aot_search.py keeps that check where libtpu is installed).

`launch/tpu.py train|supervise` puts them into the workers' environment and `gpt-jax aot`
compiles with them. A user's own LIBTPU_INIT_ARGS is appended after ours, so its flags win
(a flag it names is dropped from ours); `--no-xla-overlap-flags` (launcher), `--noxla_overlap_flags`
(aot) or GPT_JAX_XLA_OVERLAP_FLAGS=0 turn ours off.
"""

from __future__ import annotations

import os

from gpt_jax import hardware

ENV = "LIBTPU_INIT_ARGS"
OFF_ENV = "GPT_JAX_XLA_OVERLAP_FLAGS"  # "0": do not add ours

def generation(name: str) -> str:
    """'v5litepod-8', 'v5e-8', 'v5e:2x4', 'v5p-8', 'v4-32' -> v5e, v5e, v5e, v5p, v4."""
    return hardware.tpu(name).name


def overlap_flags(name: str) -> tuple[str, ...]:
    """Our flags for the generation of `name` (the hardware table's)."""
    return hardware.tpu(name).overlap_flags


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0].lstrip("-")


def enabled(default: bool = True) -> bool:
    return default and os.environ.get(OFF_ENV, "1") not in ("0", "false", "False")


def merge(gen: str, user: str = "", on: bool = True) -> str:
    """Our flags for `gen`, minus those `user` sets, then `user`'s (which so win)."""
    user = (user or "").strip()
    if not on:
        return user
    theirs = {_flag_name(f) for f in user.split()}
    ours = [f for f in overlap_flags(gen) if _flag_name(f) not in theirs]
    return " ".join(ours + ([user] if user else []))


def apply_to_environ(gen: str, on: bool = True) -> str:
    """Set LIBTPU_INIT_ARGS for this process (before libtpu initialises); returns its value."""
    ours = " ".join(overlap_flags(gen))
    current = os.environ.get(ENV, "")
    if on and enabled() and ours not in current:
        os.environ[ENV] = merge(gen, current)
    return os.environ.get(ENV, "")
