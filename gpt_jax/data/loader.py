"""Packed fixed-length windows over a token store; batch(step) is a pure function of (seed, step).

Training windows: an epoch has W = (N - 1) // T windows of T + 1 tokens that overlap by one token
(inputs = window[:-1], targets = window[1:]), so every token of the covered range is an input
exactly once per epoch. Each epoch draws, from (seed, epoch) alone, a start offset in
[0, N - 1 - W*T] (so the tokens that do not fill a window differ between epochs) and an order of
its windows. Global row j of step s is sample k = s*B + j of that endless sequence; a process
computes only its own rows, so any process layout and any restart see the same global batch.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator, Protocol

import numpy as np
from absl import logging

from gpt_jax.axes import LogicalRules
from gpt_jax.data.store import Store
from gpt_jax.data.tokenizer_base import Tokenizer
from gpt_jax.errors import DataError

_SEED_SALT = 0x67707400  # separates the data stream from other users of the same seed


class Dataset(Protocol):
    """What the loader, the loop and evaluation read from one split of a run's data."""
    name: str
    tokenizer: Tokenizer
    fingerprint: str  # which tokens (the store's build), so a resume can tell another corpus

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes of text per token, for bits per byte (None: not text documents)."""

    def num_windows(self, seq_len: int) -> int:
        """Rows of seq_len + 1 tokens one epoch holds; a DataError if there are none."""

    def rows(self, step: int, batch_size: int, seq_len: int, lo: int, hi: int,
             seed: int) -> dict[str, np.ndarray]:
        """Global rows [lo, hi) of training batch `step`: a pure function of its arguments."""

    def eval_batches(self, num_batches: int | None, batch_size: int, seq_len: int,
                     process_index: int = 0, process_count: int = 1
                     ) -> Iterator[dict[str, np.ndarray]]:
        """The fixed validation batches, this process's rows of each."""

    def tokens_seen(self, steps: int, batch_size: int, seq_len: int) -> dict[str, int]:
        """Training tokens per source after `steps` steps, for metrics ({}: one source)."""


class HostBatches:
    """`host_batch` for any split that can produce global rows [lo, hi) of a step."""

    def rows(self, step: int, batch_size: int, seq_len: int, lo: int, hi: int,
             seed: int) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def host_batch(self, step: int, batch_size: int, seq_len: int, seed: int,
                   process_index: int = 0, process_count: int = 1) -> dict[str, np.ndarray]:
        """This process's contiguous block of the global batch of `step`."""
        lo, hi = process_rows(batch_size, process_index, process_count)
        return self.rows(step, batch_size, seq_len, lo, hi, seed)

    def tokens_seen(self, steps: int, batch_size: int, seq_len: int) -> dict[str, int]:
        return {}


class TokenDataset(HostBatches):
    """One split of a token store (documents: bos doc eos ...) as packed windows."""

    def __init__(self, store: Store, tok: Tokenizer, split: str = "train"):
        self.split = split  # a store names its splits train / validation, whatever the source
        self.tokenizer = tok
        self.store = store
        self.tokens = self.store.tokens(self.split)
        self.name = f"{self.store.manifest['corpus']}/{self.split}"
        self.fingerprint = self.store.manifest["build_key"]
        self._epochs: dict[tuple[int, int, int], tuple[int, np.ndarray]] = {}
        self._eval_clamp_noted = False

    @property
    def num_tokens(self) -> int:
        return len(self.tokens)

    @property
    def bytes_per_token(self) -> float | None:
        """UTF-8 bytes of text per stored token (BOS/EOS included), for bits-per-byte."""
        return self.store.bytes_per_token(self.split)

    def num_windows(self, seq_len: int) -> int:
        """How many non-overlapping (seq_len + 1)-token windows fit; an error if none."""
        windows = (self.num_tokens - 1) // seq_len if seq_len > 0 else 0
        if windows < 1:
            raise DataError(f"seq_len={seq_len} is too long for {self.name}, which has "
                            f"{self.num_tokens} tokens (need at least seq_len + 1)")
        return windows

    def _epoch(self, seed: int, epoch: int, seq_len: int) -> tuple[int, np.ndarray]:
        """(token offset, window order) of one epoch, from (seed, epoch) alone."""
        key = (seed, epoch, seq_len)
        if key not in self._epochs:
            windows = self.num_windows(seq_len)
            slack = self.num_tokens - 1 - windows * seq_len
            rng = np.random.default_rng([_SEED_SALT, seed, epoch])
            offset = int(rng.integers(0, slack + 1))
            if len(self._epochs) >= 2:
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[key] = (offset, rng.permutation(windows))
        return self._epochs[key]

    def sample_starts(self, samples: np.ndarray, seq_len: int, seed: int) -> np.ndarray:
        """Token index where each of the training samples `samples` (0, 1, ...) starts."""
        starts = np.empty(len(samples), np.int64)
        for epoch, rows, positions in epoch_slices(samples, self.num_windows(seq_len)):
            offset, order = self._epoch(seed, epoch, seq_len)
            starts[rows] = offset + order[positions] * seq_len
        return starts

    def window_starts(self, step: int, batch_size: int, seq_len: int, lo: int, hi: int,
                      seed: int) -> np.ndarray:
        """Token index where each of global rows [lo, hi) of batch `step` starts."""
        return self.sample_starts(step * batch_size + np.arange(lo, hi, dtype=np.int64),
                                  seq_len, seed)

    def gather(self, starts: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
        """inputs/targets [len(starts), seq_len] (int32) of the windows at `starts`."""
        windows_BW = self.tokens.windows(starts, seq_len + 1)
        return {"inputs": windows_BW[:, :-1], "targets": windows_BW[:, 1:]}

    def rows(self, step: int, batch_size: int, seq_len: int, lo: int, hi: int,
             seed: int) -> dict[str, np.ndarray]:
        """Global rows [lo, hi) of training batch `step`."""
        return self.gather(self.window_starts(step, batch_size, seq_len, lo, hi, seed), seq_len)

    def eval_batches(self, num_batches: int | None, batch_size: int, seq_len: int,
                     process_index: int = 0, process_count: int = 1
                     ) -> Iterator[dict[str, np.ndarray]]:
        """Sequential windows from the start of the split, the same in every run.

        `num_batches` None or <= 0: the whole split (the last batch wraps to the start to fill
        up). More batches than the split has windows for are cut to the full batches that fit
        (one notice per dataset), so no window counts twice.
        """
        windows = self.num_windows(seq_len)
        if not num_batches or num_batches <= 0:
            num_batches = -(-windows // batch_size)
        elif num_batches * batch_size > windows:
            fit = max(windows // batch_size, 1)
            if not self._eval_clamp_noted:
                self._eval_clamp_noted = True
                logging.warning("%s has %d windows of %d tokens: evaluating %d batches of %d rows "
                                "instead of the %d asked for", self.name, windows, seq_len, fit,
                                batch_size, num_batches)
            num_batches = fit
        lo, hi = process_rows(batch_size, process_index, process_count)
        for b in range(num_batches):
            ids = (b * batch_size + np.arange(lo, hi, dtype=np.int64)) % windows
            yield self.gather(ids * seq_len, seq_len)


def epoch_slices(samples: np.ndarray, windows: int
                 ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """(epoch, mask over `samples`, positions in that epoch) of each epoch `samples` touch.

    Sample s (row j of batch `step` is s = step * batch_size + j) is position s % windows of
    epoch s // windows.
    """
    epochs, positions = samples // windows, samples % windows
    for epoch in np.unique(epochs):
        rows = epochs == epoch
        yield int(epoch), rows, positions[rows]


def process_rows(batch_size: int, process_index: int, process_count: int) -> tuple[int, int]:
    """[lo, hi) of the global rows that process `process_index` of `process_count` holds."""
    if not 0 <= process_index < process_count:
        raise DataError(f"process_index={process_index} is not in [0, {process_count})")
    if batch_size % process_count:
        raise DataError(f"batch_size={batch_size} is not divisible by the "
                        f"{process_count} processes")
    per = batch_size // process_count
    return process_index * per, (process_index + 1) * per


def sharding_rows(sharding, batch_size: int) -> tuple[int, int]:
    """[lo, hi) of the global rows that this process's devices hold under `sharding`."""
    spans = set()
    for index in sharding.addressable_devices_indices_map((batch_size, 1)).values():
        rows = index[0]
        spans.add((rows.start or 0, batch_size if rows.stop is None else rows.stop))
    lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
    covered = np.zeros(batch_size, bool)
    for s, e in spans:
        covered[s:e] = True
    if not covered[lo:hi].all():
        raise DataError(f"this process's devices hold a non-contiguous set of batch rows "
                        f"{sorted(spans)}; order the mesh so that each process's rows are "
                        "contiguous")
    return lo, hi


class BatchLoader:
    """Iterates (step, {inputs, targets}) as global jax.Arrays; a thread prefetches ahead.

    Each process builds only the rows its devices hold. `state()` is what a checkpoint needs to
    resume: a fresh loader with start_step=state()["step"] continues the same stream.
    """

    def __init__(self, dataset: Dataset, global_batch_size: int, seq_len: int, seed: int,
                 mesh, rules: LogicalRules, start_step: int = 0, prefetch: int = 2):
        # gpt_jax.data imports no JAX at module level: prepare's workers never load it.
        from gpt_jax.sharding import batch_sharding, batch_shards

        self.dataset, self.batch_size, self.seq_len = dataset, global_batch_size, seq_len
        self.seed, self.sharding = int(seed), batch_sharding(mesh, rules)
        shards = batch_shards(mesh, rules)
        if global_batch_size % shards:
            raise DataError(f"global_batch_size={global_batch_size} is not divisible by the "
                            f"data*fsdp={shards} devices it is split over")
        dataset.num_windows(seq_len)  # fail now, not in the thread
        self.lo, self.hi = sharding_rows(self.sharding, global_batch_size)
        self._next_step = self._produced = int(start_step)
        self._stop = threading.Event()
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
        self._thread = None
        if prefetch > 0:
            self._thread = threading.Thread(target=self._produce, name="BatchLoader",
                                            daemon=True)
            self._thread.start()

    def make_batch(self, step: int) -> dict:
        """The global batch of `step` as jax.Arrays sharded over the mesh."""
        import jax  # see __init__

        host = self.dataset.rows(step, self.batch_size, self.seq_len, self.lo, self.hi,
                                 self.seed)
        return {k: jax.make_array_from_process_local_data(
                    self.sharding, v, (self.batch_size,) + v.shape[1:]) for k, v in host.items()}

    def _produce(self) -> None:
        step = self._produced
        while not self._stop.is_set():
            try:
                item = (step, self.make_batch(step))
            except BaseException as e:  # handed to the consumer, raised there
                item = e
            while not self._stop.is_set():
                try:
                    self._queue.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item, BaseException):
                return
            step += 1

    def __iter__(self) -> "BatchLoader":
        return self

    def __next__(self) -> tuple[int, dict]:
        if self._thread is None:
            step, batch = self._next_step, self.make_batch(self._next_step)
        else:
            while True:
                try:
                    item = self._queue.get(timeout=1.0)
                    break
                except queue.Empty:
                    if not self._thread.is_alive():
                        raise StopIteration from None  # closed
            if isinstance(item, BaseException):
                raise item
            step, batch = item
        self._next_step = step + 1
        return step, batch

    def state(self) -> dict:
        """JSON-able; `step` is the step of the next batch this loader yields."""
        return {"step": self._next_step, "seed": self.seed,
                "global_batch_size": self.batch_size, "seq_len": self.seq_len,
                "data": getattr(self.dataset, "fingerprint", None)}

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    self._thread.join(timeout=0.1)
            self._thread = None

    def __enter__(self) -> "BatchLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
