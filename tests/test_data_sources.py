"""Corpora: text_files and python_stdlib TFDS builders, TFDS names (mocked), bad input."""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sysconfig

import pytest
import tensorflow_datasets as tfds

from gpt_jax import data
from gpt_jax.config import base_config
from gpt_jax.data import sources
from test_data_common import make_config, private_cache, write_corpus  # noqa: F401


def _docs(corpus, split):
    return {r["path"].decode() if isinstance(r["path"], bytes) else r["path"]: t
            for r, t in zip(corpus.split(split), corpus.texts(split))}


def test_text_files_split_is_disjoint_complete_and_stable(tmp_path):
    texts = write_corpus(tmp_path / "a", n_files=20)
    corpus = data.open_corpus(make_config(tmp_path, str(tmp_path / "a")).data)
    train, val = _docs(corpus, "train"), _docs(corpus, "validation")
    assert train and val and not set(train) & set(val)
    assert {**train, **val} == texts  # every file once, its text unchanged
    # Moving the corpus elsewhere keeps each file's split (it depends on relative paths only).
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    moved = data.open_corpus(make_config(tmp_path, str(tmp_path / "elsewhere" / "b")).data)
    assert set(_docs(moved, "validation")) == set(val)
    assert corpus.builder.info.metadata["num_files"] == 20


def test_preparing_a_local_corpus_prints_one_line_of_ours(tmp_path, capfd):
    write_corpus(tmp_path / "q", n_files=6)
    size = sum(os.path.getsize(p) for p in glob.glob(str(tmp_path / "q" / "**" / "*.txt"),
                                                      recursive=True))
    capfd.readouterr()
    data.open_corpus(make_config(tmp_path, str(tmp_path / "q")).data)
    out, err = capfd.readouterr()
    assert out.startswith("preparing corpus text_files (6 files), "
                          f"{size / 1e6:.1f} MB ... done in ") and out.count("\n") == 1
    assert not any(noise in out + err for noise in ("Downloading and preparing", "Shuffling",
                                                    "Generating", "downloaded and prepared"))
    data.open_corpus(make_config(tmp_path, str(tmp_path / "q")).data)  # prepared: silent
    assert capfd.readouterr() == ("", "")


def test_text_files_dirs_globs_and_extensions(tmp_path):
    write_corpus(tmp_path / "c", n_files=3, ext=".md")
    write_corpus(tmp_path / "c" / "py", n_files=3, ext=".py")
    (tmp_path / "c" / "skip.bin").write_bytes(b"\x00\x01")
    found = sources.resolve_text_files(str(tmp_path / "c"), ".md,py")
    assert len(found) == 6 and not any(f.endswith(".bin") for f, _ in found)
    assert len(sources.resolve_text_files(str(tmp_path / "c" / "**" / "*.py"), ".md")) == 3
    one = str(tmp_path / "c" / "doc01.md")
    both = sources.resolve_text_files(f"{one}, {one},{tmp_path / 'c' / 'py'}", ".py")
    assert len(both) == 4  # deduplicated


def test_single_file_is_cut_at_a_line_boundary(tmp_path):
    text = "".join(f"line {i} ☃\n" for i in range(100))
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    corpus = data.open_corpus(make_config(tmp_path, str(tmp_path / "input.txt"),
                                          validation_fraction=0.1).data)
    (train,), (val,) = list(corpus.texts("train")), list(corpus.texts("validation"))
    assert train + val == text and train.endswith("\n") and val.startswith("line ")
    assert 0.05 < len(val) / len(text) < 0.15


def test_changed_files_give_a_new_build(tmp_path):
    write_corpus(tmp_path / "a", n_files=4)
    config = make_config(tmp_path, str(tmp_path / "a"))
    first = data.open_corpus(config.data)
    (tmp_path / "a" / "new.txt").write_text("a new file\n")
    second = data.open_corpus(config.data)
    assert second.fingerprint != first.fingerprint
    assert str(second.builder.data_path) != str(first.builder.data_path)
    assert "a new file\n" in list(second.texts("train")) + list(second.texts("validation"))


def test_invalid_utf8_is_replaced_counted_and_warned(tmp_path, caplog):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.txt").write_bytes(b"ok \xff\xfe end \xc3\n")
    (tmp_path / "c" / "good.txt").write_text("fine\n")
    corpus = data.open_corpus(make_config(tmp_path, str(tmp_path / "c"),
                                          validation_fraction=0.01).data)
    texts = list(corpus.texts("train")) + list(corpus.texts("validation"))
    assert b"ok \xff\xfe end \xc3\n".decode("utf-8", "replace") in texts
    assert any("3 invalid UTF-8" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("paths, message", [
    ("{tmp}/missing", "data.paths entry .*missing.* does not exist"),
    ("{tmp}/*.nothing", "glob .*nothing.* matches no files"),
    ("{tmp}/emptydir", "has no files ending in"),
    (" , ", "data.paths is empty"),
])
def test_bad_paths_are_one_line_errors(tmp_path, paths, message):
    (tmp_path / "emptydir").mkdir()
    config = make_config(tmp_path, paths.format(tmp=tmp_path))
    with pytest.raises(data.DataError, match=message) as e:
        data.open_corpus(config.data)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "tfds").exists() or not any((tmp_path / "tfds").rglob("*.array_record*"))


def test_missing_path_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        data.open_corpus(make_config(tmp_path, str(tmp_path / "nope.txt")).data)


def test_python_stdlib_subset_and_metadata(tmp_path):
    config = make_config(tmp_path, "", source="python_stdlib", max_files=8)
    corpus = data.open_corpus(config.data)
    meta = corpus.builder.info.metadata
    assert meta["python_version"] == platform.python_version() and meta["num_files"] == 8
    names = set(_docs(corpus, "train")) | set(_docs(corpus, "validation"))
    root = sysconfig.get_paths()["stdlib"]
    everything = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    expected = [os.path.relpath(f, root) for f in everything
                if not {"site-packages", "test", "tests", "idle_test", "__pycache__"}
                & set(os.path.relpath(f, root).split(os.sep))][:8]
    assert names == set(expected)  # the first files in sorted order
    # Reopening finds the prepared copy (same config name, nothing rebuilt).
    assert str(data.open_corpus(config.data).builder.data_path) == str(corpus.builder.data_path)


def test_python_stdlib_default_excludes_tests(tmp_path):
    files = sources.stdlib_files(include_tests=False)
    with_tests = sources.stdlib_files(include_tests=True)
    assert len(files) > 300 and len(with_tests) > len(files)
    assert not any(part in ("test", "tests", "idle_test")
                   for _, rel in files for part in rel.split(os.sep)[:-1])
    assert all(rel.endswith(".py") and "site-packages" not in rel for _, rel in files)
    size = sum(os.path.getsize(f) for f, _ in files)
    assert 4e6 < size < 40e6  # ~12 MB on CPython 3.11


def test_tfds_by_name_mocked(tmp_path):
    config = make_config(tmp_path, "", source="tfds", tfds_name="tiny_shakespeare")
    with tfds.testing.mock_data(num_examples=3):
        corpus = data.open_corpus(config.data)
        texts = list(corpus.texts("train"))
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    assert corpus.name == "tfds_tiny_shakespeare"


def test_tfds_unknown_name_and_field(tmp_path):
    config = make_config(tmp_path, "", source="tfds", tfds_name="tiny_shakespere")
    with pytest.raises(data.DataError, match="not a registered TFDS dataset; did you mean "
                                             "tiny_shakespeare") as e:
        data.open_corpus(config.data)
    assert "\n" not in str(e.value)
    config.data.update(tfds_name="tiny_shakespeare", text_field="body")
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(data.DataError, match="text_field='body' .* available: text"):
            data.open_corpus(config.data)


def test_the_real_default_corpus(tmp_path):
    config = base_config()
    config.data.data_dir = str(tmp_path / "tfds")
    corpus = data.open_corpus(config.data)
    meta = corpus.builder.info.metadata
    assert meta["num_files"] == len(sources.stdlib_files(False))
    assert meta["python_version"] == platform.python_version()
    n_train, n_val = len(corpus.split("train")), len(corpus.split("validation"))
    assert n_train + n_val == meta["num_files"] and 0 < n_val < 0.05 * meta["num_files"]
