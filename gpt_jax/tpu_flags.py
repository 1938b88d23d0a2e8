"""libtpu / XLA flags for collective-compute overlap, per TPU generation, in one place.

These are the `LIBTPU_INIT_ARGS` MaxText's scripts and benchmark recipes set for dense models
(async collective fusion: all-gathers and reduce-scatters of fsdp run under the matmuls;
the data-parallel all-reduce optimisation; async all-gather / collective-permute). Every name
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

ENV = "LIBTPU_INIT_ARGS"
OFF_ENV = "GPT_JAX_XLA_OVERLAP_FLAGS"  # "0": do not add ours

_COMMON = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_enable_async_collective_permute=true",
)
# generation -> flags. v6e: MaxText's dense-model scoped VMEM limit (96 MiB) as well.
OVERLAP_FLAGS: dict[str, tuple[str, ...]] = {
    "v4": _COMMON,
    "v5e": _COMMON,
    "v5p": _COMMON,
    "v6e": _COMMON + ("--xla_tpu_scoped_vmem_limit_kib=98304",),
}
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v5": "v5p"}


def generation(name: str) -> str:
    """'v5litepod-8', 'v5e-8', 'v5e:2x4', 'v5p-8', 'v4-32' -> v5e, v5e, v5e, v5p, v4."""
    gen = name.split("-")[0].split(":")[0].lower()
    gen = _ALIASES.get(gen, gen)
    if gen not in OVERLAP_FLAGS:
        raise ValueError(f"unknown TPU generation {name!r}; one of: {', '.join(OVERLAP_FLAGS)}")
    return gen


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
    ours = [f for f in OVERLAP_FLAGS[generation(gen)] if _flag_name(f) not in theirs]
    return " ".join(ours + ([user] if user else []))


def apply_to_environ(gen: str, on: bool = True) -> str:
    """Set LIBTPU_INIT_ARGS for this process (before libtpu initialises); returns its value."""
    ours = " ".join(OVERLAP_FLAGS[generation(gen)])
    current = os.environ.get(ENV, "")
    if on and enabled() and ours not in current:
        os.environ[ENV] = merge(gen, current)
    return os.environ.get(ENV, "")
