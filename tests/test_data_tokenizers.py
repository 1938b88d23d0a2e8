"""Tokenizers: round trips on Unicode text, special tokens, saving with a run, bad input."""

from __future__ import annotations

import threading

import pytest
import sentencepiece as spm

from gpt_jax import data
from gpt_jax.data import tokenizers
from gpt_jax.errors import DataError
from test_data_common import make_config, make_text, private_cache, tok_args, write_corpus  # noqa: F401

UNICODE = "def f(x):\n    return 'héllo wörld ☃ 中文 😀'\n\n\tz  =  1  # naïve λ\n"


@pytest.fixture(scope="module")
def spm_tok():
    texts = [make_text(i, 60) for i in range(20)]
    return tokenizers.train_sentencepiece(texts, vocab_size=360, max_bytes=200_000,
                                          specials=["<|im_start|>", "<|im_end|>"])


def test_byte_round_trip_and_ids():
    tok = data.ByteTokenizer()
    assert tok.encode(UNICODE) == list(UNICODE.encode("utf-8"))
    assert tok.decode(tok.encode(UNICODE)) == UNICODE
    assert tok.vocab_size == 259
    assert {tok.bos_id, tok.eos_id, tok.pad_id} == {256, 257, 258}
    assert tok.decode([tok.bos_id] + tok.encode("ab") + [tok.eos_id, tok.pad_id]) == "ab"


def test_char_vocab_from_corpus_and_round_trip():
    tok = data.CharTokenizer.from_texts(["hello", UNICODE])
    assert tok.vocab_size == 4 + len(set("hello" + UNICODE))
    ids = tok.encode(UNICODE)
    assert len(ids) == len(UNICODE) and min(ids) >= 4
    assert tok.decode(ids) == UNICODE
    assert tok.encode("hé?") == [tok.encode("h")[0], tok.encode("é")[0], tok.unk_id]  # ? unseen
    assert [list(a) for a in tok.encode_batch(["he", "llo"])] == [tok.encode("he"),
                                                                   tok.encode("llo")]


def test_sentencepiece_round_trip_specials_and_byte_fallback(spm_tok):
    assert spm_tok.vocab_size == 360
    assert (spm_tok.sp.unk_id(), spm_tok.bos_id, spm_tok.eos_id, spm_tok.pad_id) == (0, 1, 2, 3)
    assert spm_tok.decode(spm_tok.encode(UNICODE)) == UNICODE
    unseen = "Ж ü 🚀 ¿"  # characters absent from the training text: byte pieces
    assert spm_tok.decode(spm_tok.encode(unseen)) == unseen
    ids = spm_tok.encode("a<|im_start|>b")
    assert spm_tok.sp.piece_to_id("<|im_start|>") in ids
    assert spm_tok.decode([spm_tok.bos_id] + spm_tok.encode("abc") + [spm_tok.eos_id]) == "abc"


def test_sentencepiece_vocab_too_large_is_one_line_error():
    with pytest.raises(DataError, match=r"model.vocab_size=5000 is larger .*at most \d+"):
        tokenizers.train_sentencepiece(["tiny text here\n"] * 3, vocab_size=5000)
    with pytest.raises(DataError, match="vocab_size=100 is below"):
        tokenizers.train_sentencepiece(["x"], vocab_size=100)


def test_build_tokenizer_trains_saves_and_loads(tmp_path):
    corpus = tmp_path / "corpus"
    write_corpus(corpus)
    config = make_config(tmp_path, str(corpus), tokenizer="sentencepiece")
    config.model.vocab_size = 320
    workdir = str(tmp_path / "run")
    tok = data.build_tokenizer(*tok_args(config), workdir, process_index=0)
    again = data.load_tokenizer(workdir)  # nothing but the run directory
    assert (again.vocab_size, again.fingerprint) == (320, tok.fingerprint)
    assert again.decode(again.encode(UNICODE)) == UNICODE
    config.model.vocab_size = 999  # a resumed run loads, never retrains
    assert data.build_tokenizer(*tok_args(config), workdir, process_index=0).fingerprint == tok.fingerprint


def test_char_tokenizer_saved_with_run(tmp_path):
    corpus = tmp_path / "corpus"
    texts = write_corpus(corpus, n_files=4)
    config = make_config(tmp_path, str(corpus), tokenizer="char")
    tok = data.build_tokenizer(*tok_args(config), str(tmp_path / "run"), process_index=0)
    loaded = data.load_tokenizer(str(tmp_path / "run"))
    assert loaded.chars == tok.chars and set(tok.chars) <= set("".join(texts.values()))


def test_only_process_0_builds_the_others_wait(tmp_path):
    config = make_config(tmp_path, "unused", tokenizer="byte")
    workdir = str(tmp_path / "run")
    result = {}
    waiter = threading.Thread(target=lambda: result.update(
        tok=data.build_tokenizer(*tok_args(config), workdir, process_index=1, timeout_s=30)))
    waiter.start()
    waiter.join(timeout=1.0)
    assert waiter.is_alive() and not tokenizers.is_saved(workdir)  # process 1 waits
    data.build_tokenizer(*tok_args(config), workdir, process_index=0)
    waiter.join(timeout=30)
    assert result["tok"].kind == "byte"


def test_load_existing_spm_model(tmp_path, spm_tok):
    path = tmp_path / "m.model"
    path.write_bytes(spm_tok.model_bytes)
    config = make_config(tmp_path, "unused", tokenizer="sentencepiece", spm_model=str(path))
    tok = data.build_tokenizer(*tok_args(config), str(tmp_path / "run"), process_index=0)
    reference = spm.SentencePieceProcessor(model_file=str(path))
    assert tok.encode(UNICODE) == reference.encode(UNICODE)


def test_bad_tokenizer_inputs(tmp_path):
    config = make_config(tmp_path, "unused", tokenizer="sentencepiece",
                         spm_model=str(tmp_path / "nope.model"))
    with pytest.raises(FileNotFoundError, match="data.spm_model=.*nope.model.* does not exist"):
        data.build_tokenizer(*tok_args(config), str(tmp_path / "run"), process_index=0)
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        data.load_tokenizer(str(tmp_path / "empty"))
    data.build_tokenizer(*tok_args(make_config(tmp_path, "x")), str(tmp_path / "run2"), process_index=0)
    with pytest.raises(DataError, match="holds a byte tokenizer but data.tokenizer='char'"):
        data.build_tokenizer(*tok_args(make_config(tmp_path, "x", tokenizer="char")), str(tmp_path / "run2"), process_index=0)
