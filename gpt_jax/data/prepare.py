"""Tokenize a corpus into a sharded token store, in parallel, resumably, locally or on gs://.

    <store>/tokenizer/                     the tokenizer (tokenizer.json written last)
    <store>/shards/000123.<split>.tokens   piece 123's documents of one split, flat uint16/uint32
                                           tokens: bos doc eos bos doc eos ... (SFT: prompt
                                           response eos per example, no bos)
    <store>/shards/000123.<split>.index    SFT only: uint32 (tokens, prompt tokens, line) per
                                           example
    <store>/shards/000123.json             piece 123 is finished: per split its token count,
                                           document count, text bytes and sha256
    <store>/manifest.json                  written last, by process 0, once every shard is finished

Each piece of `documents.plan` becomes one shard, so the store's bytes depend on the corpus,
the tokenizer and data.shard_mb / data.shard_docs only: not on the number of workers, processes
or hosts. Process p of P tokenizes the pieces i with i % P == p; a rerun skips finished shards.
`prepare_cached` is the same for small corpora, into the local cache: what `train` calls before
it opens a corpus that names no store.
"""

from __future__ import annotations

import concurrent.futures as futures
import contextlib
import dataclasses
import hashlib
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Any

import numpy as np
from absl import logging
from tqdm import tqdm

from gpt_jax.data import documents
from gpt_jax.data.config import DataConfig
from gpt_jax.data.documents import Pair, Piece, Plan
from gpt_jax.data.files import (
    atomic_write_json,
    build_once,
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
from gpt_jax.data.store import FORMAT, INDEX_COLUMNS, MANIFEST
from gpt_jax.data.tokenizer_base import Tokenizer
from gpt_jax.data.tokenizers import (
    build_tokenizer,
    is_saved,
    load_tokenizer,
    ready_tokenizer,
    tokenizer_dir,
)
from gpt_jax.errors import DataError
from gpt_jax.processes import die_with_parent

DOCS_PER_BATCH = 256


def open_tfds(d: DataConfig):
    """The TFDS corpus of a `tfds` source, else None."""
    if d.source != "tfds":
        return None
    from gpt_jax.data.tfds_source import (
        open_tfds as open_it,  # imports TFDS: only for tfds
    )

    return open_it(d)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2 ** 16 else np.uint32)


def build_key(d: DataConfig, plan: Plan, tok: Tokenizer) -> str:
    """The digest every shard of a store is built for: format, corpus, tokenizer, shards."""
    return digest(FORMAT, plan.fingerprint, tok.fingerprint, str(d.shard_mb), str(d.shard_docs),
                  d.train_split, d.eval_split)


def shard_name(store: str, index: int, split: str | None = None) -> str:
    suffix = "json" if split is None else f"{split}.tokens"  # split: train | validation
    return os.path.join(store, "shards", f"{index:06d}.{suffix}")


def shard_is_done(store: str, index: int, key: str, itemsize: int,
                  verify: bool = False) -> bool:
    """The shard's record exists for this build and each of its files has its full size
    (and, with `verify`, the sha256 its record lists: a damaged shard is not done)."""
    meta = read_json(shard_name(store, index))
    if not meta or meta.get("build_key") != key:
        return False
    fs, _ = filesystem(store)
    for split, info in meta["splits"].items():
        path = filesystem(shard_name(store, index, split))[1]
        if not fs.exists(path) or fs.size(path) != info["num_tokens"] * itemsize:
            return False
        if "index_sha256" in info and not fs.exists(path[:-len(".tokens")] + ".index"):
            return False
        if not verify:
            continue
        sums = [(shard_name(store, index, split), info["sha256"])]
        if "index_sha256" in info:
            sums.append((sums[0][0][:-len(".tokens")] + ".index", info["index_sha256"]))
        for file, expected in sums:
            if file_sha256(file) != expected:
                logging.warning("%s does not match the sha256 in %s (damaged); preparing it "
                                "again", file, shard_name(store, index))
                return False
    return True


# -- one shard, in a worker process --------------------------------------------------------

_WORKER: dict[str, Any] = {}


def _init_worker(data: dict, store: str, threads: int, tok: Tokenizer | None = None) -> None:
    d = DataConfig.from_dict(data)
    _WORKER.update(d=d, store=store, tok=tok or load_tokenizer(store), threads=threads,
                   corpus=open_tfds(d))


def _init_pool_worker(parent_pid: int, *args) -> None:
    die_with_parent(parent_pid)  # a killed `prepare` leaves no worker behind
    _init_worker(*args)


class _SplitWriter:
    """Appends one split's tokens to a local temporary file, hashing as it goes."""

    def __init__(self, directory: str):
        fd, self.tmp = temp_file(directory, "shard")
        self.file = os.fdopen(fd, "wb")
        self.sha = hashlib.sha256()
        self.num_tokens = self.num_docs = self.num_bytes = 0
        self.index: list[tuple[int, int, int]] = []  # SFT: (tokens, prompt tokens, line)

    def write(self, chunk: np.ndarray, docs: int, text_bytes: int) -> None:
        data = chunk.tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.num_tokens, self.num_docs = self.num_tokens + chunk.size, self.num_docs + docs
        self.num_bytes += text_bytes

    def discard(self) -> None:
        self.file.close()
        with contextlib.suppress(OSError):
            os.remove(self.tmp)

    def commit(self, path: str) -> dict:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        _publish(self.tmp, path)
        record = {"num_tokens": self.num_tokens, "num_docs": self.num_docs,
                  "num_bytes": self.num_bytes, "sha256": self.sha.hexdigest()}
        if self.index:
            data = np.asarray(self.index, np.uint32).reshape(-1, INDEX_COLUMNS).tobytes()
            fd, tmp = temp_file(os.path.dirname(self.tmp), "index")
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            _publish(tmp, path[:-len(".tokens")] + ".index")
            record["index_sha256"] = hashlib.sha256(data).hexdigest()
        return record


def _publish(tmp: str, path: str) -> None:
    """Move a finished local temporary file to `path` (a local rename or one object upload)."""
    fs, inner = filesystem(path)
    if not is_remote(path):
        fs.makedirs(os.path.dirname(inner), exist_ok=True)
        os.replace(tmp, inner)
    else:
        fs.put_file(tmp, inner)  # one object upload: all or nothing
        os.remove(tmp)


def _worker_context():
    """fork (workers start in milliseconds) unless this process runs JAX, whose threads do not
    survive a fork; then spawn."""
    return multiprocessing.get_context("spawn" if "jax" in sys.modules else "fork")


def _tokenize(stream, tok: Tokenizer, dtype: np.dtype, writers: dict[str, _SplitWriter],
              seconds: dict[str, float], tmp_dir: str) -> None:
    """Encode (split, document) pairs in batches into one writer per split, timing each stage.

    A text document becomes bos + ids + eos; an SFT `Pair` prompt ids + response ids + eos
    (no bos), with its index row."""
    bos, eos = np.array([tok.bos_id], dtype), np.array([tok.eos_id], dtype)
    while True:
        start = time.perf_counter()
        batch = [doc for _, doc in zip(range(DOCS_PER_BATCH), stream)]
        seconds["read"] += time.perf_counter() - start
        if not batch:
            return
        start = time.perf_counter()
        pairs = isinstance(batch[0][1], Pair)
        texts = ([t for _, p in batch for t in (p.prompt, p.response)] if pairs
                 else [text for _, text in batch])
        ids = tok.encode_batch(texts, num_threads=_WORKER["threads"])
        seconds["encode"] += time.perf_counter() - start
        start = time.perf_counter()
        for split in dict.fromkeys(s for s, _ in batch):
            rows = [i for i, (s, _) in enumerate(batch) if s == split]
            if split not in writers:
                writers[split] = _SplitWriter(tmp_dir)
            writer = writers[split]
            if pairs:
                parts = []
                for i in rows:
                    prompt, response = ids[2 * i].astype(dtype), ids[2 * i + 1].astype(dtype)
                    parts += [prompt, response, eos]
                    writer.index.append((len(prompt) + len(response) + 1, len(prompt),
                                         batch[i][1].line))
                text_bytes = sum(len(batch[i][1].prompt.encode("utf-8"))
                                 + len(batch[i][1].response.encode("utf-8")) for i in rows)
            else:
                parts = [part for i in rows for part in (bos, ids[i].astype(dtype), eos)]
                text_bytes = sum(len(batch[i][1].encode("utf-8")) for i in rows)
            writer.write(np.concatenate(parts), len(rows), text_bytes)
        seconds["write"] += time.perf_counter() - start


def write_shard(index: int, piece: Piece, key: str) -> dict:
    """Tokenize `piece` into its shard files, then write its record; returns stage timings."""
    d, store, tok = _WORKER["d"], _WORKER["store"], _WORKER["tok"]
    dtype = token_dtype(tok.vocab_size)
    local_dir = None if is_remote(store) else os.path.join(filesystem(store)[1], "shards")
    if local_dir:
        os.makedirs(local_dir, exist_ok=True)
    writers: dict[str, _SplitWriter] = {}
    seconds = {"read": 0.0, "encode": 0.0, "write": 0.0}
    stream = documents.piece_documents(piece, d, _WORKER["corpus"])  # (split, document)
    try:
        _tokenize(stream, tok, dtype, writers, seconds, local_dir or tempfile.gettempdir())
    except BaseException:
        for writer in writers.values():
            writer.discard()
        raise
    start = time.perf_counter()
    splits = {split: {**w.commit(shard_name(store, index, split)), "source": piece.path}
              for split, w in writers.items()}
    atomic_write_json(shard_name(store, index), {"build_key": key,
                                                 "piece": dataclasses.asdict(piece),
                                                 "splits": splits})
    seconds["write"] += time.perf_counter() - start
    return {"seconds": seconds, "num_docs": sum(s["num_docs"] for s in splits.values()),
            "num_bytes": sum(s["num_bytes"] for s in splits.values()),
            "num_tokens": sum(s["num_tokens"] for s in splits.values())}


# -- the whole store -----------------------------------------------------------------------

def _manifest(store: str, plan: Plan, key: str, tok: Tokenizer, kind: str) -> dict:
    splits: dict[str, dict] = {}
    for index in range(len(plan.pieces)):
        for split, info in read_json(shard_name(store, index))["splits"].items():
            entry = splits.setdefault(split, {"num_tokens": 0, "num_docs": 0, "num_bytes": 0,
                                              "shards": []})
            for k in ("num_tokens", "num_docs", "num_bytes"):
                entry[k] += info[k]
            shard = {"file": os.path.basename(shard_name(store, index, split)),
                     "num_tokens": info["num_tokens"], "sha256": info["sha256"]}
            if kind == "sft":
                shard.update(index_sha256=info["index_sha256"], source=info["source"])
            entry["shards"].append(shard)
    if not splits:
        raise DataError(f"the corpus {plan.corpus} is empty: its {len(plan.pieces)} pieces hold "
                        "no documents")
    for split, entry in splits.items():
        if entry["num_bytes"] == 0:
            raise DataError(f"split {split!r} of {plan.corpus} is empty: its "
                            f"{entry['num_docs']} documents have no text")
    return {"format": FORMAT, "kind": kind, "build_key": key, "corpus": plan.corpus,
            "corpus_fingerprint": plan.fingerprint, "corpus_metadata": plan.metadata,
            "tokenizer": {"kind": tok.kind, "fingerprint": tok.fingerprint,
                          "vocab_size": tok.vocab_size},
            "dtype": token_dtype(tok.vocab_size).name, "splits": splits}


def store_tokenizer(d: DataConfig, vocab_size: int, store: str, process_index: int = 0,
                    tfds_corpus=None) -> Tokenizer:
    """The store's tokenizer: made (trained) and saved on first use; a saved one must be the
    one the config names, where that needs no training to tell."""
    if is_saved(store):
        saved, wanted = load_tokenizer(store), ready_tokenizer(d)
        if wanted is not None and wanted.fingerprint != saved.fingerprint:
            raise DataError(f"{store} was prepared with another {saved.kind} tokenizer "
                            f"(fingerprint {saved.fingerprint}) than the config's "
                            f"{wanted.kind} (fingerprint {wanted.fingerprint}); use another "
                            "--store")
    return build_tokenizer(d, vocab_size, store, process_index=process_index,
                           tfds_corpus=tfds_corpus)


def check_manifest(store: str, manifest: dict, key: str) -> None:
    if manifest.get("build_key") != key:
        raise DataError(f"{store} holds a store prepared from another corpus, tokenizer or "
                        f"shard size (build {manifest.get('build_key')}, this config's is "
                        f"{key}); use another store path")


def prepare(d: DataConfig, store: str, tok: Tokenizer, num_workers: int = 0,
            process_index: int = 0, process_count: int = 1, wait_seconds: float = 86400.0,
            threads: int = 0, tfds_corpus=None, plan: Plan | None = None) -> dict:
    """Tokenize this process's unfinished shards; process 0 then writes the manifest.

    `tok` must already be saved in `<store>/tokenizer`. `num_workers` processes (0: one per
    core) each encode with `threads` threads (0: the cores the workers leave). Returns counts
    and stage timings (seconds summed over workers).
    """
    tfds_corpus = tfds_corpus or open_tfds(d)
    plan = plan or documents.plan(d, tfds_corpus)  # the caller's, if it made one already
    key = build_key(d, plan, tok)
    itemsize = token_dtype(tok.vocab_size).itemsize
    done: set[int] | None = None  # the shards found finished (checksums read once)
    manifest = read_json(os.path.join(store, MANIFEST))
    if manifest is not None:
        check_manifest(store, manifest, key)
        # a rerun reads every shard: a damaged one is rebuilt
        done = {i for i in range(len(plan.pieces))
                if shard_is_done(store, i, key, itemsize, verify=True)}
        if len(done) == len(plan.pieces):
            return {"pieces": len(plan.pieces), "built": 0, "skipped": len(plan.pieces)}
        if process_index == 0:  # a shard went missing: rebuild it, then the manifest
            logging.warning("%s: some shards are missing or damaged; preparing them again", store)
            filesystem(store)[0].rm(filesystem(os.path.join(store, MANIFEST))[1])
    _check_no_foreign_shards(store, plan, key)
    if not is_remote(store):  # a killed build's half-written files go (live writers' stay)
        remove_orphaned_temp_files(os.path.join(filesystem(store)[1], "shards"))
    mine = [i for i in range(len(plan.pieces)) if i % process_count == process_index]
    if done is None:
        done = {i for i in mine if shard_is_done(store, i, key, itemsize, verify=True)}
    todo = [i for i in mine if i not in done]
    workers = max(1, min(num_workers or os.cpu_count() or 1, len(todo) or 1))
    threads = threads or max(1, (os.cpu_count() or 1) // workers)
    stats = {"pieces": len(plan.pieces), "built": len(todo), "skipped": len(mine) - len(todo),
             "num_docs": 0, "num_bytes": 0, "num_tokens": 0, "workers": workers,
             "seconds": {"read": 0.0, "encode": 0.0, "write": 0.0}}
    start = time.perf_counter()
    progress = _Progress(sum(plan.pieces[i].size for i in todo),
                         "doc" if all(plan.pieces[i].kind == "records" for i in todo) else "B",
                         f"prepare {plan.corpus} ({len(todo)} of {len(plan.pieces)} shards)")
    data = d.to_dict()

    def done(index: int, result: dict) -> None:
        for k in ("num_docs", "num_bytes", "num_tokens"):
            stats[k] += result[k]
        for k, v in result["seconds"].items():
            stats["seconds"][k] += v
        progress.update(plan.pieces[index].size, stats["num_bytes"], stats["num_tokens"])

    if workers == 1:
        _init_worker(data, store, threads, tok)
        for i in todo:
            done(i, write_shard(i, plan.pieces[i], key))
    else:
        context = _worker_context()
        tok.encode_batch(["warm"])  # tiktoken's tables are built once, here, and forked
        # Forked workers inherit `tok`; spawned ones load it from the store.
        initargs = (data, store, threads) + ((tok,) if context.get_start_method() == "fork"
                                             else ())
        with futures.ProcessPoolExecutor(workers, context, initializer=_init_pool_worker,
                                         initargs=(os.getpid(),) + initargs) as pool:
            jobs = {pool.submit(write_shard, i, plan.pieces[i], key): i for i in todo}
            try:
                for job in futures.as_completed(jobs):
                    done(jobs[job], job.result())
            except BaseException:  # a bad document: do not tokenize the rest of the corpus first
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    progress.close()
    stats["wall_seconds"] = round(time.perf_counter() - start, 3)
    stats["seconds"] = {k: round(v, 3) for k, v in stats["seconds"].items()}
    if process_index == 0:
        _wait_for_shards(store, plan, key, itemsize, wait_seconds)
        kind = "sft" if d.is_sft else "text"
        atomic_write_json(os.path.join(store, MANIFEST), _manifest(store, plan, key, tok, kind))
    logging.info("store %s: process %d/%d tokenized %d documents (%.1f MB) into %d shards "
                 "(%d already done) in %.1fs", store, process_index, process_count,
                 stats["num_docs"], stats["num_bytes"] / 1e6, len(todo), stats["skipped"],
                 stats["wall_seconds"])
    return stats


def prepare_cached(d: DataConfig, tok: Tokenizer, tfds_corpus=None) -> str:
    """The store of the corpus `d` names in the local cache (data.cache_dir), prepared now
    if it is missing or unfinished: the path to open. Concurrent callers build it once."""
    tfds_corpus = tfds_corpus or open_tfds(d)
    plan = documents.plan(d, tfds_corpus)
    root = d.cache_dir or os.path.join(cache_root(), "stores")
    path = os.path.join(os.path.expanduser(root), f"{plan.corpus}-{build_key(d, plan, tok)}")
    if is_remote(path):
        raise DataError(f"data.cache_dir={d.cache_dir!r} is remote; prepare large corpora with "
                        "`gpt-jax prepare --store=gs://...` and train with data.store")

    def build() -> None:
        if not is_saved(path):
            tok.save(tokenizer_dir(path))
        prepare(d, path, tok, num_workers=1, tfds_corpus=tfds_corpus, plan=plan)

    build_once(lambda: exists(os.path.join(path, MANIFEST)), build, path + ".lock",
               f"the token store {path}")
    return path


class _Progress:
    """A tqdm bar on a terminal; in a log, one line every LOG_SECONDS with MB/s, tokens/s, ETA."""
    LOG_SECONDS = 30.0

    def __init__(self, total: int, unit: str, desc: str):
        self.bar = tqdm(total=total, unit=unit, unit_scale=True, disable=None, smoothing=0.1,
                        desc=desc)
        self.total, self.unit, self.desc, self.done = total, unit, desc, 0
        self.start = self.last = time.perf_counter()

    def update(self, n: int, num_bytes: int, num_tokens: int) -> None:
        self.done += n
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        rates = (f"{num_bytes / elapsed / 1e6:.1f} MB/s, "
                 f"{num_tokens / elapsed / 1e6:.2f}M tokens/s")
        self.bar.update(n)
        self.bar.set_postfix_str(rates, refresh=False)
        if self.bar.disable and (time.perf_counter() - self.last > self.LOG_SECONDS
                                 or self.done == self.total):
            self.last = time.perf_counter()
            eta = elapsed * (self.total - self.done) / max(self.done, 1)
            print(f"{self.desc}: {self.done / max(self.total, 1):.1%} of {self.total:,} "
                  f"{self.unit}, {rates}, eta {time.strftime('%H:%M:%S', time.gmtime(eta))}",
                  flush=True)

    def close(self) -> None:
        self.bar.close()


def _check_no_foreign_shards(store: str, plan: Plan, key: str) -> None:
    """A shard record of another build (other files, tokenizer or shard size) is never
    overwritten: that store belongs to someone else, or the hosts disagree on the corpus."""
    for index in range(len(plan.pieces)):
        meta = read_json(shard_name(store, index))
        if meta and meta.get("build_key") != key:
            raise DataError(f"{shard_name(store, index)} belongs to another build of this store "
                            f"({meta.get('build_key')}, this one is {key}): another "
                            "corpus, tokenizer or shard size, or hosts whose copies of the corpus "
                            "differ (size or modification time); use another --store")


def _wait_for_shards(store: str, plan: Plan, key: str, itemsize: int,
                     wait_seconds: float) -> None:
    deadline, missing = time.time() + wait_seconds, list(range(len(plan.pieces)))
    while True:
        _check_no_foreign_shards(store, plan, key)
        missing = [i for i in missing if not shard_is_done(store, i, key, itemsize)]
        if not missing:
            return
        if time.time() > deadline:
            raise DataError(f"{len(missing)} shards of {store} (e.g. {missing[0]}) were not "
                            f"finished by the other processes within {wait_seconds:.0f}s; run "
                            "prepare again")
        logging.log_every_n_seconds(logging.INFO, "waiting for %d shards from other processes",
                                    60, len(missing))
        time.sleep(2.0)
