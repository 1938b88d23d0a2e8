"""`gpt-jax <command> [--flags]`: finds the command's module, which defines its own flags.

Every command runs inside one error boundary: an expected error (bad flag, config, data,
checkpoint, missing file) is one line `gpt-jax <command>: ...` on stderr and exit status 2
(usage) or 1 (runtime); `--verbose` or `GPT_JAX_DEBUG=1` shows its traceback instead.
Unexpected errors always show theirs. Everything beyond the standard library is imported
inside the functions that use it ("on use" below): `gpt-jax --help` loads neither absl nor JAX.
"""

from __future__ import annotations

import difflib
import errno
import importlib
import importlib.util
import os
import re
import sys
import textwrap
from typing import NoReturn

# name -> (module under gpt_jax.commands, one-line description)
COMMANDS = {
    "prepare": ("prepare", "tokenize a corpus into a sharded token store (local or gs://)"),
    "train": ("train", "train (or resume, or fine-tune) a GPT into a run directory"),
    "eval": ("evaluate", "validation loss / perplexity, or task accuracy (--tasks), of a run"),
    "sample": ("sample", "generate text from a run directory"),
    "serve": ("serve", "an OpenAI-compatible HTTP server over a run (continuous batching)"),
    "bench": ("bench", "benchmarks: bench train | sample | serve | data | prepare | evals"),
    "aot": ("aot", "compile a config's train/decode step for a TPU topology on this host"),
    "sweep": ("sweep", "run every (variant, seed) of an ablation file"),
    "compare": ("compare", "report.md + plots comparing run directories"),
    "convert": ("convert", "convert Hugging Face GPT-2 checkpoints to/from a run directory"),
}
HELP_ARGS = ("-h", "--help", "-help", "--helpshort")
CONFIG_HELP = ("--config.<section>.<field>=<value> overrides one field of the config file, "
               "e.g. --config.model.n_layer=6 --config.train.num_steps=200; every section, "
               "field and default is in gpt_jax/config.py (base_config), explained in the "
               "README's Configs section.")


def available() -> dict[str, str]:
    return {name: desc for name, (mod, desc) in COMMANDS.items()
            if importlib.util.find_spec(f"gpt_jax.commands.{mod}") is not None}


def usage() -> str:
    lines = ["usage: gpt-jax <command> [--flags]   (gpt-jax <command> --help for its flags)", "",
             "commands:"]
    lines += [f"  {name:<9} {desc}" for name, desc in available().items()]
    lines += ["", "every command: --verbose (or GPT_JAX_DEBUG=1) shows tracebacks of errors; "
              "--verbosity=0 shows library logs"]
    return "\n".join(lines)


def debug_wanted(args: list[str]) -> bool:
    return "--verbose" in args or os.environ.get("GPT_JAX_DEBUG", "") not in ("", "0")


def run(argv: list[str] | None = None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] in HELP_ARGS:
        print(usage())
        sys.exit(0)
    if argv[1] == "help":
        if len(argv) < 3:
            print(usage())
            sys.exit(0)
        argv = [argv[0], argv[2], "--help"]
    name = argv[1]
    if name not in available():
        fail("gpt-jax", f"unknown command {name!r}; one of: {', '.join(available())}", 2)
    args = argv[2:]
    verbose = debug_wanted(args)
    args = [a for a in args if a not in ("--verbose", "--noverbose")]
    saved_argv = sys.argv
    sys.argv = [argv[0], name] + args  # ml_collections reads --config.x=... overrides from here
    try:
        _run_command(name, args, verbose)
    finally:
        sys.argv = saved_argv


def _run_command(name: str, args: list[str], verbose: bool) -> None:
    prog = f"gpt-jax {name}"
    try:
        module = _load_command(name, args)
        if any(a in HELP_ARGS for a in args):
            print(command_help(name, module, args))
            sys.exit(0)
        # on use (see the module docstring)
        from gpt_jax.host_memory import keep_freed_memory

        keep_freed_memory()  # before XLA allocates: see gpt_jax/host_memory.py
        # on use (see the module docstring)
        from absl import app

        # on use (see the module docstring)
        from gpt_jax.commands.common import quiet_logging

        def main(rest: list[str]) -> None:
            quiet_logging()
            _check_config_loaded()
            module.main(rest)

        app.run(main, argv=[prog] + args, flags_parser=_parse_flags)
    except SystemExit as e:
        if isinstance(e.code, str):  # a command's own one-line message
            fail(prog, e.code, 1)
        raise
    except Exception as e:
        code = expected_exit_code(e)
        if code is None or verbose:
            raise
        fail(prog, one_line(e), code)


def _load_command(name: str, args: list[str]):
    # on use (see the module docstring)
    from gpt_jax.commands.common import usage_error

    try:  # a --config flag parses its default (and the overrides in argv) when it is defined
        module = importlib.import_module(f"gpt_jax.commands.{COMMANDS[name][0]}")
        if hasattr(module, "define_flags_for"):  # e.g. bench: the kind's module defines them
            module.define_flags_for(args)
    except (AttributeError, KeyError) as e:
        if not any(re.match(r"--?(no)?config\.", a) for a in args):
            raise
        raise usage_error(_unknown_field_message(args, e)) from e
    return module


def fail(prog: str, message: str, code: int) -> NoReturn:
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())
    prefix = f"{prog}: "
    if message.startswith(prefix):
        message = message[len(prefix):]
    print(prefix + message, file=sys.stderr)
    sys.exit(code)


def one_line(error: BaseException, limit: int = 600) -> str:
    """The error's message on one line (its lines joined), at most `limit` characters."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        where = error.filename or "a file"
        return (f"the disk is full: writing {where} failed ({os.strerror(error.errno)}); "
                "free space and rerun the same command (a run resumes from its last checkpoint)")
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    text = text or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def expected_exit_code(error: BaseException) -> int | None:
    """The exit status of an error a user can fix (2: usage, 1: the rest), None for a bug."""
    # on use (see the module docstring)
    from absl import flags

    # on use (see the module docstring)
    from gpt_jax.errors import UserError

    if isinstance(error, UserError):
        return error.exit_code
    if isinstance(error, flags.Error):
        return 2
    if isinstance(error, (FileNotFoundError, NotADirectoryError, IsADirectoryError,
                          PermissionError)):
        return 1
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return 1  # a full disk while writing any file of a run: see one_line
    return None


def _parse_flags(argv: list[str]) -> list[str]:
    """absl's parse, each problem one usage-error line (absl would print two and exit 1)."""
    # on use (see the module docstring)
    from absl import flags

    # on use (see the module docstring)
    from gpt_jax.commands.common import usage_error

    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        raise usage_error(_flag_message(str(e))) from e
    except (AttributeError, KeyError) as e:  # ml_collections: --config.<unknown field>=...
        raise usage_error(_unknown_field_message(argv, e)) from e


def _flag_message(text: str) -> str:
    text = text.strip().splitlines()[0]
    required = re.search(r"Flag --(\w+) must have a value other than None", text)
    if required:
        return f"--{required.group(1)} is required (see --help)"
    unknown = re.match(r"Unknown command line flag '([^']+)'", text)
    if unknown:
        return f"unknown flag --{unknown.group(1)}; see --help for this command's flags"
    return text


def _unknown_field_message(argv: list[str], error: BaseException) -> str:
    """Name the --config.x.y override whose field does not exist, with the closest ones."""
    # on use (see the module docstring)
    from absl import flags

    # on use (see the module docstring)
    from gpt_jax import config as config_lib

    known = set(config_lib.flatten(config_lib.base_config().to_dict()))
    if "config" in flags.FLAGS:
        try:
            known |= set(config_lib.flatten(flags.FLAGS["config"].value.to_dict()))
        except Exception:  # noqa: BLE001 -- the config itself failed to load: base fields only
            pass
    for arg in argv:
        match = re.match(r"--?(?:no)?config\.([\w.]+)", arg)
        if match and match.group(1) not in known:
            field = match.group(1)
            close = difflib.get_close_matches(field, sorted(known), n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            return f"--config.{field}: no such config field{hint} (fields: gpt_jax/config.py)"
    return f"bad --config override: {one_line(error)}"


def _check_config_loaded() -> None:
    """ml_collections loads --config lazily; a missing or broken file is one usage error."""
    # on use (see the module docstring)
    from absl import flags

    # on use (see the module docstring)
    from gpt_jax.commands.common import usage_error

    if "config" not in flags.FLAGS or not hasattr(flags.FLAGS["config"], "config_filename"):
        return
    try:
        flags.FLAGS.config.get("model")
    except OSError as e:
        path = flags.FLAGS["config"].config_filename
        reason = "no such file" if not os.path.exists(path) else one_line(e)
        raise usage_error(f"--config={path}: {reason}; give a config file with get_config(), "
                         "e.g. configs/default.py") from e


def command_help(name: str, module, args: list[str]) -> str:
    """Usage line, one-line description, the module's notes and its own flags with defaults."""
    # on use (see the module docstring)
    from absl import flags

    kind = next((a for a in args if not a.startswith("-")), None)
    kind_module = sys.modules.get(f"gpt_jax.bench.{kind}") if name == "bench" and kind else None
    doc = ((kind_module or module).__doc__ or "").strip()
    first, _, rest = doc.partition("\n")
    example = re.match(r"`([^`]+)`", first)
    lines = [f"usage: {example.group(1) if example else f'gpt-jax {name} [--flags]'}", "",
             COMMANDS[name][1]]
    if rest.strip():
        lines += ["", rest.strip()]
    if name == "bench" and kind_module is None:
        # on use (see the module docstring)
        from gpt_jax.bench import KINDS

        lines += ["", "kinds (gpt-jax bench <kind> --help for its flags):"]
        lines += [f"  {k:<7} {desc}" for k, desc in KINDS.items()]
    owners = [f"gpt_jax.commands.{COMMANDS[name][0]}", "gpt_jax.commands.common"]
    if kind_module is not None:
        owners.append(kind_module.__name__)
    by_module = flags.FLAGS.flags_by_module_dict()
    own = sorted({f.name: f for m in owners for f in by_module.get(m, [])}.values(),
                 key=lambda f: f.name)
    lines += ["", "flags:"]
    for flag in own:
        lines.append(f"  --{flag.name}  ({_default_text(flag)})")
        lines.append(f"      {flag.help}")
    lines.append("  --verbose  (off)")
    lines.append("      Show the traceback of an error (also GPT_JAX_DEBUG=1).")
    if any(f.name == "config" for f in own):
        lines += ["", "config fields:"]
        lines += textwrap.wrap(CONFIG_HELP, 96, initial_indent="  ", subsequent_indent="  ")
    return "\n".join(lines)


def _default_text(flag) -> str:
    if flag.default is None:
        return "required" if _is_required(flag) else "default: unset"
    text = str(flag.default_as_str).strip("'") or "''"
    if flag.name == "config" and os.path.isabs(text):
        relative = os.path.relpath(text)
        text = text if relative.startswith("..") else relative
    return f"default: {text}"


def _is_required(flag) -> bool:
    return any("must have a value other than None" in str(getattr(v, "message", ""))
               for v in flag.validators)


if __name__ == "__main__":
    run()
