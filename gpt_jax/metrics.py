"""Metrics out of a run: metrics.jsonl, TensorBoard, a console progress bar, throughput and MFU."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import jax
from etils import epath
from tqdm import tqdm

from gpt_jax.hardware import peak_flops


def read_metrics(workdir: str) -> list[dict]:
    """Every event of metrics.jsonl; for a step logged twice (a resumed run), the last wins."""
    path = epath.Path(workdir, "metrics.jsonl")
    if not path.exists():
        return []
    events: dict[tuple, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            event = json.loads(line)
            events[(event.get("step"), tuple(sorted(event)))] = event
    return sorted(events.values(), key=lambda e: e.get("step", 0))


class MetricsWriter:
    """Writes on process 0 only; other processes get a writer that does nothing."""

    def __init__(self, workdir: str, total_steps: int, start_step: int, enabled: bool = True):
        self.enabled = enabled and jax.process_index() == 0
        self.total_steps = total_steps
        self._bar = None
        self._tb = None
        if not self.enabled:
            return
        epath.Path(workdir).mkdir(parents=True, exist_ok=True)
        self._jsonl = _AppendFile(epath.Path(workdir, "metrics.jsonl"))
        try:
            from tensorboardX import SummaryWriter  # optional: failing to load it is fine

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        except Exception as e:  # noqa: BLE001 -- TensorBoard is optional, metrics.jsonl is not
            print(f"TensorBoard off ({type(e).__name__}: {e}); metrics.jsonl still written")
            self._tb = None
        self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                         mininterval=1.0, smoothing=0.1, disable=None)

    def write(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        clean = {k: (float(v) if isinstance(v, (int, float)) or hasattr(v, "item") else v)
                 for k, v in metrics.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, float) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)
        shown = {k: clean[k] for k in ("loss", "eval_loss", "tokens_per_s", "mfu")
                 if k in clean and isinstance(clean[k], float)}
        if self._bar is not None and not self._bar.disable:
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        else:  # no terminal (a log file): one line per event, with the ETA
            eta = ""
            if "step_time_s" in clean:
                eta = f"  eta {_duration((self.total_steps - step) * clean['step_time_s'])}"
            print(f"step {step}/{self.total_steps}  "
                  + "  ".join(f"{k} {v:.4g}" for k, v in shown.items()) + eta, flush=True)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def message(self, text: str) -> None:
        """A console line that does not break the progress bar (process 0 only)."""
        if self.enabled:
            (self._bar.write if self._bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._jsonl.close()


class _AppendFile:
    """Line-buffered appends. An object store (gs://) cannot append, so there the file is
    uploaded whole, at most every UPLOAD_SECONDS (and on close): not once per line."""
    UPLOAD_SECONDS = 60.0

    def __init__(self, path: epath.Path):
        self.path = path
        self.remote = "://" in str(path)
        if self.remote:
            self._text = path.read_text() if path.exists() else ""
            self._uploaded, self._pending = time.monotonic(), False
        else:
            self._file = open(path, "a", buffering=1)

    def write(self, line: str) -> None:
        if self.remote:
            self._text += line
            self._pending = True
        else:
            self._file.write(line)

    def flush(self, force: bool = False) -> None:
        if not self.remote or not self._pending:
            return
        if force or time.monotonic() - self._uploaded >= self.UPLOAD_SECONDS:
            self.path.write_text(self._text)
            self._uploaded, self._pending = time.monotonic(), False

    def close(self) -> None:
        self.flush(force=True)
        if not self.remote:
            self._file.close()


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Throughput:
    """Tokens/s, step time and MFU over the steps since the last call."""

    def __init__(self, tokens_per_step: int, flops_per_token: float):
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        peak = peak_flops(jax.devices()[0].device_kind)
        self.peak_total = peak * jax.device_count() if peak else None
        self._t, self._steps, self._excluded = time.perf_counter(), 0, 0.0

    def tick(self, steps: int = 1) -> None:
        self._steps += steps

    @contextlib.contextmanager
    def excluded(self):
        """Time spent inside (compilation, eval, checkpointing) does not count as step time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._excluded += time.perf_counter() - start

    def read(self) -> dict:
        now = time.perf_counter()
        elapsed, steps = max(now - self._t - self._excluded, 1e-9), max(self._steps, 1)
        self._t, self._steps, self._excluded = now, 0, 0.0
        tokens_per_s = self.tokens_per_step * steps / elapsed
        out = {"step_time_s": elapsed / steps, "tokens_per_s": tokens_per_s}
        if self.peak_total:
            out["mfu"] = tokens_per_s * self.flops_per_token / self.peak_total
        return out
