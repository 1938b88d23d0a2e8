"""`<workdir>/status.json`: whether `gpt-jax train` runs in a run directory, or how it ended.

    {"state": "running"}                                   set when training starts
    {"state": "finished", "step": 5000, "num_steps": 5000}
    {"state": "stopped", "step": 1234, "signal": "SIGTERM", "num_steps": 5000}
    {"state": "failed", "error": "gpt-jax train: ..."}     the one-line error

Written by process 0 only, atomically (gs:// included), each record with the writer's `time`.
launch/supervisor.py decides from this record, not from exit codes: `gpt-jax train` exits 0
both when it finishes and when it saves and stops on SIGTERM.
"""

from __future__ import annotations

import time

import jax
from absl import logging

from gpt_jax.data.files import atomic_write_json, read_json

FILENAME = "status.json"
STATES = ("running", "finished", "stopped", "failed")


def path(workdir: str) -> str:
    return f"{str(workdir).rstrip('/')}/{FILENAME}"


def write(workdir: str, state: str, **fields) -> None:
    """Record `state` (one of STATES) on process 0; a failed write is logged, never raised."""
    if state not in STATES:
        raise ValueError(f"run status {state!r} is not one of {STATES}")
    if jax.process_index() != 0:
        return
    record = {"state": state, "time": round(time.time(), 3), **fields}
    try:
        atomic_write_json(path(workdir), record)
    except Exception as e:  # noqa: BLE001 - the run's own outcome matters more than this file
        logging.warning("could not write %s: %s", path(workdir), e)


def ended(workdir: str, num_steps: int, signal: str | None, stopped_at: int | None) -> None:
    """A training call returned: stopped at a step by a signal, or finished (a signal at the
    last step still leaves a finished run)."""
    if signal is not None and stopped_at is not None and stopped_at < num_steps:
        write(workdir, "stopped", step=stopped_at, signal=signal, num_steps=num_steps)
    else:
        write(workdir, "finished", step=num_steps, num_steps=num_steps)


def failed(workdir: str, error: BaseException | str) -> None:
    text = error if isinstance(error, str) else (str(error) or type(error).__name__)
    write(workdir, "failed", error=" ".join(text.split()))  # one line


def read(workdir: str) -> dict | None:
    return read_json(path(workdir))
