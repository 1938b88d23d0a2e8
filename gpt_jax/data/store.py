"""Reading a token store (written by `prepare.py`): each split as one long sequence of tokens.

A local store is memory-mapped in place. A remote one (gs://, any fsspec URL) is copied once to
the local cache, in parallel, each shard checked against the manifest's sha256 before it is
renamed into place; a re-created host copies it again, which costs no tokenization. Reading a
store never writes one: an unfinished store is an error that says to run `gpt-jax prepare`.

An SFT store (`kind: sft`) holds, beside each shard's tokens, an index of its examples:
uint32 (tokens, prompt tokens, source line) per example.
"""

from __future__ import annotations

import concurrent.futures as futures
import os
import resource
import threading

import numpy as np
from absl import logging

from gpt_jax.data.files import (
    cache_root,
    digest,
    exists,
    file_sha256,
    filesystem,
    is_remote,
    read_json,
    remove_orphaned_temp_files,
    temp_file,
)
from gpt_jax.data.tokenizer_base import Tokenizer
from gpt_jax.data.tokenizers import is_saved
from gpt_jax.errors import DataError

FORMAT = "gpt_jax-store-v1"
MANIFEST = "manifest.json"
INDEX_COLUMNS = 3  # an SFT shard's index: tokens, prompt tokens, source line per example
COPY_THREADS = 16


def _allow_open_files(needed: int) -> None:
    """Raise this process's soft limit on open files (often 1024) toward the hard limit: a 40 GB
    store has over a thousand shards, each mapped with a descriptor of its own."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(hard, needed)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            raise DataError(f"a store split of {needed - 256} shards needs more open files than "
                            f"the hard limit {hard} allows; raise it (ulimit -Hn) or prepare "
                            "with a larger data.shard_mb")


class Verifier:
    """Checks files against their sha256 in a thread of its own; `check()` raises the first
    mismatch (a DataError naming the file) in the thread that reads the tokens."""

    def __init__(self, files: list[tuple[str, str]], store: str):
        self.error: str | None = None
        self.store = store
        self.thread = threading.Thread(target=self._run, args=(files,), daemon=True,
                                       name="store-verifier")
        self.thread.start()

    def _run(self, files: list[tuple[str, str]]) -> None:
        for path, expected in files:
            try:
                digest_ = file_sha256(path)
            except OSError as e:
                self.error = f"{path} of the store {self.store} cannot be read: {e}"
                return
            if digest_ != expected:
                self.error = (f"{path} does not match the sha256 in {self.store}/{MANIFEST}: "
                              "the store is damaged; run `gpt-jax prepare` with the same flags "
                              "again (it rebuilds the damaged shards)")
                return

    def check(self) -> None:
        if self.error is not None:
            raise DataError(self.error)


class SplitTokens:
    """The shards of one split as a single 1-D token sequence (memory-mapped files); every
    window read is checked against `vocab_size` and the store's `verifier`."""

    def __init__(self, paths: list[str], counts: list[int], dtype: np.dtype,
                 vocab_size: int | None = None, verifier: Verifier | None = None,
                 name: str = ""):
        _allow_open_files(len(paths) + 256)  # each memory map holds a file descriptor
        self.shards = [np.memmap(p, dtype=dtype, mode="r", shape=(n,))
                       for p, n in zip(paths, counts) if n]
        self.starts = np.concatenate([[0], np.cumsum([s.shape[0] for s in self.shards])])
        self.vocab_size, self.verifier, self.name = vocab_size, verifier, name

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def dtype(self) -> np.dtype:
        return self.shards[0].dtype if self.shards else np.dtype(np.uint16)

    def to_numpy(self) -> np.ndarray:
        """Every token of the split in one array (small splits: tests, tokenizer checks)."""
        return np.concatenate(self.shards) if self.shards else np.zeros((0,), self.dtype)

    def windows(self, starts_N: np.ndarray, length: int) -> np.ndarray:
        """int32 [N, length]: tokens [s, s + length) for each s in `starts_N`."""
        out_NL = np.empty((len(starts_N), length), np.int32)
        for row, start in enumerate(np.asarray(starts_N, np.int64)):
            pos, end = int(start), int(start) + length
            shard = int(np.searchsorted(self.starts, pos, side="right")) - 1
            while pos < end:
                take = min(end, int(self.starts[shard + 1])) - pos
                lo = pos - int(self.starts[shard])
                out_NL[row, pos - start:pos - start + take] = self.shards[shard][lo:lo + take]
                pos, shard = pos + take, shard + 1
        if self.verifier is not None:
            self.verifier.check()
        if self.vocab_size is not None and out_NL.size and out_NL.max() >= self.vocab_size:
            row, col = np.argwhere(out_NL >= self.vocab_size)[0]
            raise DataError(f"{self.name}: token id {out_NL[row, col]} at token "
                            f"{int(starts_N[row]) + int(col)} is outside the tokenizer's "
                            f"{self.vocab_size} ids: the store is damaged; run `gpt-jax "
                            "prepare` with the same flags again")
        return out_NL


class Store:
    """An opened store: its manifest and, per split, its tokens."""

    def __init__(self, path: str, manifest: dict):
        self.path, self.manifest = path, manifest
        self.name = os.path.basename(path.rstrip("/")) or path
        self.dtype = np.dtype(manifest["dtype"])

    @property
    def splits(self) -> list[str]:
        return list(self.manifest["splits"])

    def info(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise DataError(f"split {split!r} is not in the store {self.path}; it has "
                            f"{', '.join(self.splits)}")
        return self.manifest["splits"][split]

    @property
    def kind(self) -> str:
        """"text" (documents: bos doc eos ...) or "sft" (examples with a prompt length)."""
        return self.manifest.get("kind", "text")

    def _paths(self, split: str, suffix: str) -> list[str]:
        shards = self.info(split)["shards"]
        local = self._local_dir()
        if is_remote(self.path):
            _copy_verified(self.path, shards, local, self.dtype.itemsize)
        return [os.path.join(local, "shards", s["file"][:-len(".tokens")] + suffix)
                for s in shards]

    def tokens(self, split: str) -> SplitTokens:
        shards = self.info(split)["shards"]
        paths = self._paths(split, ".tokens")
        for path, shard in zip(paths, shards):
            size = os.path.getsize(path) if os.path.exists(path) else -1
            if size != shard["num_tokens"] * self.dtype.itemsize:
                raise DataError(f"{path} has {size} bytes, not the {shard['num_tokens']} tokens "
                                f"that {self.path}/{MANIFEST} lists; run prepare again")
        verifier = None  # a remote store's local copy was checked as it was copied
        if not is_remote(self.path):
            verifier = Verifier([(p, s["sha256"]) for p, s in zip(paths, shards)], self.path)
        return SplitTokens(paths, [s["num_tokens"] for s in shards], self.dtype,
                           self.manifest["tokenizer"].get("vocab_size"), verifier,
                           f"{self.path} ({split})")

    def examples(self, split: str) -> tuple[SplitTokens, np.ndarray, list[str]]:
        """An SFT split: (tokens, index [N, 3] of tokens / prompt tokens / line per example,
        the source file of each example)."""
        if self.kind != "sft":
            raise DataError(f"{self.path} holds documents, not prompt/response pairs; prepare "
                            "it with data.source='sft_jsonl'")
        shards = self.info(split)["shards"]
        tokens = self.tokens(split)
        index = [np.fromfile(p, np.uint32).reshape(-1, INDEX_COLUMNS)
                 for p in self._paths(split, ".index")]
        files = [s["source"] for s, i in zip(shards, index) for _ in range(len(i))]
        index = np.concatenate(index) if index else np.zeros((0, INDEX_COLUMNS), np.uint32)
        return tokens, index.astype(np.int64), files

    def bytes_per_token(self, split: str) -> float | None:
        info = self.info(split)
        return info["num_bytes"] / info["num_tokens"] if info.get("num_tokens") else None

    def _local_dir(self) -> str:
        if not is_remote(self.path):
            return filesystem(self.path)[1]
        return os.path.join(cache_root(), "store-copies",
                            f"{self.name}-{digest(self.path, self.manifest['build_key'])}")


def _copy_verified(store: str, shards: list[dict], local: str, itemsize: int) -> None:
    """Copy the shard files that are not yet local, checking each one's sha256 first."""
    os.makedirs(os.path.join(local, "shards"), exist_ok=True)
    remove_orphaned_temp_files(os.path.join(local, "shards"))  # a killed copy's leftovers
    files = [(shard["file"], shard["sha256"], shard["num_tokens"] * itemsize)
             for shard in shards]
    files += [(shard["file"][:-len(".tokens")] + ".index", shard["index_sha256"], None)
              for shard in shards if "index_sha256" in shard]

    def copy(entry: tuple[str, str, int | None]) -> None:
        name, sha256, size = entry
        target = os.path.join(local, "shards", name)
        if os.path.exists(target) and (size is None or os.path.getsize(target) == size):
            return  # copied and checked before
        fd, tmp = temp_file(os.path.dirname(target), "copy")
        with os.fdopen(fd, "wb") as out:
            copied = file_sha256(f"{store.rstrip('/')}/shards/{name}", copy_to=out)
        if copied != sha256:
            os.remove(tmp)
            raise DataError(f"{store}/shards/{name} does not match the sha256 in its "
                            "manifest (a damaged or half-replaced store); run prepare again")
        os.replace(tmp, target)

    missing = [f for f in files if not os.path.exists(os.path.join(local, "shards", f[0]))]
    if missing:
        logging.info("copying %d shard files of %s to %s", len(missing), store, local)
    with futures.ThreadPoolExecutor(COPY_THREADS) as pool:
        list(pool.map(copy, files))


def open_store(path: str, tok: Tokenizer | None = None) -> Store:
    """The finished store at `path`; with `tok`, it must have been tokenized by `tok`."""
    manifest = read_json(os.path.join(path, MANIFEST))
    if manifest is None:
        if exists(os.path.join(path, "shards")) or is_saved(path):
            raise DataError(f"the store {path} is not finished (no {MANIFEST}): run "
                            "`gpt-jax prepare` again with the same flags")
        raise DataError(f"{path} is not a token store (no {MANIFEST}); make one with "
                        "`gpt-jax prepare --config=... --store={path}`")
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}; "
                        "prepare it again with this version")
    theirs = manifest["tokenizer"]
    if tok is not None and theirs["fingerprint"] != tok.fingerprint:
        raise DataError(f"the store {path} was tokenized by a {theirs['kind']} tokenizer "
                        f"(fingerprint {theirs['fingerprint']}), not this run's {tok.kind} "
                        f"(fingerprint {tok.fingerprint}); prepare it with this run's tokenizer")
    return Store(path, manifest)
