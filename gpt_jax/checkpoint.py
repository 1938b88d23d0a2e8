"""Orbax checkpoints of a run: save (async, keep-N), resume with fallback, params-only load.

Layout: `<workdir>/checkpoints/<step>/{params,opt_state,meta,config,tokenizer}`. `meta` holds
the step, the RNG and the data loader's state; `tokenizer` holds the tokenizer's files so that
one checkpoint directory is enough to sample from.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import errno
import logging as py_logging
import os
import shutil
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.sharding import SingleDeviceSharding

from gpt_jax import sharding as sharding_lib
from gpt_jax.errors import DiskFullError, NoCheckpointError, UnreadableCheckpointsError
from gpt_jax.model import ModelConfig, abstract_params
from gpt_jax.schema import Section, field

ITEMS = ("params", "opt_state", "meta", "config", "tokenizer")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Section):
    name = "checkpoint"
    every: int = field(250)
    keep: int = field(3)
    keep_period: int = field(0)  # >0: also keep every step divisible by this
    async_save: bool = field(True)

    def check(self) -> None:
        self.require(self.keep >= 1, f"checkpoint.keep={self.keep} must be >= 1")


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(workdir, "checkpoints")


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _manager(directory: str, options: ocp.CheckpointManagerOptions | None = None):
    return ocp.CheckpointManager(_absolute(directory), options=options, item_names=ITEMS)


class Checkpointer:
    """Saves a run's TrainState every N steps and restores the newest one that reads back."""

    def __init__(self, workdir: str, ckpt_config: CheckpointConfig):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_config.keep, keep_period=ckpt_config.keep_period or None,
            enable_async_checkpointing=ckpt_config.async_save, create=True)
        self.directory = checkpoint_dir(workdir)
        self.workdir = workdir
        self.manager = _manager(self.directory, options)
        self._writing: int | None = None  # the step of the newest save (async: maybe running)
        self._need = 0  # bytes of the params and optimizer state
        self._failed = False
        _quiet_disk_full_logs()

    def save(self, state: dict, data_state: dict, config: dict, force: bool = False) -> bool:
        """Save `state` (unless its step is saved already) with the loader's state and the
        run's config (a plain dict); async unless the config says otherwise. A full disk
        (now, or of an earlier async save) is a DiskFullError naming the last good step."""
        step = int(jax.device_get(state["step"]))
        if step in self.manager.all_steps():
            return False
        self._need = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
            (state["params"], state["opt_state"])) if hasattr(x, "dtype"))
        with self._disk_full_is_one_line(step):
            saved = self._save(step, state, data_state, config, force)
        self._writing = step
        return saved

    def _save(self, step: int, state: dict, data_state: dict, config: dict,
              force: bool) -> bool:
        meta = {"step": step, "rng": np.asarray(jax.device_get(state["rng"])).tolist(),
                "data": data_state}
        args = ocp.args.Composite(
            params=ocp.args.StandardSave(state["params"]),
            opt_state=ocp.args.StandardSave(state["opt_state"]),
            meta=ocp.args.JsonSave(meta),
            config=ocp.args.JsonSave(config),
            tokenizer=ocp.args.JsonSave(_read_tokenizer_files(self.workdir)))
        return self.manager.save(step, args=args, force=force)

    def restore_latest(self, abstract_state: dict) -> tuple[dict, dict] | None:
        """(state, meta) of the newest readable checkpoint, None if there is none at all.

        An unreadable newest checkpoint (cut off mid-write, corrupted) is skipped with a
        warning; if checkpoints exist but none reads back, this raises rather than let the
        run silently start again from scratch.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        errors = []
        _drop_abandoned_read_errors(_absolute(self.directory))  # before a read can fail
        for i, step in enumerate(steps):
            try:
                return self._restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 -- any unreadable checkpoint falls back
                then = f"trying step {steps[i + 1]}" if i + 1 < len(steps) else "none is left"
                logging.warning("checkpoint %d in %s is unreadable (%s); %s", step,
                                self.directory, _short(e), then)
                errors.append(f"step {step}: {type(e).__name__}")
                _drop_unawaited_reads()
        if steps:
            raise UnreadableCheckpointsError(
                f"no checkpoint in {self.directory} could be restored ({'; '.join(errors)}); "
                "move them away to start from scratch")
        return None

    def _restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        restored = self.manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(abstract_state["params"]),
            opt_state=ocp.args.StandardRestore(abstract_state["opt_state"]),
            meta=ocp.args.JsonRestore()))
        meta = restored["meta"]
        rng = jax.device_put(np.asarray(meta["rng"], np.uint32),
                             abstract_state["rng"].sharding)
        step_arr = jax.device_put(np.int32(meta["step"]), abstract_state["step"].sharding)
        state = {"step": step_arr, "params": restored["params"],
                 "opt_state": restored["opt_state"], "rng": rng}
        return state, meta

    def wait(self) -> None:
        with self._disk_full_is_one_line():
            self.manager.wait_until_finished()

    def close(self) -> None:
        try:
            if not self._failed:  # a full disk is reported once
                self.wait()
        finally:
            self.manager.close()

    @contextlib.contextmanager
    def _disk_full_is_one_line(self, step: int | None = None):
        """A full disk in the body is one DiskFullError: the save that failed is the earlier
        async one (still writing) if it left a partial directory, else `step`'s."""
        candidates = [s for s in (self._writing, step) if s is not None]
        try:
            yield
        except Exception as e:
            if not is_disk_full(e):
                raise
            with contextlib.suppress(Exception):  # the save's other threads stop writing first
                self.manager.wait_until_finished()
            removed = {s: _remove_partial(_absolute(self.directory), s) for s in candidates}
            failed = next((s for s in candidates if removed[s]), candidates[-1] if candidates
                          else None)
            self._failed = True
            raise DiskFullError(self._disk_full_message(failed, removed.get(failed))) from e

    def _disk_full_message(self, step: int | None, removed: str | None) -> str:
        with contextlib.suppress(Exception):
            self.manager.reload()
        good = [s for s in self.manager.all_steps() if s != step]
        free = _free_bytes(self.directory)
        free_text = _size(free) if free is not None else "unknown"
        return (f"the disk is full (or a quota or file-size limit was hit): writing checkpoint "
                f"{step if step is not None else '?'} to {self.directory} failed ({free_text} "
                f"free; a checkpoint of this run needs about {_size(self._need)})"
                + (f"; removed the partial {removed}" if removed else "")
                + (f"; the last good checkpoint is step {max(good)}" if good
                   else "; no checkpoint of this run is complete")
                + "; free space and rerun the same command to resume")


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
DISK_FULL_TEXTS = ("No space left on device", "Disk quota exceeded", "File too large",
                   "RESOURCE_EXHAUSTED: Error writing", "os_error_code='28'",
                   "os_error_code='27'", "os_error_code='122'")


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (or what it wraps: Orbax wraps TensorStore's) is a full disk or quota."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in DISK_FULL_ERRNOS:
            return True
        if any(text in str(error) for text in DISK_FULL_TEXTS):
            return True
        error = error.__cause__ or error.__context__
    return False


class _DiskFullFilter(py_logging.Filter):
    """Orbax's save threads log a traceback each for one full disk (six for one save); the
    DiskFullError the run raises says it once."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        return not any(t in text for t in DISK_FULL_TEXTS)


def _quiet_disk_full_logs() -> None:
    logger = py_logging.getLogger("absl")
    if not any(isinstance(f, _DiskFullFilter) for f in logger.filters):
        logger.addFilter(_DiskFullFilter())


def _remove_partial(directory: str, step: int | None) -> str:
    """Remove the temporary directory a failed save of `step` left; its name, or ''."""
    if step is None or "://" in directory or not os.path.isdir(directory):
        return ""
    for name in os.listdir(directory):
        if name.startswith(f"{step}.") and "tmp" in name:
            path, deadline = os.path.join(directory, name), time.monotonic() + 10
            while True:  # a write of the failed save still in flight can create it again
                shutil.rmtree(path, ignore_errors=True)
                time.sleep(0.2)
                if not os.path.exists(path) or time.monotonic() > deadline:
                    return path
    return ""


def _free_bytes(directory: str) -> int | None:
    if "://" in directory:
        return None
    try:
        return shutil.disk_usage(_absolute(directory)).free
    except OSError:
        return None


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _short(error: BaseException, limit: int = 160) -> str:
    """`Type: first line` of the error's root cause (Orbax wraps TensorStore's), cut to `limit`."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[:limit - 3] + "..."


_dropping: set[str] = set()  # checkpoint directories whose abandoned reads are silenced


def _drop_abandoned_read_errors(directory: str) -> None:
    """Keep a failed restore's stray reads from printing tracebacks later.

    When one array of a checkpoint fails to read, Orbax gives up and closes its event loop while
    TensorStore still finishes the other reads; their callbacks then raise "Event loop is
    closed" (printed as tracebacks, one per read) and their coroutines are discarded with the
    original error, or logged by asyncio as never retrieved (naming a file under `directory`).
    These are dropped here, for this process; every other error still prints.
    """
    first = not _dropping
    _dropping.add(directory)
    if not first:
        return
    excepthook, unraisablehook = sys.excepthook, sys.unraisablehook

    def stray(error: BaseException | None, obj: object = None) -> bool:
        closed = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
        return closed or "_read_array_index" in getattr(obj, "__qualname__", "")

    def on_exception(kind, error, tb):
        if not stray(error):
            excepthook(kind, error, tb)

    def on_unraisable(unraisable):
        if not stray(unraisable.exc_value, unraisable.object):
            unraisablehook(unraisable)

    sys.excepthook, sys.unraisablehook = on_exception, on_unraisable
    py_logging.getLogger("asyncio").addFilter(_StrayReadFilter())


def _drop_unawaited_reads() -> None:
    """After a restore failed: the reads Orbax had queued but never started are dropped too.

    Their coroutines are collected unawaited, and Python warns of each ("coroutine
    'Store._get_array_metadatas' was never awaited"); which ones, and whether any, depends on
    timing. Only training restores this way, and it awaits no coroutine of this project, so from
    here on in this process such a warning is a stray of the abandoned read.
    """
    warnings.filterwarnings("ignore", message=r"coroutine '[\w.<>]+' was never awaited",
                            category=RuntimeWarning)


class _StrayReadFilter(py_logging.Filter):
    """asyncio's "Task/Future exception was never retrieved" for an abandoned checkpoint read."""

    def filter(self, record: py_logging.LogRecord) -> bool:
        text = record.getMessage()
        return not ("exception was never retrieved" in text
                    and any(directory in text for directory in _dropping))


def saved_config(workdir: str) -> tuple[int, dict] | None:
    """(step, config dict) of the newest checkpoint in `workdir` whose config reads back."""
    directory = epath.Path(_absolute(checkpoint_dir(workdir)))
    if not directory.is_dir():
        return None
    for step in sorted(ocp.utils.checkpoint_steps(directory), reverse=True):
        try:
            return step, load_config(str(directory / str(step)))
        except Exception:  # noqa: BLE001 -- an unreadable checkpoint: the restore falls back
            continue
    return None


def _read_tokenizer_files(workdir: str) -> dict:
    folder = epath.Path(workdir, "tokenizer")
    if not folder.is_dir():
        return {}
    return {file.name: base64.b64encode(file.read_bytes()).decode()
            for file in sorted(folder.iterdir()) if file.is_file()}


def _resolve(path: str) -> tuple[str, int]:
    """(checkpoints directory, step) for a run directory, its checkpoints/ or one step's dir."""
    path = epath.Path(_absolute(str(path)))
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if path.name.isdigit() and (path / "params").is_dir():
        return str(path.parent), int(path.name)
    if not path.is_dir():
        raise NoCheckpointError(f"{path} does not exist; expected a run directory or a "
                                "checkpoint directory")
    steps = ocp.utils.checkpoint_steps(path)
    if not steps:
        raise NoCheckpointError(f"no checkpoint found in {path}; train one with "
                                "`gpt-jax train --workdir=...` first")
    return str(path), max(steps)


def load_config(path: str) -> dict:
    """The config saved with a checkpoint (run dir, checkpoints/ or a step dir), as written."""
    directory, step = _resolve(path)
    return _manager(directory).restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]


def restore_tokenizer_files(path: str, dest: str) -> str:
    """Write the tokenizer files stored in a checkpoint into `dest`; returns `dest`."""
    directory, step = _resolve(path)
    files = _manager(directory).restore(step, args=ocp.args.Composite(
        tokenizer=ocp.args.JsonRestore()))["tokenizer"]
    epath.Path(dest).mkdir(parents=True, exist_ok=True)
    for name, data in (files or {}).items():
        epath.Path(dest, name).write_bytes(base64.b64decode(data))
    return dest


def load_params(path: str, shardings: Any = None, mesh=None, rules=None) -> tuple[dict, Any]:
    """(config dict, params) from a run directory or checkpoint, for inference or fine-tuning.

    Params land on `shardings` if given, else sharded for `mesh` by `rules` (default: the
    saved config's), else on the first device; the mesh may differ from the one the run was
    trained on.
    """
    directory, step = _resolve(path)
    config = load_config(os.path.join(directory, str(step)))
    model_cfg = ModelConfig.from_dict(config["model"], strict=False)
    shapes = abstract_params(model_cfg)
    if shardings is None and mesh is None:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.devices()[0]), shapes)
    elif shardings is None:
        rules = rules or sharding_lib.MeshConfig.from_dict(config["mesh"], strict=False).rules
        shardings = sharding_lib.param_shardings(model_cfg, mesh, rules)
    abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                            shapes, shardings)
    params = _manager(directory).restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract)))["params"]
    return config, params
