"""Token store, packing, determinism across restarts and process layouts, sharded batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from gpt_jax import data
from gpt_jax.axes import LogicalRules
from gpt_jax.config import typed
from gpt_jax.data import documents
from gpt_jax.data.store import MANIFEST
from gpt_jax.errors import DataError
from gpt_jax.run import open_data
from gpt_jax.sharding import MeshConfig, batch_sharding
from test_data_common import make_config, private_cache, write_corpus  # noqa: F401

RULES = LogicalRules()

T = 16  # seq_len


@pytest.fixture
def setup(tmp_path):
    texts = write_corpus(tmp_path / "corpus", n_files=10, lines=30)
    config = make_config(tmp_path, str(tmp_path / "corpus"))
    tok = data.ByteTokenizer()
    return config, tok, texts


def open_split(config, tok, split: str):
    return open_data(typed(config), tok, split)


def source_order(config, split: str) -> list[str]:
    """The relative paths of a text corpus's split, in the order its documents are read."""
    return [rel for piece in documents.plan(typed(config).data).pieces if piece.split == split
            for _, rel, _ in piece.docs]


def reference_tokens(config, split, texts, tok) -> list[int]:
    """Plain-python packing of the split: bos + utf-8 bytes + eos per file, in source order."""
    out = []
    for rel in source_order(config, split):
        out += [tok.bos_id] + list(texts[rel].encode("utf-8")) + [tok.eos_id]
    return out


def test_cache_matches_plain_python_packing(setup):
    config, tok, texts = setup
    for split in ("train", "validation"):
        ds = open_split(config, tok, split)
        assert ds.tokens.to_numpy().tolist() == reference_tokens(config, split, texts, tok)
        assert ds.tokens.dtype == np.uint16


def test_an_epoch_covers_every_window_once_and_targets_are_shifted(setup):
    config, tok, texts = setup
    ds = open_split(config, tok, "train")
    flat = reference_tokens(config, "train", texts, tok)
    windows = (len(flat) - 1) // T
    batch = 4
    steps = -(-windows // batch)
    rows = [ds.host_batch(s, batch, T, 0) for s in range(steps)]
    inputs = np.concatenate([r["inputs"] for r in rows])[:windows]
    targets = np.concatenate([r["targets"] for r in rows])[:windows]
    assert inputs.shape == (windows, T) and inputs.dtype == np.int32
    got = sorted(map(tuple, inputs.tolist()))
    slack = len(flat) - 1 - windows * T
    offsets = [o for o in range(slack + 1)
               if got == sorted(tuple(flat[o + i * T:o + (i + 1) * T]) for i in range(windows))]
    assert len(offsets) >= 1, "an epoch is not a permutation of contiguous windows"
    for x, y in zip(inputs.tolist(), targets.tolist()):
        start = next(i for i in range(len(flat)) if flat[i:i + T] == x)
        assert y == flat[start + 1:start + T + 1]
    second = np.concatenate([ds.host_batch(s, batch, T, 0)["inputs"]
                             for s in range(steps, 2 * steps)])
    assert not np.array_equal(second[:windows // 2], inputs[:windows // 2])  # reshuffled


def test_different_seeds_give_different_batches(setup):
    config, tok, _ = setup
    ds = open_split(config, tok, "train")
    a = ds.host_batch(3, 8, T, seed=0)["inputs"]
    assert np.array_equal(a, ds.host_batch(3, 8, T, seed=0)["inputs"])
    assert not np.array_equal(a, ds.host_batch(3, 8, T, seed=1)["inputs"])


WORKER = textwrap.dedent("""
    import json, sys, numpy as np
    from gpt_jax import data
    from gpt_jax.config import from_json, typed
    from gpt_jax.run import open_data
    config = from_json(open(sys.argv[1]).read())
    ds = open_data(typed(config), data.ByteTokenizer(), "train")
    pi, pc, first, last, out = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), \\
        int(sys.argv[5]), sys.argv[6]
    b = [ds.host_batch(s, 8, 16, 0, pi, pc)["inputs"] for s in range(first, last)]
    np.save(out, np.stack(b))
""")


@pytest.mark.e2e
def test_fresh_processes_and_two_hosts_reproduce_the_stream(setup, tmp_path):
    config, tok, _ = setup
    ds = open_split(config, tok, "train")
    mesh = MeshConfig().make()
    with data.BatchLoader(ds, 8, T, config.train.seed, mesh, RULES, prefetch=2) as loader:
        uninterrupted = [np.asarray(b["inputs"]) for _, (_, b) in zip(range(12), loader)]
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    (tmp_path / "w.py").write_text(WORKER)
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=os.getcwd())
    runs = {"fresh": (0, 1), "host0": (0, 2), "host1": (1, 2)}
    procs = {name: subprocess.Popen(
        [sys.executable, str(tmp_path / "w.py"), str(tmp_path / "config.json"), str(pi),
         str(pc), "7", "12", str(tmp_path / f"{name}.npy")], env=env)
        for name, (pi, pc) in runs.items()}
    assert all(p.wait(timeout=90) == 0 for p in procs.values())
    got = {name: np.load(tmp_path / f"{name}.npy") for name in runs}
    expected = np.stack(uninterrupted[7:12])
    np.testing.assert_array_equal(got["fresh"], expected)  # resume at step 7
    np.testing.assert_array_equal(np.concatenate([got["host0"], got["host1"]], axis=1), expected)
    assert got["host0"].shape[1] == got["host1"].shape[1] == 4  # no row duplicated or dropped


def test_loader_builds_sharded_global_arrays_on_8_devices(setup):
    config, tok, _ = setup
    ds = open_split(config, tok, "train")
    config.mesh.update(data=4, fsdp=2)
    mesh = typed(config).mesh.make()
    assert len(jax.devices()) == 8
    loader = data.BatchLoader(ds, 16, T, seed=5, mesh=mesh, rules=RULES, start_step=3, prefetch=3)
    for want, (step, batch) in zip(range(3, 6), loader):
        assert step == want
        expected = ds.host_batch(step, 16, T, seed=5)
        for key in ("inputs", "targets"):
            array = batch[key]
            assert array.shape == (16, T) and array.sharding == batch_sharding(mesh)
            np.testing.assert_array_equal(np.asarray(array), expected[key])
            for shard in array.addressable_shards:  # each device holds its own 2 rows
                assert shard.data.shape == (2, T)
                np.testing.assert_array_equal(np.asarray(shard.data), expected[key][shard.index])
    assert loader.state() == {"step": 6, "seed": 5, "global_batch_size": 16, "seq_len": T,
                              "data": ds.fingerprint}
    loader.close()
    with pytest.raises(DataError, match="global_batch_size=12 is not divisible"):
        data.BatchLoader(ds, 12, T, seed=0, mesh=mesh, rules=RULES)


def test_loader_error_in_thread_reaches_the_consumer(setup):
    config, tok, _ = setup
    ds = open_split(config, tok, "train")
    loader = data.BatchLoader(ds, 8, T, 0, MeshConfig().make(), RULES, prefetch=2)

    def no_window_fits(*args):
        raise DataError("seq_len=16 is too long for the test split")

    # The producer fails from its next batch on; one attribute swap, so a gather already
    # running finishes on the real tokens (swapping `ds.tokens` could catch one half-way).
    ds.gather = no_window_fits
    with pytest.raises(DataError, match="seq_len=16 is too long"):
        for _ in zip(range(100), loader):
            pass
    loader.close()


def test_eval_batches_are_sequential_and_repeatable(setup):
    config, tok, texts = setup
    val = open_split(config, tok, "validation")
    flat = reference_tokens(config, "validation", texts, tok)
    windows = (len(flat) - 1) // T
    batches = list(val.eval_batches(None, 4, T))
    assert len(batches) == -(-windows // 4)
    inputs = np.concatenate([b["inputs"] for b in batches])
    for w in range(windows):
        assert inputs[w].tolist() == flat[w * T:(w + 1) * T]
    assert inputs[windows:].tolist() == [flat[w * T:(w + 1) * T]
                                         for w in range(len(inputs) - windows)]  # wraps
    halves = [list(val.eval_batches(2, 4, T, p, 2)) for p in range(2)]
    for b in range(2):
        joined = np.concatenate([halves[0][b]["inputs"], halves[1][b]["inputs"]])
        np.testing.assert_array_equal(joined, batches[b]["inputs"])


def test_too_many_eval_batches_are_cut_to_distinct_windows_with_one_notice(setup, monkeypatch):
    config, tok, texts = setup
    val = open_split(config, tok, "validation")
    flat = reference_tokens(config, "validation", texts, tok)
    windows = (len(flat) - 1) // T
    notices = []
    monkeypatch.setattr(data.loader.logging, "warning", lambda *a: notices.append(a[0] % a[1:]))
    asked = windows // 4 + 3
    for _ in range(2):  # two evaluations, one notice
        batches = list(val.eval_batches(asked, 4, T))
        assert len(batches) == windows // 4
        inputs = np.concatenate([b["inputs"] for b in batches])
        assert [r.tolist() for r in inputs] == [flat[w * T:(w + 1) * T]
                                                for w in range(4 * (windows // 4))]
    assert len(notices) == 1 and f"{windows} windows" in notices[0] and str(asked) in notices[0]
    assert len(list(val.eval_batches(windows // 4, 4, T))) == windows // 4
    assert len(notices) == 1  # settings that fit say nothing


def test_other_tokenizer_gets_its_own_store_and_a_damaged_shard_is_named(setup):
    config, tok, texts = setup
    byte_ds = open_split(config, tok, "validation")
    char = data.CharTokenizer.from_texts(texts.values())
    char_ds = open_split(config, char, "validation")
    assert char_ds.store.path != byte_ds.store.path
    expected = []
    for rel in source_order(config, "validation"):
        expected += [char.bos_id] + char.encode(texts[rel]) + [char.eos_id]
    assert char_ds.tokens.to_numpy().tolist() == expected
    shard = os.path.join(char_ds.store.path, "shards",
                         char_ds.store.info("validation")["shards"][0]["file"])
    with open(shard, "ab") as f:
        f.write(b"\xff\xff")
    with pytest.raises(DataError, match="not the .* tokens that .*manifest.json lists"):
        open_split(config, char, "validation")
    with pytest.raises(DataError, match="tokenized by a char tokenizer .* not this run's byte"):
        data.open_store(char_ds.store.path, tok)


def test_interrupted_build_leaves_no_manifest_and_is_finished_later(setup, monkeypatch):
    config, tok, texts = setup

    def dying_encode(batch, num_threads=1):
        raise KeyboardInterrupt  # e.g. the job was killed mid-build

    monkeypatch.setattr(tok, "encode_batch", dying_encode)
    with pytest.raises(KeyboardInterrupt):
        open_split(config, tok, "train")
    stores = os.listdir(config.data.cache_dir)
    store = os.path.join(config.data.cache_dir, next(s for s in stores if not s.endswith("lock")))
    assert not os.path.exists(os.path.join(store, MANIFEST))
    with pytest.raises(DataError, match="is not finished .* run `gpt-jax prepare` again"):
        data.open_store(store)
    monkeypatch.undo()
    ds = open_split(config, tok, "train")
    assert ds.tokens.to_numpy().tolist() == reference_tokens(config, "train", texts, tok)


def test_seq_len_longer_than_split_and_empty_corpus(tmp_path, setup):
    config, tok, _ = setup
    val = open_split(config, tok, "validation")
    with pytest.raises(DataError, match=f"seq_len={val.num_tokens} is too long for "
                                             "text_files/validation"):
        val.host_batch(0, 2, val.num_tokens, 0)
    (tmp_path / "empty").mkdir()
    for i in range(3):
        (tmp_path / "empty" / f"e{i}.txt").write_text("")
    empty = make_config(tmp_path, str(tmp_path / "empty"))
    with pytest.raises(DataError, match="split 'train' of text_files is empty"):
        open_split(empty, tok, "train")


def test_bytes_per_token_counts_utf8_bytes(tmp_path):
    """Byte tokenizer: tokens = UTF-8 bytes + BOS/EOS per document, so the ratio is exact."""
    from gpt_jax import config as config_lib
    from gpt_jax.data import ByteTokenizer

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = ["héllo wörld\n" * 50, "naïve café ☕\n" * 40]
    for i, text in enumerate(texts):
        (corpus / f"doc{i}.txt").write_text(text, encoding="utf-8")
    config = config_lib.load_preset("tiny")
    config.data.update(source="text_files", paths=str(corpus), tokenizer="byte",
                       cache_dir=str(tmp_path / "cache"),
                       data_dir=str(tmp_path / "tfds"))
    splits = [open_split(config, ByteTokenizer(), s) for s in ("train", "validation")]
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    assert sum(d.num_tokens for d in splits) == n_bytes + 2 * len(texts)
    for d in splits:  # each split: its bytes over its bytes + 2 (BOS, EOS) per document
        n_docs = 1
        assert d.bytes_per_token == pytest.approx((d.num_tokens - 2 * n_docs) / d.num_tokens)
