"""`gpt-jax prepare` and the token store: determinism over workers and processes, resume after
kill -9, JSONL / gz / zst / Parquet sources, a non-local file system, one-line errors, mixtures."""

from __future__ import annotations

import gzip
import json
import os
import signal
import socket
import subprocess
import sys
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from gpt_jax import data
from gpt_jax.bench import synthetic
from gpt_jax.config import base_config, typed
from gpt_jax.data import files
from gpt_jax.data import prepare as prepare_lib
from gpt_jax.data.mixture import MixtureDataset
from gpt_jax.data.store import MANIFEST
from gpt_jax.errors import DataError
from test_data_common import private_cache  # noqa: F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = 16


def jsonl_config(tmp_path, paths: str, source: str = "jsonl", tokenizer: str = "byte", **d):
    config = base_config()
    config.data.update({"source": source, "paths": paths, "tokenizer": tokenizer,
                        "shard_mb": 0.02, "validation_fraction": 0.1,
                        "cache_dir": str(tmp_path / "stores"), **d})
    return config


def make_store(config, store: str, **kw) -> dict:
    config = typed(config)
    tok = data.build_tokenizer(config.data, config.model.vocab_size, store)
    return prepare_lib.prepare(config.data, store, tok, **kw)


def dataset(store: str, split: str = "train"):
    return data.open_dataset(store, data.ByteTokenizer(), split, 256)


def mixture(spec: str) -> MixtureDataset:
    return dataset(spec)


def store_bytes(store: str) -> dict[str, bytes]:
    out = {}
    for folder, _, names in os.walk(store):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, store)] = open(path, "rb").read()
    return out


def split_documents(tokens: np.ndarray, tok) -> list[str]:
    """The texts between each BOS ... EOS of a byte-tokenized split."""
    ends = np.flatnonzero(tokens == tok.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    assert (tokens[starts] == tok.bos_id).all()
    return [bytes(tokens[s + 1:e].astype(np.uint8)).decode("utf-8") for s, e in zip(starts, ends)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("jsonl")
    synthetic.write_jsonl(str(folder / "a.jsonl"), 0.15, seed=1, num_types=5000)
    synthetic.write_jsonl(str(folder / "b.jsonl"), 0.1, seed=2, num_types=5000)
    texts = [json.loads(line)["text"] for name in ("a.jsonl", "b.jsonl")
             for line in open(folder / name, encoding="utf-8")]
    return folder, texts


def test_store_holds_every_document_once_and_splits_by_hash(tmp_path, corpus):
    folder, texts = corpus
    config = jsonl_config(tmp_path, str(folder))
    stats = make_store(config, str(tmp_path / "s"), num_workers=1)
    store = data.open_store(str(tmp_path / "s"), data.ByteTokenizer())
    assert stats["built"] == stats["pieces"] > 4  # several byte ranges per file
    tok = data.ByteTokenizer()
    train = split_documents(store.tokens("train").to_numpy(), tok)
    val = split_documents(store.tokens("validation").to_numpy(), tok)
    assert sorted(train + val) == sorted(texts)  # no line lost or read twice at a range edge
    assert 0.02 < len(val) / len(texts) < 0.25
    assert store.bytes_per_token("train") == pytest.approx(
        sum(len(t.encode()) for t in train) / store.info("train")["num_tokens"])


@pytest.mark.e2e
def test_store_bytes_do_not_depend_on_workers_or_processes(tmp_path, corpus):
    folder, _ = corpus
    config = jsonl_config(tmp_path, str(folder))
    make_store(config, str(tmp_path / "one"), num_workers=1)
    make_store(config, str(tmp_path / "two"), num_workers=2)
    cmd = [sys.executable, os.path.join(ROOT, "launch", "local_multihost.py"),
           "--num_processes=2", "--", sys.executable, "-m", "gpt_jax.cli", "prepare",
           "--config=configs/default.py", "--config.data.source=jsonl",
           f"--config.data.paths={folder}", "--config.data.tokenizer=byte",
           "--config.data.shard_mb=0.02", "--config.data.validation_fraction=0.1",
           f"--store={tmp_path / 'procs'}", "--num_workers=2"]  # forked workers
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stdout + out.stderr
    one = store_bytes(str(tmp_path / "one"))
    assert store_bytes(str(tmp_path / "two")) == one == store_bytes(str(tmp_path / "procs"))
    docs = [json.loads(line.split("] ", 1)[1])["num_docs"] for line in out.stdout.splitlines()
            if '"num_docs"' in line]
    assert len(docs) == 2 and all(0.3 < n / sum(docs) < 0.7 for n in docs), out.stdout


SLOW_PREPARE = """
import sys, time
from gpt_jax.data import prepare
write = prepare.write_shard
prepare.write_shard = lambda *a: (time.sleep(0.3), write(*a))[1]  # time to be killed
from gpt_jax import cli
cli.run(["gpt-jax", "prepare"] + sys.argv[1:])
"""


@pytest.mark.e2e
def test_kill_9_then_rerun_rebuilds_only_unfinished_shards(tmp_path, corpus):
    folder, _ = corpus
    config = jsonl_config(tmp_path, str(folder))
    make_store(config, str(tmp_path / "whole"), num_workers=1)
    store = tmp_path / "killed"
    flags = ["--config=configs/default.py", "--config.data.source=jsonl",
             f"--config.data.paths={folder}", "--config.data.tokenizer=byte",
             "--config.data.shard_mb=0.02", "--config.data.validation_fraction=0.1",
             f"--store={store}", "--num_workers=1"]
    proc = subprocess.Popen([sys.executable, "-c", SLOW_PREPARE] + flags, cwd=ROOT,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    shards = store / "shards"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(shards.glob("*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(shards.glob("*.json")))
    assert not (store / MANIFEST).exists()
    stats = make_store(config, str(store), num_workers=1)
    assert 3 <= done < stats["pieces"] and stats["built"] == stats["pieces"] - done
    assert store_bytes(str(store)) == store_bytes(str(tmp_path / "whole"))


KILLABLE_PREPARE = """
import multiprocessing, sys, time
from gpt_jax.data import prepare
write = prepare.write_shard


def slow_write(*args):  # time to be killed; a named function, so the pool can pickle it
    time.sleep(0.3)
    return write(*args)


prepare.write_shard = slow_write
if __name__ == "__main__":
    method = sys.argv[1]  # (the CLI rewrites sys.argv)
    prepare._worker_context = lambda: multiprocessing.get_context(method)
    from gpt_jax import cli
    cli.run(["gpt-jax", "prepare"] + sys.argv[2:])
"""


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(entry))
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_workers_die_with_a_killed_prepare_and_the_rerun_is_identical(tmp_path, corpus, method):
    folder, _ = corpus
    config = jsonl_config(tmp_path, str(folder))
    make_store(config, str(tmp_path / "whole"), num_workers=1)
    store, script = tmp_path / "killed", tmp_path / "killable_prepare.py"
    script.write_text(KILLABLE_PREPARE)
    flags = ["--config=configs/default.py", "--config.data.source=jsonl",
             f"--config.data.paths={folder}", "--config.data.tokenizer=byte",
             "--config.data.shard_mb=0.02", "--config.data.validation_fraction=0.1",
             f"--store={store}", "--num_workers=2"]
    proc = subprocess.Popen([sys.executable, str(script), method] + flags, cwd=ROOT,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))
    deadline, workers = time.time() + 120, []
    while time.time() < deadline and proc.poll() is None:
        workers = _children(proc.pid)
        if len(workers) >= 2 and list((store / "shards").glob("*.json")):
            break
        time.sleep(0.05)
    assert len(workers) >= 2 and proc.poll() is None, "the workers never started"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 15
    while time.time() < deadline and any(_alive(w) for w in workers):
        time.sleep(0.1)
    assert not [w for w in workers if _alive(w)], "workers outlived the killed parent"
    assert not (store / MANIFEST).exists()
    make_store(config, str(store), num_workers=2)
    assert store_bytes(str(store)) == store_bytes(str(tmp_path / "whole"))


@pytest.mark.e2e
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_zombie_writer_counts_as_exited(tmp_path):
    """Where PID 1 reaps no orphans, a killed prepare's workers stay zombies: their temporary
    files are still orphans and their locks stale (kill(pid, 0) alone calls them alive)."""
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # not waited for: a zombie
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.time() + 60
        while time.time() < deadline and _alive(zombie.pid):
            time.sleep(0.05)
        assert os.path.exists(f"/proc/{zombie.pid}") and not _alive(zombie.pid)
        paths = {}
        for name, proc in [("zombie", zombie), ("live", live)]:  # as if each had written one
            fd, ours = files.temp_file(str(tmp_path), "shard")
            os.close(fd)
            paths[name] = ours.replace(f"~{os.getpid()}~", f"~{proc.pid}~")
            os.rename(ours, paths[name])
        assert files.remove_orphaned_temp_files(str(tmp_path)) == 1
        assert not os.path.exists(paths["zombie"]) and os.path.exists(paths["live"])
        host = {"host": socket.gethostname()}
        assert files.holder_is_gone({**host, "pid": zombie.pid}) is True
        assert files.holder_is_gone({**host, "pid": live.pid}) is False
    finally:
        live.kill()
        live.wait()
        zombie.wait()


def test_jsonl_gz_zst_and_parquet_sources(tmp_path):
    texts = [f"document {i}: " + "héllo wörld 😀 " * (i % 7) for i in range(60)]
    lines = "".join(json.dumps({"text": t, "n": i}) + "\n" for i, t in enumerate(texts)).encode()
    (tmp_path / "gz").mkdir()
    (tmp_path / "zst").mkdir()
    (tmp_path / "pq").mkdir()
    (tmp_path / "gz" / "x.jsonl.gz").write_bytes(gzip.compress(lines))
    (tmp_path / "zst" / "x.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"body": texts, "n": list(range(60))}),
                   str(tmp_path / "pq" / "x.parquet"), row_group_size=16)
    tok = data.ByteTokenizer()
    for name, source, field in [("gz", "jsonl", "text"), ("zst", "jsonl", "text"),
                                ("pq", "parquet", "body")]:
        config = jsonl_config(tmp_path, str(tmp_path / name), source=source, text_field=field)
        stats = make_store(config, str(tmp_path / f"store-{name}"), num_workers=1)
        assert stats["pieces"] == (4 if source == "parquet" else 1)  # row groups / one stream
        store = data.open_store(str(tmp_path / f"store-{name}"))
        got = [doc for split in store.splits
               for doc in split_documents(store.tokens(split).to_numpy(), tok)]
        assert sorted(got) == sorted(texts), name


def test_bad_sources_are_one_line_errors(tmp_path):
    good = json.dumps({"text": "fine"}) + "\n"
    cases = {
        "bad.jsonl": (good * 3 + "{not json\n", r"bad.jsonl:4: not a JSON object"),
        "field.jsonl": (good + json.dumps({"body": "x"}) + "\n",
                        r"field.jsonl:2: no 'text' field \(has: body\); set data.text_field"),
        "type.jsonl": (good + json.dumps({"text": 3}) + "\n", r"type.jsonl:2: field 'text' is"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content * 1)
        config = jsonl_config(tmp_path, str(tmp_path / name))
        config.data.shard_mb = 1e-5  # the bad line lies in a later byte range
        with pytest.raises(DataError, match=message) as e:
            make_store(config, str(tmp_path / f"s-{name}"), num_workers=2)
        assert "\n" not in str(e.value)
        assert not list((tmp_path / f"s-{name}" / "shards").glob(".shard-*"))  # no leftovers
    (tmp_path / "latin1.jsonl").write_bytes(good.encode() + b'{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match="latin1.jsonl:2: the line is not UTF-8 text"):
        make_store(jsonl_config(tmp_path, str(tmp_path / "latin1.jsonl")),
                   str(tmp_path / "s-latin1"), num_workers=1)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="the corpus jsonl is empty"):
        make_store(jsonl_config(tmp_path, str(tmp_path / "empty.jsonl")),
                   str(tmp_path / "s-empty"), num_workers=1)
    with pytest.raises(DataError, match="the nope:// file system is not available"):
        make_store(jsonl_config(tmp_path, "nope://bucket/x.jsonl"), str(tmp_path / "s-nope"))


def test_store_errors_name_the_store(tmp_path, corpus):
    folder, _ = corpus
    config = jsonl_config(tmp_path, str(folder))
    make_store(config, str(tmp_path / "s"), num_workers=1)
    config.data.tokenizer = "char"
    with pytest.raises(DataError, match="holds a byte tokenizer but data.tokenizer='char'"):
        make_store(config, str(tmp_path / "s"), num_workers=1)
    with pytest.raises(DataError, match="is not a token store"):
        data.open_store(str(tmp_path / "nothing"))
    remote_cache = jsonl_config(tmp_path, str(folder), cache_dir="memory://cache")
    with pytest.raises(DataError, match="data.cache_dir='memory://cache' is remote"):
        data.prepare_cached(typed(remote_cache).data, data.ByteTokenizer())  # never "memory:"
    os.remove(tmp_path / "s" / MANIFEST)
    with pytest.raises(DataError, match="not finished .* run `gpt-jax prepare` again"):
        dataset(str(tmp_path / "s"))


def test_memory_filesystem_store_trains_like_a_local_one(tmp_path, corpus, monkeypatch):
    folder, _ = corpus
    config = jsonl_config(tmp_path, str(folder))
    make_store(config, str(tmp_path / "local"), num_workers=1)
    make_store(config, "memory://stores/mem", num_workers=1)  # workers share no memory fs
    memory = fsspec.filesystem("memory")
    assert memory.exists("/stores/mem/manifest.json")
    local = dataset(str(tmp_path / "local"))
    remote = dataset("memory://stores/mem")
    for step in range(3):
        np.testing.assert_array_equal(local.host_batch(step, 8, T, 0)["inputs"],
                                      remote.host_batch(step, 8, T, 0)["inputs"])
    # a damaged remote shard is caught by its checksum when copied (fresh local cache)
    name = remote.store.info("train")["shards"][0]["file"]
    memory.pipe_file(f"/stores/mem/shards/{name}", b"\x00\x00" * 10)
    monkeypatch.setenv("GPT_JAX_CACHE", str(tmp_path / "other-cache"))
    with pytest.raises(DataError, match="does not match the sha256 in its manifest"):
        dataset("memory://stores/mem")
    memory.rm("/stores", recursive=True)


def one_letter_store(tmp_path, letter: str) -> str:
    path = tmp_path / f"{letter}.jsonl"
    path.write_text("".join(json.dumps({"text": letter * 200}) + "\n" for _ in range(40)))
    store = str(tmp_path / f"store_{letter}")
    make_store(jsonl_config(tmp_path, str(path), validation_fraction=0.2), store, num_workers=1)
    return store


def test_mixture_weights_are_exact_and_batches_are_f_of_seed_and_step(tmp_path):
    a, b = one_letter_store(tmp_path, "a"), one_letter_store(tmp_path, "b")
    mix = mixture(f"{a}=1,{b}=3")
    batch, steps = 8, 50
    rows = np.concatenate([mix.host_batch(s, batch, T, 0)["inputs"] for s in range(steps)])
    from_a = (rows == ord("a")).any(axis=1)
    assert from_a.sum() == steps * batch // 4  # 1:3 exactly, over whole steps
    assert not ((rows == ord("a")) & (rows == ord("b"))).any()
    per_step = from_a.reshape(steps, batch).sum(axis=1)
    assert set(per_step) == {2}  # 8 rows x 0.25
    fresh = mixture(f"{a}=1,{b}=3")  # a resumed run
    halves = [fresh.host_batch(17, batch, T, 0, i, 2)["inputs"] for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), rows[17 * batch:18 * batch])
    assert mix.tokens_seen(steps, batch, T) == {"tokens_store_a": steps * 2 * T,
                                                "tokens_store_b": steps * 6 * T}
    odd = mixture(f"{a}=0.3,{b}=0.7")
    counts = odd.taken(1000 * 8)
    assert counts.tolist() == [2400, 5600]
    val = next(mix.eval_batches(1, batch, T))["inputs"]
    assert (val == ord("a")).any(axis=1).sum() == 2


def test_a_live_builders_lock_is_never_stale(tmp_path, monkeypatch):
    lock = tmp_path / "x.lock"
    lock.write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid()}))
    old = time.time() - 10 * files.STALE_LOCK_SECONDS
    os.utime(lock, (old, old))
    assert not files._lock_is_stale(str(lock))  # alive, however long ago it was touched
    monkeypatch.setattr(files, "HEARTBEAT_SECONDS", 0.05)
    other = tmp_path / "y.lock"
    with files.build_lock(str(other)) as held:
        assert held
        os.utime(other, (old, old))
        time.sleep(0.3)
        assert time.time() - os.path.getmtime(other) < 5  # the thread touched it
    assert not other.exists()


def test_tfds_by_name_is_read_record_by_record_into_shards(tmp_path):
    import tensorflow_datasets as tfds

    from gpt_jax.data.tfds_source import open_tfds

    config = jsonl_config(tmp_path, "", source="tfds", tfds_name="tiny_shakespeare",
                          shard_docs=2, data_dir=str(tmp_path / "tfds"))
    with tfds.testing.mock_data(num_examples=5):
        texts = list(open_tfds(typed(config).data).texts("train"))
        stats = make_store(config, str(tmp_path / "s"), num_workers=1)
    assert stats["pieces"] == 6  # 3 record ranges of 2 per split
    store = data.open_store(str(tmp_path / "s"))
    assert split_documents(store.tokens("train").to_numpy(), data.ByteTokenizer()) == texts


@pytest.mark.e2e
def test_training_on_a_mixture_logs_tokens_per_store(tmp_path):
    from gpt_jax import config as config_lib
    from gpt_jax import train as train_lib

    a, b = one_letter_store(tmp_path, "a"), one_letter_store(tmp_path, "b")
    config = config_lib.load_preset("tiny")
    config.data.store = f"{a}=1,{b}=3"
    config.train.update(num_steps=4, log_every=2, eval_every=4, eval_batches=1)
    train_lib.train(config, str(tmp_path / "run"))
    logged = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    seen = [r for r in logged if "tokens_store_a" in r]
    batch, seq = config.train.global_batch_size, config.model.block_size
    assert [r["step"] for r in seen] == [2, 4]
    assert seen[-1]["tokens_store_a"] == 4 * batch * seq // 4
    assert seen[-1]["tokens_store_b"] == 4 * batch * seq * 3 // 4


def test_a_tokenizer_trained_on_jsonl_documents(tmp_path, corpus):
    from gpt_jax.data.documents import split_texts

    folder, texts = corpus
    config = jsonl_config(tmp_path, str(folder), tokenizer="char")
    make_store(config, str(tmp_path / "s"), num_workers=1)
    tok = data.load_tokenizer(str(tmp_path / "s"))
    train_texts = list(split_texts(typed(config).data))
    assert tok.kind == "char" and tok.chars == "".join(sorted(set("".join(train_texts))))
    assert 0.75 * len(texts) < len(train_texts) < len(texts)
    expected = [i for t in train_texts for i in [tok.bos_id] + tok.encode(t) + [tok.eos_id]]
    store = data.open_store(str(tmp_path / "s"), tok)
    assert store.tokens("train").to_numpy().tolist() == expected


def test_a_store_repairs_a_lost_shard_and_refuses_another_build(tmp_path, corpus):
    folder, _ = corpus
    config = jsonl_config(tmp_path, str(folder))
    store = tmp_path / "s"
    first = make_store(config, str(store), num_workers=1)
    whole = store_bytes(str(store))
    lost = sorted((store / "shards").glob("*.train.tokens"))[2]
    lost.unlink()
    again = make_store(config, str(store), num_workers=1)
    assert again["built"] == 1 and first["built"] == again["pieces"]
    assert store_bytes(str(store)) == whole
    other = jsonl_config(tmp_path, str(folder), shard_mb=0.05)  # another cut of the corpus
    (store / MANIFEST).unlink()
    with pytest.raises(DataError, match="belongs to another build of this store"):
        make_store(other, str(store), num_workers=1)


def test_a_store_refuses_a_config_naming_another_tokenizer(tmp_path, corpus):
    from test_convert_hf import write_bpe_files

    folder, _ = corpus
    for name, merges in (("bpe_a", 40), ("bpe_b", 20)):
        (tmp_path / name).mkdir()
        write_bpe_files(tmp_path / name, n_merges=merges)
    config = jsonl_config(tmp_path, str(folder), tokenizer="gpt2_bpe",
                          bpe_dir=str(tmp_path / "bpe_a"))
    d = typed(config).data
    prepare_lib.prepare(d, str(tmp_path / "s"),
                        prepare_lib.store_tokenizer(d, 4096, str(tmp_path / "s")), num_workers=1)
    config.data.bpe_dir = str(tmp_path / "bpe_b")
    with pytest.raises(DataError, match="prepared with another gpt2_bpe tokenizer"):
        prepare_lib.store_tokenizer(typed(config).data, 4096, str(tmp_path / "s"))


def test_mixture_batch_too_small_and_paths_with_equals_signs(tmp_path):
    stores = [one_letter_store(tmp_path, c) for c in "abcd"]
    mix = mixture(",".join(stores))
    with pytest.raises(DataError, match="global_batch_size=2 is too small .* at least 12"):
        mix.host_batch(1, 2, T, 0)
    assert mix.host_batch(1, 12, T, 0)["inputs"].shape == (12, T)
    assert files.store_paths("gs://b/year=2024/s=0.5,gs://b/k=v") == [
        ("gs://b/year=2024/s", 0.5 / 1.5), ("gs://b/k=v", 1 / 1.5)]


def test_json_objects_keep_unicode_line_separators_inside_strings(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(json.dumps({"text": "a\u2028b\x85c"}, ensure_ascii=False).encode() + b"\n")
    assert list(files.json_objects(str(path))) == [(f"{path}:1", {"text": "a\u2028b\x85c"})]
