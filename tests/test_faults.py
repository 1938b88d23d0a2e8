"""Faults a real machine or user brings (docs/faults.md): a run directory used twice, a full disk,
a damaged store, truncated inputs, explicit values the run would replace, late checks, and
messages that must say what is wrong with the user's value."""

from __future__ import annotations

import errno
import gc
import gzip
import json
import logging
import os
import resource
import signal
import socket
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from conftest import tiny_run_config
from gpt_jax import checkpoint, cli, data, run_lock, train
from gpt_jax.data import files
from gpt_jax.data.store import SplitTokens
from gpt_jax.errors import (
    ConfigError,
    DataError,
    DiskFullError,
    RunDirError,
    RunLockedError,
)
from gpt_jax.run import settle_vocab
from test_data_common import private_cache  # noqa: F401
from test_data_prepare import corpus, jsonl_config, make_store, store_bytes  # noqa: F401


def dead_pid() -> int:
    pid = 4_000_000
    while os.path.exists(f"/proc/{pid}"):
        pid += 1
    return pid


# -- 1. one training process per run directory ---------------------------------------------

def test_a_second_training_process_is_refused_naming_the_holder(tmp_path, text_corpus):
    workdir = tmp_path / "run"
    config = tiny_run_config(text_corpus, tmp_path / "cache", num_steps=2)
    with run_lock.hold(str(workdir)):
        with pytest.raises(RunLockedError) as e:
            train.train(config, str(workdir))
    message = str(e.value)
    assert f"pid {os.getpid()} on {socket.gethostname()} since 20" in message
    assert str(workdir) in message and "\n" not in message
    assert not (workdir / "status.json").exists()  # the refused run wrote nothing
    assert not (workdir / run_lock.FILENAME).exists()  # released on exit


def test_a_lock_left_by_a_dead_process_or_a_silent_host_is_taken_over(tmp_path):
    lock = tmp_path / run_lock.FILENAME
    stale = [{"host": socket.gethostname(), "pid": dead_pid(), "since": 1.0, "heartbeat": 1e12},
             {"host": "other-host", "pid": 1, "since": 1.0,
              "heartbeat": time.time() - run_lock.STALE_SECONDS - 5}]
    for info in stale:
        lock.write_text(json.dumps(info))
        with run_lock.hold(str(tmp_path)):
            assert json.loads(lock.read_text())["pid"] == os.getpid()
        assert not lock.exists()
    live = {"host": "other-host", "pid": 1, "since": time.time(), "heartbeat": time.time()}
    lock.write_text(json.dumps(live))
    with pytest.raises(RunLockedError, match="in use by pid 1 on other-host"):
        with run_lock.hold(str(tmp_path)):
            pass
    assert json.loads(lock.read_text()) == live  # never touched


def test_a_run_directory_that_is_a_file_is_one_line(tmp_path):
    path = tmp_path / "file"
    path.write_text("x")
    with pytest.raises(RunDirError, match="is a file, not a directory"):
        with run_lock.hold(str(path)):
            pass
    with pytest.raises(RunDirError, match="a part of that path is a file"):
        with run_lock.hold(str(path / "run")):
            pass


def test_reading_a_run_does_not_take_its_lock(tmp_path):
    """eval, sample and serve open a run with `open_run`, which never writes run.lock."""
    import inspect

    from gpt_jax import run as run_lib
    assert "run_lock" not in inspect.getsource(run_lib)
    with run_lock.hold(str(tmp_path)):  # a live trainer holds it; a reader is not refused
        assert (tmp_path / run_lock.FILENAME).exists()


# -- 2. a full disk ----------------------------------------------------------------------

def tiny_state(step: int) -> dict:
    keys = jax.random.split(jax.random.PRNGKey(step), 2)
    return {"step": jnp.int32(step),
            "params": {"w": jax.random.normal(keys[0], (384, 384))},
            "opt_state": {"m": jax.random.normal(keys[1], (384, 384))},
            "rng": jax.random.key_data(jax.random.PRNGKey(0))}


@pytest.mark.parametrize("async_save", [False, True])
def test_a_checkpoint_cut_off_by_a_file_size_limit_is_one_line(tmp_path, async_save):
    """A real write failure (RLIMIT_FSIZE: the kernel refuses the write, as on a full disk)."""
    ckpt = checkpoint.Checkpointer(str(tmp_path), checkpoint.CheckpointConfig(
        every=1, keep=3, async_save=async_save))
    ckpt.save(tiny_state(2), {"step": 2}, {"a": 1})
    ckpt.wait()
    state = tiny_state(3)  # (made before the limit: only the save's writes meet it)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, limit[1]))
    try:
        with pytest.raises(DiskFullError) as e:
            ckpt.save(state, {"step": 3}, {"a": 1})
            ckpt.wait()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limit)
        signal.signal(signal.SIGXFSZ, previous)
        ckpt.close()
    message = str(e.value)
    assert "writing checkpoint 3" in message and "the last good checkpoint is step 2" in message
    assert "needs about 1.1 MiB" in message and "\n" not in message  # 2 x 384 x 384 x 4 B
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # the partial one removed
    restored = checkpoint.Checkpointer(str(tmp_path), checkpoint.CheckpointConfig())
    assert restored.manager.latest_step() == 2
    restored.close()


def test_a_corrupt_checkpoint_falls_back_and_its_unawaited_reads_warn_nothing(tmp_path):
    """Reads Orbax queued but never started before it gave up are collected unawaited; their
    "never awaited" warnings (timing-dependent: seen once in CI) are not the user's concern."""
    ckpt = checkpoint.Checkpointer(str(tmp_path), checkpoint.CheckpointConfig(every=1, keep=3))
    for step in (2, 3):
        ckpt.save(tiny_state(step), {"step": step}, {"a": 1})
    ckpt.wait()
    for blob in (tmp_path / "checkpoints" / "3" / "params").rglob("d/*"):
        blob.unlink()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])),
        tiny_state(0))

    class Store:
        async def _get_array_metadatas(self):
            pass

    def unawaited_read() -> list:
        with warnings.catch_warnings(record=True) as seen:
            Store()._get_array_metadatas()  # a coroutine collected without being awaited
            gc.collect()
        return [str(w.message) for w in seen]

    with warnings.catch_warnings():  # the filter the restore adds goes with this block
        warnings.simplefilter("always")
        assert unawaited_read() and "never awaited" in unawaited_read()[0]  # the control
        state, meta = ckpt.restore_latest(abstract)
        assert meta["step"] == 2 and unawaited_read() == []
    ckpt.close()
    np.testing.assert_array_equal(state["params"]["w"], tiny_state(2)["params"]["w"])


def test_any_other_full_write_is_one_line_naming_the_file():
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/runs/x/metrics.jsonl")
    assert cli.expected_exit_code(error) == 1
    assert cli.one_line(error).startswith(
        "the disk is full: writing /runs/x/metrics.jsonl failed (No space left on device)")
    assert checkpoint.is_disk_full(ValueError("RESOURCE_EXHAUSTED: Error writing x in OCDBT"))
    assert not checkpoint.is_disk_full(ValueError("something else"))


# -- 3. a damaged store --------------------------------------------------------------------

def test_a_flipped_byte_is_found_on_open_and_rebuilt_by_prepare(tmp_path, corpus):  # noqa: F811
    folder, _ = corpus
    config = jsonl_config(tmp_path, str(folder))
    store = tmp_path / "s"
    make_store(config, str(store), num_workers=1)
    whole = store_bytes(str(store))
    shard = sorted((store / "shards").glob("*.train.tokens"))[1]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0x01  # still a valid byte-tokenizer id: only the checksum can tell
    shard.write_bytes(bytes(raw))
    dataset = data.open_dataset(str(store), data.ByteTokenizer(), "train", 16)
    dataset.tokens.verifier.thread.join(timeout=60)
    with pytest.raises(DataError, match=f"{shard.name} does not match the sha256"):
        dataset.host_batch(0, 4, 16, 0)
    again = make_store(config, str(store), num_workers=1)
    assert again["built"] == 1
    assert store_bytes(str(store)) == whole


def test_a_killed_writers_temp_files_go_on_rerun(tmp_path, corpus):  # noqa: F811
    folder, _ = corpus
    config = jsonl_config(tmp_path, str(folder))
    store = tmp_path / "s"
    make_store(config, str(store), num_workers=1)
    whole = store_bytes(str(store))
    shards = str(store / "shards")
    dead = dead_pid()
    for pid, stem in [(dead, "shard"), (dead, "000001.json")]:  # a kill -9's leftovers
        path = os.path.join(shards, f".{stem}~{socket.gethostname()}~{pid}~abc.tmp")
        open(path, "wb").write(b"half")
    live_fd, live = files.temp_file(shards, "shard")  # this process writes it still
    other = os.path.join(shards, f".shard~another-host~{dead}~abc.tmp")  # can't tell: kept
    open(other, "wb").write(b"?")
    (store / "shards" / sorted(os.listdir(shards))[-1]).unlink()  # and one shard to rebuild
    make_store(config, str(store), num_workers=1)
    os.close(live_fd)
    left = store_bytes(str(store))
    assert sorted(set(left) - set(whole)) == sorted(
        os.path.relpath(p, store) for p in (live, other))
    assert {k: left[k] for k in whole} == whole


def test_a_token_outside_the_vocabulary_never_reaches_the_model(tmp_path):
    path = tmp_path / "x.tokens"
    np.array([1, 2, 3, 300, 4, 5], np.uint16).tofile(path)
    tokens = SplitTokens([str(path)], [6], np.dtype(np.uint16), vocab_size=259, name="s (train)")
    np.testing.assert_array_equal(tokens.windows(np.array([0]), 3), [[1, 2, 3]])
    with pytest.raises(DataError, match=r"s \(train\): token id 300 at token 3 is outside"):
        tokens.windows(np.array([1]), 4)


# -- 4. truncated inputs -----------------------------------------------------------------

def test_truncated_compressed_and_parquet_files_are_one_line(tmp_path):
    lines = "".join(json.dumps({"text": f"document {i} " * 40}) + "\n" for i in range(200))
    payloads = {"gz": gzip.compress(lines.encode()),
                "zst": zstandard.ZstdCompressor().compress(lines.encode())}
    for ext, payload in payloads.items():
        folder = tmp_path / ext
        folder.mkdir()
        (folder / f"x.jsonl.{ext}").write_bytes(payload[:len(payload) // 2])
        with pytest.raises(DataError, match=rf"x.jsonl.{ext} ends early or is damaged (after "
                                            r"line \d+ \(byte [\d,]+ of its text\)|in its "
                                            r"first block)") as e:
            make_store(jsonl_config(tmp_path, str(folder)), str(tmp_path / f"s-{ext}"),
                       num_workers=1)
        assert "\n" not in str(e.value)
    folder = tmp_path / "pq"
    folder.mkdir()
    pq.write_table(pa.table({"text": [f"row {i} " * 50 for i in range(400)]}),
                   str(folder / "x.parquet"), row_group_size=100)
    full = (folder / "x.parquet").read_bytes()
    (folder / "x.parquet").write_bytes(full[:len(full) // 2])
    config = jsonl_config(tmp_path, str(folder), source="parquet")
    with pytest.raises(DataError, match="x.parquet: not a Parquet file"):
        make_store(config, str(tmp_path / "s-pq"), num_workers=1)
    damaged = bytearray(full)
    damaged[8:len(full) // 3] = bytes(len(full) // 3 - 8)  # the first pages; footer intact
    (folder / "x.parquet").write_bytes(bytes(damaged))
    with pytest.raises(DataError, match="x.parquet: row group 0 cannot be read"):
        make_store(config, str(tmp_path / "s-pq2"), num_workers=1)


def test_an_http_read_that_breaks_off_half_way_is_one_line():
    """An in-process server on 127.0.0.1 that promises the whole file and sends half."""
    import http.server
    import threading

    from gpt_jax.data import documents

    body = "".join(json.dumps({"text": f"doc {i} " * 30}) + "\n" for i in range(300)).encode()

    class Half(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()

        def do_GET(self):
            self.do_HEAD()
            self.wfile.write(body[:len(body) // 2])

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Half)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/x.jsonl"
    try:
        piece = documents.Piece("jsonl", url, "x.jsonl", 0, len(body), size=len(body))
        with pytest.raises(DataError, match=r"x.jsonl could not be read to the end in its "
                                            r"first block .*; download or copy it again") as e:
            list(documents._jsonl_texts(piece, "text"))
        assert "\n" not in str(e.value)
    finally:
        server.shutdown()
        server.server_close()


# -- 5, 7. explicit values and messages ----------------------------------------------------

def test_a_vocab_size_the_tokenizer_replaces_is_an_error_only_when_explicit(caplog):
    tok = data.ByteTokenizer()
    raw = {"model": {"vocab_size": 100}, "train": {}}
    with pytest.raises(ConfigError, match=r"--config.model.vocab_size=100 but the byte "
                                          rf"tokenizer has {tok.vocab_size} ids"):
        settle_vocab(raw, tok, frozenset({"model.vocab_size"}))
    with caplog.at_level(logging.INFO):
        settle_vocab(raw, tok)  # from a config file: replaced, and logged
    assert raw["model"]["vocab_size"] == tok.vocab_size
    assert "model.vocab_size=100 replaced by the byte tokenizer" in caplog.text


def test_store_values_that_are_not_stores_say_what_is_wrong(tmp_path):
    with pytest.raises(DataError, match=r"in '.*/s=abc' the weight 'abc' is not a number"):
        files.store_paths(f"{tmp_path}/s=abc")
    (tmp_path / "k=v").mkdir()  # a directory whose name holds "=" is a path, not a weight
    assert files.store_paths(f"{tmp_path}/k=v") == [(f"{tmp_path}/k=v", 1.0)]
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="is a file; a store is the directory"):
        files.store_paths(str(tmp_path / "afile"))


# -- 6. checks before the first compile ------------------------------------------------------

@pytest.mark.e2e
def test_a_context_longer_than_a_split_fails_before_any_compile(tmp_path, text_corpus,
                                                                monkeypatch):
    config = tiny_run_config(text_corpus, tmp_path / "cache", num_steps=2)
    config.model.block_size = 4096
    config.data.validation_fraction = 0.05
    compiled = []
    monkeypatch.setattr(train.Trainer, "create", lambda *a, **k: compiled.append(1))
    with pytest.raises(DataError, match="seq_len=4096 is too long for"):
        train.train(config, str(tmp_path / "run"))
    assert not compiled
    config = tiny_run_config(text_corpus, tmp_path / "cache", num_steps=2,
                             eval_tasks=str(tmp_path / "missing.jsonl"))
    with pytest.raises(Exception, match="missing.jsonl"):
        train.train(config, str(tmp_path / "run2"))
    assert not compiled


@pytest.mark.e2e
def test_a_full_metrics_file_ends_training_in_one_line(tmp_path, text_corpus):
    workdir = tmp_path / "run"
    workdir.mkdir()
    os.symlink("/dev/full", workdir / "metrics.jsonl")  # every write: ENOSPC
    config = tiny_run_config(text_corpus, tmp_path / "cache", num_steps=2, log_every=1)
    with pytest.raises(OSError) as e:
        train.train(config, str(workdir))
    assert cli.expected_exit_code(e.value) == 1
    assert cli.one_line(e.value).startswith("the disk is full: writing")
    assert not (workdir / run_lock.FILENAME).exists()


# -- 8. the loop's non-finite paths -----------------------------------------------------------

class _Writer:
    def __init__(self):
        self.messages, self.events = [], []

    def message(self, text):
        self.messages.append(text)

    def write(self, step, event):
        self.events.append((step, event))


class _Checkpointer:
    class manager:  # noqa: N801 -- stands in for Orbax's manager
        @staticmethod
        def latest_step():
            return 40

    def wait(self):
        pass


class _Throughput:
    def read(self):
        return {}


def _pending(finite):
    return [(step, {"finite": np.bool_(ok), "loss": np.float32(2.0 if ok else np.nan),
                    "grad_norm": np.float32(1.0), "lr": np.float32(0.1)})
            for step, ok in enumerate(finite, start=41)]


def test_a_nonfinite_step_stops_naming_the_last_good_checkpoint_or_is_skipped():
    from gpt_jax.errors import NonFiniteLossError

    writer = _Writer()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) or grad norm at step "
                                                 r"42; .* the last good checkpoint is step 40"):
        train._log(_pending([True, False, True]), _Throughput(), writer, False, _Checkpointer())
    assert not writer.events  # nothing of the bad interval is logged as if it were fine
    writer = _Writer()
    event = train._log(_pending([True, False, True]), _Throughput(), writer, True,
                       _Checkpointer())
    assert writer.messages == ["step 42: non-finite loss/grad; update skipped"]
    assert [s for s, _ in writer.events] == [44] and event["loss"] == 2.0  # the skipped step
    # is not averaged into the interval's loss


@pytest.mark.e2e
def test_eval_bits_per_byte_is_nats_over_the_texts_bytes(tmp_path, text_corpus):
    """Independently: the eval batches' summed negative log-likelihood (numpy, from the
    model's logits) in bits, over the UTF-8 bytes the targets encode (a byte tokenizer: one
    byte per id below 256, none for BOS/EOS)."""
    from gpt_jax import sharding
    from gpt_jax.evaluate import evaluate
    from gpt_jax.run import resolve_run
    from gpt_jax.step import Trainer

    config = tiny_run_config(text_corpus, tmp_path / "cache", eval_batches=1000)  # all that fit
    run = resolve_run(config, str(tmp_path / "run"))
    trainer = Trainer.for_config(run.config, run.mesh)
    with sharding.activate(run.mesh, run.rules):
        params = trainer.init_state(0)["params"]
        got = evaluate(trainer, trainer.jit_eval_step(), params, run.val_data, run.config)
    nats = n_bytes = 0.0
    T, V = run.config.model.block_size, run.config.model.vocab_size
    for batch in run.val_data.eval_batches(1000, run.config.train.global_batch_size, T):
        logits = np.asarray(trainer.model.apply({"params": params}, batch["inputs"]),
                            np.float64)[..., :V]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                               keepdims=True)) - logits.max(-1, keepdims=True)
        nats -= np.take_along_axis(logp, batch["targets"][..., None], -1).sum()
        n_bytes += (batch["targets"] < 256).sum()
    np.testing.assert_allclose(got["eval_bits_per_byte"], nats / np.log(2) / n_bytes,
                               rtol=0.02)
