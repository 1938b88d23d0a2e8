"""`gpt-jax bench {train,sample,serve,data,prepare,evals} [--flags]`: runs one benchmark module."""

from __future__ import annotations

import importlib
import importlib.util

from gpt_jax.bench import KINDS
from gpt_jax.commands.common import usage_error


def define_flags_for(args: list[str]) -> None:
    """Import the chosen kind's module first, so that absl knows its flags when parsing."""
    if args and args[0] in KINDS and importlib.util.find_spec(f"gpt_jax.bench.{args[0]}"):
        importlib.import_module(f"gpt_jax.bench.{args[0]}")


def main(argv: list[str]) -> None:
    kinds = [k for k in KINDS if importlib.util.find_spec(f"gpt_jax.bench.{k}") is not None]
    if len(argv) < 2 or argv[1] not in kinds:
        got = repr(argv[1]) if len(argv) > 1 else "nothing"
        raise usage_error(f"got {got}; expected one of: "
                          + "; ".join(f"{k} ({KINDS[k]})" for k in kinds))
    importlib.import_module(f"gpt_jax.bench.{argv[1]}").run(argv[1:])
