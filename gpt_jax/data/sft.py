"""Prompt/response pairs for supervised fine-tuning: the loss counts response tokens only.

`gpt-jax prepare` (or `train`, for a corpus it prepares itself) stores each JSONL line
`{"prompt": ..., "response": ...}` as `prompt ids + response ids + [eos]` with the prompt's
length (documents.py, prepare.py); the loss mask is 1 on the response and eos. Here the
examples of one split are cut to the model's context and packed whole, in a seeded order,
into rows of T + 1 tokens (padding fills the rest with mask 0); a row yields
`inputs = row[:-1]`, `targets = row[1:]` and `weights = mask[1:]`, so the target that starts
the next packed example (a prompt token) never counts. Training examples are packed in one
fixed shuffled order; batches follow the same `batch(step) = f(seed, step)` contract as
`TokenDataset`.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from gpt_jax.data.loader import HostBatches, epoch_slices, process_rows
from gpt_jax.data.store import Store
from gpt_jax.data.tokenizer_base import Tokenizer
from gpt_jax.errors import DataError

_SEED_SALT = 0x73667400
_PACKING_SEED = 0  # which examples share a row is fixed; train.seed orders the rows per epoch


class Example(NamedTuple):
    tokens: np.ndarray  # prompt + response + eos, cut to block_size + 1
    mask: np.ndarray  # 1.0 on the response and eos
    prompt: np.ndarray  # the prompt's ids
    response: np.ndarray  # the whole response's ids (no eos)
    truncated: bool  # the response did not fit the context
    where: str  # "file:line"


class SFTDataset(HostBatches):
    """One split of an SFT store, packed; rows of (seq_len + 1) tokens plus a mask."""
    bytes_per_token = None  # pairs, not documents: no bits per byte

    def __init__(self, store: Store, tok: Tokenizer, split: str, block_size: int):
        self.split, self.tokenizer, self.block_size = split, tok, int(block_size)
        self.store = store
        self.name = f"sft/{split}"
        self.fingerprint = store.manifest["build_key"]
        tokens, index, files = store.examples(split)
        if not len(index):
            raise DataError(f"the {split} split of the SFT store {store.path} has no pairs")
        ends = np.cumsum(index[:, 0])
        flat = tokens.to_numpy()
        self.examples = [self._cut(flat[end - n:end], int(p), f"{files[i]}:{line}")
                         for i, ((n, p, line), end) in enumerate(zip(index, ends))]
        self.num_truncated = sum(e.truncated for e in self.examples)
        self._packed: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _cut(self, ids: np.ndarray, prompt_len: int, where: str) -> Example:
        """One example cut to block_size + 1 tokens (the prompt must leave room)."""
        if prompt_len >= self.block_size:
            raise DataError(f"{where}: the prompt is {prompt_len} tokens but "
                            f"model.block_size={self.block_size} must leave room for the response")
        room = self.block_size + 1
        tokens = ids[:room].astype(np.int32)
        mask = np.zeros(len(tokens), np.float32)
        mask[prompt_len:] = 1.0
        return Example(tokens, mask, ids[:prompt_len].astype(np.int32),
                       ids[prompt_len:-1].astype(np.int32), len(ids) > room, where)

    @property
    def num_tokens(self) -> int:
        return int(sum(len(e.tokens) for e in self.examples))

    def answer_pairs(self, limit: int = 0) -> list[tuple[list[int], str]]:
        """(prompt ids, response text) of the first `limit` examples (0: all), for exact match."""
        chosen = self.examples[:limit] if limit else self.examples
        return [(e.prompt.tolist(), self.tokenizer.decode(e.response.tolist())) for e in chosen]

    def packed(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [R, seq_len + 1], mask [R, seq_len + 1]): whole examples packed greedily."""
        if seq_len not in self._packed:
            if seq_len > self.block_size:
                raise DataError(f"seq_len={seq_len} is longer than model.block_size="
                                f"{self.block_size} the examples were cut for")
            order = np.arange(len(self.examples))
            if self.split == "train":
                order = np.random.default_rng([_SEED_SALT, _PACKING_SEED]).permutation(order)
            width, rows, row, used = seq_len + 1, [], [], 0
            for i in order:
                n = len(self.examples[i].tokens)
                if used + n > width and row:
                    rows.append(row)
                    row, used = [], 0
                row.append(i)
                used += n
            rows.append(row)
            tokens = np.full((len(rows), width), self.tokenizer.pad_id, np.int32)
            mask = np.zeros((len(rows), width), np.float32)
            for r, members in enumerate(rows):
                pos = 0
                for i in members:
                    t, m = self.examples[i].tokens, self.examples[i].mask
                    n = min(len(t), width - pos)  # only when seq_len < block_size
                    tokens[r, pos:pos + n], mask[r, pos:pos + n] = t[:n], m[:n]
                    pos += n
            self._packed[seq_len] = (tokens, mask)
        return self._packed[seq_len]

    def num_windows(self, seq_len: int) -> int:
        return int(self.packed(seq_len)[0].shape[0])

    def gather(self, rows: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
        tokens, mask = self.packed(seq_len)
        t, m = tokens[rows], mask[rows]
        return {"inputs": t[:, :-1], "targets": t[:, 1:], "weights": m[:, 1:]}

    def rows(self, step: int, batch_size: int, seq_len: int, lo: int, hi: int,
             seed: int) -> dict[str, np.ndarray]:
        """Global rows [lo, hi) of training batch `step`: each epoch is a seeded row order."""
        windows = self.num_windows(seq_len)
        picked = np.empty(hi - lo, np.int64)
        samples = step * batch_size + np.arange(lo, hi, dtype=np.int64)
        for epoch, rows, positions in epoch_slices(samples, windows):
            order = np.random.default_rng([_SEED_SALT, seed, epoch]).permutation(windows)
            picked[rows] = order[positions]
        return self.gather(picked, seq_len)

    def eval_batches(self, num_batches: int | None, batch_size: int, seq_len: int,
                     process_index: int = 0, process_count: int = 1
                     ) -> Iterator[dict[str, np.ndarray]]:
        """Every held-out row once, in order; the last batch is filled with weight-0 repeats."""
        windows = self.num_windows(seq_len)
        needed = -(-windows // batch_size)
        num_batches = needed if not num_batches or num_batches <= 0 else min(num_batches, needed)
        lo, hi = process_rows(batch_size, process_index, process_count)
        for b in range(num_batches):
            ids = b * batch_size + np.arange(lo, hi, dtype=np.int64)
            batch = self.gather(ids % windows, seq_len)
            batch["weights"] = batch["weights"] * (ids < windows)[:, None]
            yield batch
