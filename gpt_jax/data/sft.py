"""Prompt/response pairs for supervised fine-tuning: the loss counts response tokens only.

Each JSONL line `{"prompt": ..., "response": ...}` becomes `prompt ids + response ids + [eos]`
with a mask that is 1 on the response and eos. Examples are packed whole, in a seeded order,
into rows of T + 1 tokens (padding fills the rest with mask 0); a row yields `inputs = row[:-1]`,
`targets = row[1:]` and `weights = mask[1:]`, so the target that starts the next packed
example (a prompt token) never counts. Batches follow the same `batch(step) = f(seed, step)`
contract as `TokenDataset`, so `BatchLoader` and the train loop use this dataset unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from gpt_jax.data.files import DataError, json_objects, unit_hash
from gpt_jax.data.loader import HostBatches, epoch_slices, process_rows
from gpt_jax.data.tokenizers import Tokenizer

_SEED_SALT = 0x73667400


@dataclasses.dataclass(frozen=True)
class Pair:
    prompt: str
    response: str
    where: str  # "file:N", for error messages


def read_jsonl(path: str, prompt_field: str = "prompt",
               response_field: str = "response") -> list[Pair]:
    """The pairs of one JSONL file; a bad line raises DataError naming the file and line."""
    pairs = []
    for where, obj in json_objects(path):
        for field in (prompt_field, response_field):
            if not isinstance(obj.get(field), str):
                problem = "has no" if field not in obj else "has a non-string"
                raise DataError(f"{where}: {problem} {field!r} field (needs {prompt_field!r} "
                                f"and {response_field!r} strings)")
        pairs.append(Pair(obj[prompt_field], obj[response_field], where))
    return pairs


def split_pairs(d, split: str) -> list[Pair]:
    """`split` ("train" / "validation") of the configured files: `data.sft_eval_paths` is the
    held-out set if given, else a `validation_fraction` of `data.paths` by hash of the prompt."""
    read = lambda spec: [p for path in spec.split(",") if path.strip()  # noqa: E731
                         for p in read_jsonl(path.strip(), d.prompt_field, d.response_field)]
    pairs = read(d.paths)
    if d.get("sft_eval_paths"):
        return pairs if split == "train" else read(d.sft_eval_paths)
    held_out = [unit_hash(p.prompt) < d.validation_fraction for p in pairs]
    return [p for p, h in zip(pairs, held_out) if h == (split == "validation")]


class SFTDataset(HostBatches):
    """One split of the pairs, tokenized and packed; rows of (seq_len + 1) tokens plus a mask."""

    def __init__(self, config, tok: Tokenizer, split: str = "train",
                 pairs: list[Pair] | None = None):
        d = config.data
        self.split = {"train": d.train_split, "validation": d.eval_split}.get(split, split)
        self.seed, self.tokenizer = int(config.train.seed), tok
        self.block_size = int(config.model.block_size)
        self.pairs = split_pairs(d, self.split) if pairs is None else pairs
        self.name = f"sft/{self.split}"
        if not self.pairs:
            raise DataError(f"the {self.split} split of data.paths={d.paths!r} has no pairs")
        self.examples = [self._encode(p) for p in self.pairs]
        self.num_truncated = sum(t for *_, t in self.examples)
        self._packed: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _encode(self, pair: Pair) -> tuple[np.ndarray, np.ndarray, bool]:
        """(tokens, response mask, truncated?) of one pair: prompt + response + eos."""
        prompt = list(self.tokenizer.encode(pair.prompt))
        if len(prompt) >= self.block_size:
            raise DataError(f"{pair.where}: the prompt is {len(prompt)} tokens but "
                            f"model.block_size={self.block_size} must leave room for the response")
        response = list(self.tokenizer.encode(pair.response)) + [self.tokenizer.eos_id]
        room = self.block_size + 1 - len(prompt)
        tokens = np.asarray(prompt + response[:room], np.int32)
        mask = np.zeros(len(tokens), np.float32)
        mask[len(prompt):] = 1.0
        return tokens, mask, len(response) > room

    @property
    def num_tokens(self) -> int:
        return int(sum(len(t) for t, *_ in self.examples))

    def packed(self, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(tokens [R, seq_len + 1], mask [R, seq_len + 1]): whole examples packed greedily."""
        if seq_len not in self._packed:
            if seq_len > self.block_size:
                raise DataError(f"seq_len={seq_len} is longer than model.block_size="
                                f"{self.block_size} the examples were cut for")
            order = np.arange(len(self.examples))
            if self.split == "train":
                order = np.random.default_rng([_SEED_SALT, self.seed]).permutation(order)
            width, rows, row, used = seq_len + 1, [], [], 0
            for i in order:
                n = len(self.examples[i][0])
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
                    t, m, _ = self.examples[i]
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
             seed: int | None = None) -> dict[str, np.ndarray]:
        """Global rows [lo, hi) of training batch `step`: each epoch is a seeded row order."""
        seed = self.seed if seed is None else seed
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
