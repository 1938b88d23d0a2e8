"""Document sources: text files and the standard library, TFDS names (mocked), bad input."""

from __future__ import annotations

import glob
import os
import platform
import shutil
import sysconfig

import pytest
import tensorflow_datasets as tfds

from gpt_jax.config import base_config, typed
from gpt_jax.data import documents, files
from gpt_jax.data.tfds_source import open_tfds
from gpt_jax.errors import DataError
from test_data_common import make_config, private_cache, write_corpus  # noqa: F401


def _plan(config) -> documents.Plan:
    return documents.plan(typed(config).data)


def _docs(config, split: str) -> dict[str, str]:
    """{relative path: text} of a text corpus's `split`, in the order the store reads them."""
    d = typed(config).data
    out = {}
    for piece in documents.plan(d).pieces:
        if piece.split == split:
            texts = [text for _, text in documents.piece_documents(piece, d)]
            out.update({rel: text for (_, rel, _), text in zip(piece.docs, texts)})
    return out


def test_text_files_split_is_disjoint_complete_and_stable(tmp_path):
    texts = write_corpus(tmp_path / "a", n_files=20)
    config = make_config(tmp_path, str(tmp_path / "a"))
    train, val = _docs(config, "train"), _docs(config, "validation")
    assert train and val and not set(train) & set(val)
    assert {**train, **val} == texts  # every file once, its text unchanged
    # Moving the corpus elsewhere keeps each file's split (it depends on relative paths only).
    shutil.copytree(tmp_path / "a", tmp_path / "elsewhere" / "b")
    moved = make_config(tmp_path, str(tmp_path / "elsewhere" / "b"))
    assert list(_docs(moved, "validation")) == list(val)  # and its order
    assert _plan(config).metadata["num_files"] == 20


def test_text_files_are_read_in_a_fixed_shuffled_order(tmp_path):
    write_corpus(tmp_path / "a", n_files=20)
    config = make_config(tmp_path, str(tmp_path / "a"))
    order = list(_docs(config, "train"))
    assert order != sorted(order) and sorted(order) == sorted(set(order))
    assert list(_docs(config, "train")) == order


def test_text_files_dirs_globs_and_extensions(tmp_path):
    write_corpus(tmp_path / "c", n_files=3, ext=".md")
    write_corpus(tmp_path / "c" / "py", n_files=3, ext=".py")
    (tmp_path / "c" / "skip.bin").write_bytes(b"\x00\x01")
    (tmp_path / "c" / ".hidden.md").write_text("not me")
    found = files.list_files(str(tmp_path / "c"), (".md", ".py"))
    assert len(found) == 6 and not any(f.path.endswith((".bin", ".hidden.md")) for f in found)
    assert len(files.list_files(str(tmp_path / "c" / "**" / "*.py"), (".md",))) == 3
    one = str(tmp_path / "c" / "doc01.md")
    both = files.list_files(f"{one}, {one},{tmp_path / 'c' / 'py'}", (".py",))
    assert len(both) == 4  # deduplicated
    config = make_config(tmp_path, str(tmp_path / "c"), extensions=".md,py")
    assert _plan(config).metadata["num_files"] == 6


def test_single_file_is_cut_at_a_line_boundary(tmp_path):
    text = "".join(f"line {i} ☃\n" for i in range(100))
    (tmp_path / "input.txt").write_text(text, encoding="utf-8")
    config = make_config(tmp_path, str(tmp_path / "input.txt"), validation_fraction=0.1)
    (train,), (val,) = _docs(config, "train").values(), _docs(config, "validation").values()
    assert train + val == text and train.endswith("\n") and val.startswith("line ")
    assert 0.05 < len(val) / len(text) < 0.15


def test_changed_files_give_a_new_fingerprint(tmp_path):
    write_corpus(tmp_path / "a", n_files=4)
    config = make_config(tmp_path, str(tmp_path / "a"))
    first = _plan(config)
    (tmp_path / "a" / "new.txt").write_text("a new file\n")
    second = _plan(config)
    assert second.fingerprint != first.fingerprint
    assert "a new file\n" in list(_docs(config, "train").values()) + list(
        _docs(config, "validation").values())


def test_invalid_utf8_is_replaced_counted_and_warned(tmp_path, caplog):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "bad.txt").write_bytes(b"ok \xff\xfe end \xc3\n")
    (tmp_path / "c" / "good.txt").write_text("fine\n")
    config = make_config(tmp_path, str(tmp_path / "c"), validation_fraction=0.01)
    texts = list(_docs(config, "train").values()) + list(_docs(config, "validation").values())
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
    with pytest.raises(DataError, match=message) as e:
        _plan(config)
    assert "\n" not in str(e.value)


def test_missing_path_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError):
        _plan(make_config(tmp_path, str(tmp_path / "nope.txt")))


def stdlib_expected(include_tests: bool) -> list[str]:
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "__pycache__"} | (
        set() if include_tests else {"test", "tests", "idle_test"})
    everything = sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True))
    return [os.path.relpath(f, root) for f in everything
            if not skip & set(os.path.relpath(f, root).split(os.sep))
            and not any(p.startswith(".") for p in os.path.relpath(f, root).split(os.sep))]


def test_python_stdlib_subset_and_metadata(tmp_path):
    config = make_config(tmp_path, "", source="python_stdlib", max_files=8)
    meta = _plan(config).metadata
    assert meta["python_version"] == platform.python_version() and meta["num_files"] == 8
    names = set(_docs(config, "train")) | set(_docs(config, "validation"))
    assert names == set(stdlib_expected(False)[:8])  # the first files in sorted order


def test_python_stdlib_default_excludes_tests(tmp_path):
    name, found, _ = documents.text_files(typed(make_config(tmp_path, "",
                                                            source="python_stdlib")).data)
    _, with_tests, _ = documents.text_files(typed(make_config(
        tmp_path, "", source="python_stdlib", include_tests=True)).data)
    assert name == "python_stdlib" and len(found) > 300 and len(with_tests) > len(found)
    assert sorted(f.rel for f in found) == stdlib_expected(False)
    assert all(f.rel.endswith(".py") and "site-packages" not in f.rel for f in found)
    assert 4e6 < sum(f.size for f in found) < 40e6  # ~12 MB on CPython 3.11


def test_tfds_by_name_mocked(tmp_path):
    config = make_config(tmp_path, "", source="tfds", tfds_name="tiny_shakespeare")
    with tfds.testing.mock_data(num_examples=3):
        corpus = open_tfds(typed(config).data)
        texts = list(corpus.texts("train"))
    assert len(texts) == 3 and all(isinstance(t, str) and t for t in texts)
    assert corpus.name == "tfds_tiny_shakespeare"


def test_tfds_unknown_name_and_field(tmp_path):
    config = make_config(tmp_path, "", source="tfds", tfds_name="tiny_shakespere")
    with pytest.raises(DataError, match="not a registered TFDS dataset; did you mean "
                                        "tiny_shakespeare") as e:
        open_tfds(typed(config).data)
    assert "\n" not in str(e.value)
    config.data.update(tfds_name="tiny_shakespeare", text_field="body")
    with tfds.testing.mock_data(num_examples=2):
        with pytest.raises(DataError, match="text_field='body' .* available: text"):
            open_tfds(typed(config).data)


def test_the_real_default_corpus():
    plan = documents.plan(typed(base_config()).data)
    meta = plan.metadata
    assert meta["num_files"] == len(stdlib_expected(False))
    assert meta["python_version"] == platform.python_version()
    n_val = sum(len(p.docs) for p in plan.pieces if p.split == "validation")
    n_train = sum(len(p.docs) for p in plan.pieces if p.split == "train")
    assert n_train + n_val == meta["num_files"] and 0 < n_val < 0.05 * meta["num_files"]


def test_text_files_follow_the_order_the_tfds_builders_gave_them(tmp_path):
    """Stores of text files hold their documents as the replaced TFDS route did: sorted by
    TFDS's own hash of (split, key), so earlier stores' tokens are reproduced exactly."""
    from tensorflow_datasets.core import hashing

    write_corpus(tmp_path / "a", n_files=20)
    config = make_config(tmp_path, str(tmp_path / "a"))
    for split in ("train", "validation"):
        order = list(_docs(config, split))
        hasher = hashing.Hasher(split)
        assert order == sorted(order, key=lambda rel: hasher.hash_key(f"{rel}:all"))
