"""The errors a user can fix, in one place; `gpt-jax` reports each as one line.

Every module raises a subclass of `UserError` for a problem with the user's input, files or
machine: the CLI prints `gpt-jax <command>: <message>` and exits with `exit_code` (2 for usage
and config mistakes, 1 otherwise). Anything else is a bug and keeps its traceback. Each class
also derives from the builtin a caller would catch (`ValueError`, `FileNotFoundError`, ...).
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix; the message names the bad value and what is allowed."""
    exit_code = 1


class UsageError(UserError):
    """A bad flag, argument or config value (exit status 2)."""
    exit_code = 2


class CommandError(UserError):
    """A command's own check; `exit_code` as given (1 unless it is a usage error)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code


class ConfigError(UsageError, ValueError):
    """A config value that cannot work; the message names the field and what is allowed."""


class DataError(UserError, ValueError):
    """Bad data input: a corpus, store, tokenizer or task file."""


class DataFileNotFoundError(DataError, FileNotFoundError):
    """A path in the data config that does not exist."""


class CheckpointError(UserError, RuntimeError):
    """A run directory whose checkpoints cannot be used; the message says what to do."""


class NoCheckpointError(CheckpointError, FileNotFoundError):
    """A path that holds no checkpoint (or a run directory that holds none)."""


class ConfigMismatchError(CheckpointError):
    """The config asks for a different run than the run directory's checkpoints hold."""


class UnreadableCheckpointsError(CheckpointError):
    """Checkpoints exist but none of them reads back."""


class RunLockedError(UserError, RuntimeError):
    """Another live process trains in the run directory."""


class RunDirError(UserError, OSError):
    """A run directory that cannot be created or written."""


class DiskFullError(UserError, OSError):
    """A write of the run (a checkpoint, metrics, a store shard) ran out of space."""


class NonFiniteLossError(UserError, RuntimeError):
    """Training hit a NaN/inf loss or gradient (and the config says stop, not skip)."""


class SamplingError(UserError, ValueError):
    """A prompt or sampling argument that cannot be generated from."""


class OverloadedError(SamplingError):
    """The serving engine's waiting queue is full; retry later."""


class EvalError(UserError, ValueError):
    """A task or request that cannot be scored."""


class ConversionError(UserError, ValueError):
    """A checkpoint that cannot be converted to or from Hugging Face GPT-2."""


class AotError(UserError, ValueError):
    """A slice, preset or mesh that cannot be compiled for a TPU."""


class OutOfMemory(AotError):
    """XLA refused a step: it needs `need_bytes` per chip, more than the chip's HBM."""

    def __init__(self, message: str, need_bytes: float):
        super().__init__(message)
        self.need_bytes = need_bytes


class SweepError(UserError, ValueError):
    """An ablation file or member selection that cannot run."""


class ReportError(UserError, ValueError):
    """Run directories that cannot be compared."""


class LaunchError(UserError, ValueError):
    """Bad launcher input (TPU VMs, local multi-host)."""
