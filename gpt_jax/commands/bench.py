"""`gpt-jax bench {train,sample,data} [--flags]`: runs one benchmark module."""

from __future__ import annotations

import importlib
import importlib.util

from gpt_jax.bench import KINDS


def main(argv: list[str]) -> None:
    kinds = [k for k in KINDS if importlib.util.find_spec(f"gpt_jax.bench.{k}") is not None]
    if len(argv) < 2 or argv[1] not in kinds:
        got = repr(argv[1]) if len(argv) > 1 else "nothing"
        raise SystemExit(f"gpt-jax bench: got {got}; expected one of: "
                         + "; ".join(f"{k} ({KINDS[k]})" for k in kinds))
    importlib.import_module(f"gpt_jax.bench.{argv[1]}").run(argv[1:])
