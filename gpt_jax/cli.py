"""`gpt-jax <command> [--flags]`: finds the command's module, which defines its own flags."""

from __future__ import annotations

import importlib
import importlib.util
import sys

# name -> (module under gpt_jax.commands, one-line description)
COMMANDS = {
    "train": ("train", "train (or resume, or fine-tune) a GPT into a run directory"),
    "eval": ("evaluate", "validation loss / perplexity of a run's checkpoint"),
    "sample": ("sample", "generate text from a run directory"),
    "bench": ("bench", "benchmarks: bench train | sample | data"),
    "aot": ("aot", "compile a config's train/decode step for a TPU topology on this host"),
    "sweep": ("sweep", "run every (variant, seed) of an ablation file"),
    "compare": ("compare", "report.md + plots comparing run directories"),
    "convert": ("convert", "convert Hugging Face GPT-2 checkpoints to/from a run directory"),
}


def available() -> dict[str, str]:
    return {name: desc for name, (mod, desc) in COMMANDS.items()
            if importlib.util.find_spec(f"gpt_jax.commands.{mod}") is not None}


def usage() -> str:
    lines = ["usage: gpt-jax <command> [--flags]   (gpt-jax <command> --help for its flags)", "",
             "commands:"]
    lines += [f"  {name:<9} {desc}" for name, desc in available().items()]
    return "\n".join(lines)


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
        print(usage())
        sys.exit(0)
    name = argv[1]
    if name not in available():
        print(f"gpt-jax: unknown command {name!r}; one of: {', '.join(available())}",
              file=sys.stderr)
        sys.exit(2)
    # These imports wait until a command is chosen: `gpt-jax --help` starts instantly.
    from gpt_jax.host_memory import keep_freed_memory

    keep_freed_memory()  # before XLA allocates: see gpt_jax/host_memory.py
    module = importlib.import_module(f"gpt_jax.commands.{COMMANDS[name][0]}")
    if hasattr(module, "define_flags_for"):  # e.g. bench: the kind's module defines the flags
        module.define_flags_for(argv[2:])
    from absl import app

    from gpt_jax.commands.common import quiet_logging

    def main(args: list[str]) -> None:
        quiet_logging()
        module.main(args)

    app.run(main, argv=[f"gpt-jax {name}"] + argv[2:])


if __name__ == "__main__":
    run()
