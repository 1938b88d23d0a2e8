"""A weighted mixture of token stores (`data.store=PATH=W,PATH=W,...`), batch(step) = f(seed, step).

Source i has taken N_i(s) of the first s * B samples: floor(s * B * w_i) for every source but the
heaviest, which takes the rest. So step s gives source i exactly N_i(s + 1) - N_i(s) rows, its
own samples N_i(s), N_i(s) + 1, ... (each source runs through its own epochs as `TokenDataset`
does), the long-run share is w_i exactly, and nothing depends on earlier steps: any process
layout and any restart see the same rows. The rows are then shuffled by (seed, step).
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from gpt_jax.data.files import store_paths
from gpt_jax.data.loader import Dataset, HostBatches, TokenDataset, process_rows
from gpt_jax.data.sft import SFTDataset
from gpt_jax.data.store import Store, open_store
from gpt_jax.data.tokenizer_base import Tokenizer
from gpt_jax.errors import DataError

_MIX_SALT = 0x6D697800


class MixtureDataset(HostBatches):
    """The same split of several stores, mixed by weight."""

    def __init__(self, stores: list[tuple[Store, float]], tok: Tokenizer, split: str = "train"):
        self.weights = np.array([w for _, w in stores])
        self.parts = [TokenDataset(store, tok, split) for store, _ in stores]
        self.names = [p.store.name for p in self.parts]
        if len(set(self.names)) != len(self.names):
            self.names = [f"{i}_{n}" for i, n in enumerate(self.names)]
        self.heaviest = int(np.argmax(self.weights))
        self.tokenizer = tok
        self.name = "+".join(p.name for p in self.parts)
        self.fingerprint = ",".join(f"{p.fingerprint}={w:.6g}"
                                    for p, w in zip(self.parts, self.weights))

    @property
    def num_tokens(self) -> int:
        return sum(p.num_tokens for p in self.parts)

    @property
    def bytes_per_token(self) -> float | None:
        values = [p.bytes_per_token for p in self.parts]
        return None if None in values else float(np.dot(self.weights, values))

    def num_windows(self, seq_len: int) -> int:
        return min(p.num_windows(seq_len) for p in self.parts)

    def taken(self, samples: int) -> np.ndarray:
        """N_i: how many of the first `samples` samples each source has given."""
        counts = np.floor(samples * self.weights + 1e-9).astype(np.int64)
        counts[self.heaviest] = samples - (counts.sum() - counts[self.heaviest])
        return counts

    def check_batch(self, batch_size: int) -> None:
        """Every step gives the heaviest store N(s+1) - N(s) >= B * w_max - (k - 1) rows: that
        must not be negative for any step, so B * w_max >= k - 1."""
        k, heaviest = len(self.parts), float(self.weights[self.heaviest])
        if batch_size * heaviest + 1e-9 < k - 1:
            raise DataError(f"global_batch_size={batch_size} is too small for a mixture of {k} "
                            f"stores whose largest weight is {heaviest:.3g}: use at least "
                            f"{int(np.ceil((k - 1) / heaviest))}")

    def rows(self, step: int, batch_size: int, seq_len: int, lo: int, hi: int,
             seed: int) -> dict[str, np.ndarray]:
        self.check_batch(batch_size)
        first, last = self.taken(step * batch_size), self.taken((step + 1) * batch_size)
        source_B = np.repeat(np.arange(len(self.parts)), last - first)
        sample_B = np.concatenate([np.arange(a, b) for a, b in zip(first, last)])
        order_B = np.random.default_rng([_MIX_SALT, seed, step]).permutation(batch_size)
        source_B, sample_B = source_B[order_B][lo:hi], sample_B[order_B][lo:hi]
        out = {"inputs": np.empty((hi - lo, seq_len), np.int32),
               "targets": np.empty((hi - lo, seq_len), np.int32)}
        for i, part in enumerate(self.parts):
            mine = source_B == i
            if mine.any():
                got = part.gather(part.sample_starts(sample_B[mine], seq_len, seed), seq_len)
                for k in out:
                    out[k][mine] = got[k]
        return out

    def tokens_seen(self, steps: int, batch_size: int, seq_len: int) -> dict[str, int]:
        """Training tokens each source has given after `steps` steps (for metrics)."""
        counts = self.taken(steps * batch_size) * seq_len
        return {f"tokens_{name}": int(c) for name, c in zip(self.names, counts)}

    def eval_batches(self, num_batches: int | None, batch_size: int, seq_len: int,
                     process_index: int = 0, process_count: int = 1
                     ) -> Iterator[dict[str, np.ndarray]]:
        """Each source's first validation windows, mixed in the same shares every batch."""
        per = self.taken(batch_size)
        streams = [p.eval_batches(num_batches, int(n), seq_len) for p, n in zip(self.parts, per)
                   if n]
        lo, hi = process_rows(batch_size, process_index, process_count)
        for parts in zip(*streams):
            yield {k: np.concatenate([b[k] for b in parts])[lo:hi] for k in parts[0]}


def open_dataset(spec: str, tok: Tokenizer, split: str, block_size: int) -> Dataset:
    """One split of the store(s) `spec` names (data.store: PATH or PATH=W,PATH=W,...): its
    documents as windows, a weighted mixture, or SFT examples cut to `block_size`."""
    entries = [(open_store(path, tok), weight) for path, weight in store_paths(spec)]
    if len(entries) > 1:
        if any(store.kind == "sft" for store, _ in entries):
            raise DataError(f"data.store={spec!r} mixes an SFT store with others; a mixture "
                            "holds documents only")
        return MixtureDataset(entries, tok, split)
    store = entries[0][0]
    if store.kind == "sft":
        return SFTDataset(store, tok, split, block_size)
    return TokenDataset(store, tok, split)
