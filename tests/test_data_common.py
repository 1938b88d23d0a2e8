"""Helpers shared by the tests/test_data_*.py modules (small corpora in tmp_path), and a few
tests of the shared file helpers."""

from __future__ import annotations

import json
import os
import random

import pytest

from gpt_jax.config import base_config, typed
from gpt_jax.data import files

WORDS = ["héllo", "wörld", "☃", "中文", "naïve", "😀", "the", "cat", "def", "x", "=", "(",
         ")", "λ", "Ω", "and", "or", "print", "return", "\t", "  "]


def make_text(seed: int, lines: int = 40) -> str:
    rng = random.Random(seed)
    return "".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) + "\n"
                   for _ in range(lines))


def write_corpus(root, n_files: int = 12, lines: int = 40, ext: str = ".txt") -> dict[str, str]:
    """n_files text files under root (some in a subfolder); returns {relative path: text}."""
    texts = {}
    for i in range(n_files):
        rel = os.path.join("sub" if i % 3 == 0 else "", f"doc{i:02d}{ext}")
        path = os.path.join(str(root), rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        texts[rel] = make_text(i, lines)
        with open(path, "w", encoding="utf-8") as f:
            f.write(texts[rel])
    return texts


def make_config(tmp_path, paths: str, tokenizer: str = "byte", **data):
    config = base_config()
    d = config.data
    d.source, d.paths, d.tokenizer = "text_files", paths, tokenizer
    d.data_dir, d.cache_dir = str(tmp_path / "tfds"), str(tmp_path / "tokens")
    d.validation_fraction = 0.25
    d.update(data)
    return config


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Locks and default caches under tmp_path, never ~/.cache."""
    monkeypatch.setenv("GPT_JAX_CACHE", str(tmp_path / "cache"))


def test_atomic_write_leaves_no_temp_files(tmp_path):
    path = tmp_path / "a" / "f.json"
    files.atomic_write_json(str(path), {"x": 1})
    files.atomic_write_json(str(path), {"x": 2})
    assert json.loads(path.read_text()) == {"x": 2}
    assert os.listdir(tmp_path / "a") == ["f.json"]


def test_build_once_takes_over_a_dead_builders_lock(tmp_path):
    lock = tmp_path / "x.lock"
    dead_pid = 2 ** 22 + 12345  # above the usual pid_max: no such process
    lock.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": dead_pid}))
    built = []
    files.build_once(lambda: bool(built), lambda: built.append(1), str(lock), "x",
                     poll_seconds=0.01)
    assert built == [1] and not lock.exists()


def tok_args(config):
    """(data section, model.vocab_size) of a config: what build_tokenizer takes first."""
    config = typed(config)
    return config.data, config.model.vocab_size
