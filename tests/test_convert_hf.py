"""Hugging Face GPT-2 <-> gpt_jax conversion and the GPT-2 BPE tokenizer.

The first group needs only NumPy + safetensors (a HF-shaped directory written by hand and a
NumPy GPT-2 forward as the reference); the second compares against transformers itself and is
skipped where the `hf` extra (torch, transformers) is not installed.
"""

from __future__ import annotations

import collections
import inspect
import json
import random
import textwrap

import jax
import numpy as np
import pytest
import regex

from gpt_jax.data.files import DataError
from gpt_jax.data.gpt2_bpe import GPT2_PATTERN, GPT2BPETokenizer, bytes_to_unicode
from gpt_jax.hf import ConversionError, from_hf, load_hf, read_hf_weights, to_hf
from gpt_jax.hf.mapping import hf_from_params
from gpt_jax.model import GPT, ModelConfig

TRICKY_TEXT = ("Héllo  wörld!\n\n   x = 3.14  # 日本語 naïve   \t tabs<|endoftext|>it's "
               "we'll\u00a0nbsp\u2003em 😀 ３² end  \n")


def write_bpe_files(folder, n_merges: int = 60) -> int:
    """A small byte-level BPE (256 bytes + merges learned on textwrap.py + <|endoftext|>)."""
    b2u = bytes_to_unicode()
    counts = collections.Counter(regex.findall(GPT2_PATTERN, inspect.getsource(textwrap)))
    words = {w: [b2u[b] for b in w.encode()] for w in counts}
    vocab = {c: i for i, c in enumerate(b2u.values())}
    merges = []
    for _ in range(n_merges):
        pairs = collections.Counter()
        for w, s in words.items():
            for pair in zip(s, s[1:]):
                pairs[pair] += counts[w]
        best = max(pairs, key=lambda p: (pairs[p], p))
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        for w, s in words.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out, i = out + [s[i] + s[i + 1]], i + 2
                else:
                    out, i = out + [s[i]], i + 1
            words[w] = out
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return len(vocab)


def hf_config(vocab: int, n_layer=2, n_embd=32, n_head=2, n_positions=64, **extra) -> dict:
    return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": vocab,
            "n_layer": n_layer, "n_embd": n_embd, "n_head": n_head, "n_positions": n_positions,
            "n_ctx": n_positions, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
            "tie_word_embeddings": True, "bos_token_id": vocab - 1, "eos_token_id": vocab - 1,
            **extra}


def random_hf_tensors(cfg: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """HF-named GPT-2 tensors (Conv1D [in, out]) with random values, including the LN params."""
    rng = np.random.default_rng(seed)
    D, V, P, F = cfg["n_embd"], cfg["vocab_size"], cfg["n_positions"], 4 * cfg["n_embd"]
    r = lambda *shape: rng.normal(0, 0.2, shape).astype(np.float32)  # noqa: E731
    t = {"transformer.wte.weight": r(V, D), "transformer.wpe.weight": r(P, D),
         "transformer.ln_f.weight": 1 + r(D), "transformer.ln_f.bias": r(D)}
    for i in range(cfg["n_layer"]):
        p = f"transformer.h.{i}."
        t.update({p + "ln_1.weight": 1 + r(D), p + "ln_1.bias": r(D), p + "ln_2.weight": 1 + r(D),
                  p + "ln_2.bias": r(D), p + "attn.c_attn.weight": r(D, 3 * D),
                  p + "attn.c_attn.bias": r(3 * D), p + "attn.c_proj.weight": r(D, D),
                  p + "attn.c_proj.bias": r(D), p + "mlp.c_fc.weight": r(D, F),
                  p + "mlp.c_fc.bias": r(F), p + "mlp.c_proj.weight": r(F, D),
                  p + "mlp.c_proj.bias": r(D)})
    return t


def write_hf_dir(folder, cfg: dict, tensors: dict, tokenizer: bool = True) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    if tokenizer:
        write_bpe_files(folder)


def numpy_gpt2_logits(t: dict, cfg: dict, tokens_BT: np.ndarray) -> np.ndarray:
    """GPT-2's forward pass written directly on the HF tensors (the reference)."""
    t = {k.removeprefix("transformer."): v.astype(np.float64) for k, v in t.items()}
    H, eps = cfg["n_head"], cfg["layer_norm_epsilon"]
    ln = lambda x, p: (x - x.mean(-1, keepdims=True)) / np.sqrt(  # noqa: E731
        x.var(-1, keepdims=True) + eps) * t[p + ".weight"] + t[p + ".bias"]
    gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))  # noqa
    B, T = tokens_BT.shape
    x = t["wte.weight"][tokens_BT] + t["wpe.weight"][np.arange(T)]
    causal = np.tril(np.ones((T, T), bool))
    for i in range(cfg["n_layer"]):
        p = f"h.{i}."
        qkv = ln(x, p + "ln_1") @ t[p + "attn.c_attn.weight"] + t[p + "attn.c_attn.bias"]
        q, k, v = (a.reshape(B, T, H, -1).transpose(0, 2, 1, 3) for a in np.split(qkv, 3, -1))
        s = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1]), -np.inf)
        w = np.exp(s - s.max(-1, keepdims=True))
        o = ((w / w.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(B, T, -1)
        x = x + o @ t[p + "attn.c_proj.weight"] + t[p + "attn.c_proj.bias"]
        h = gelu(ln(x, p + "ln_2") @ t[p + "mlp.c_fc.weight"] + t[p + "mlp.c_fc.bias"])
        x = x + h @ t[p + "mlp.c_proj.weight"] + t[p + "mlp.c_proj.bias"]
    return ln(x, "ln_f") @ t["wte.weight"].T


def gpt_jax_logits(fields_or_cfg, params, tokens_BT) -> np.ndarray:
    cfg = fields_or_cfg if isinstance(fields_or_cfg, ModelConfig) else ModelConfig(
        **fields_or_cfg)
    return np.asarray(GPT(cfg).apply({"params": params}, jax.numpy.asarray(tokens_BT)))


# -- NumPy only ------------------------------------------------------------------------------

@pytest.mark.e2e
def test_safetensors_dir_converts_and_round_trips_exactly_without_torch(tmp_path):
    V = write_bpe_files(tmp_path)
    cfg = hf_config(V, n_layer=2, n_embd=48, n_head=4, n_positions=32, layer_norm_epsilon=1e-6)
    tensors = random_hf_tensors(cfg)
    write_hf_dir(tmp_path / "hf", cfg, tensors)

    import gpt_jax

    run = from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    lm = gpt_jax.load(run)
    assert lm.tokenizer.kind == "gpt2_bpe" and lm.model_cfg.norm_eps == 1e-6
    tokens_BT = np.random.default_rng(1).integers(0, V, (2, 32))
    np.testing.assert_allclose(gpt_jax_logits(lm.model_cfg, lm.params, tokens_BT),
                               numpy_gpt2_logits(tensors, cfg, tokens_BT), atol=1e-4, rtol=0)

    to_hf(run, str(tmp_path / "back"))
    back, _ = read_hf_weights(str(tmp_path / "back"))
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    saved = json.loads((tmp_path / "back" / "config.json").read_text())
    assert {k: saved[k] for k in ("n_layer", "n_embd", "n_head", "n_positions", "vocab_size",
                                  "layer_norm_epsilon")} == {
        "n_layer": 2, "n_embd": 48, "n_head": 4, "n_positions": 32, "vocab_size": V,
        "layer_norm_epsilon": 1e-6}
    assert (tmp_path / "back" / "merges.txt").read_bytes() == (tmp_path / "merges.txt").read_bytes()


def test_untied_head_and_stacked_layers_map_back(tmp_path):
    V = write_bpe_files(tmp_path)
    cfg = hf_config(V, n_layer=3, n_embd=32, n_head=2, tie_word_embeddings=False)
    tensors = random_hf_tensors(cfg, seed=3)
    tensors["lm_head.weight"] = np.random.default_rng(4).normal(0, 0.2, (V, 32)).astype(np.float32)
    write_hf_dir(tmp_path / "hf", cfg, tensors, tokenizer=False)
    fields, params = load_hf(str(tmp_path / "hf"))
    assert fields["tie_embeddings"] is False and params["lm_head"]["kernel"].shape == (32, V)
    stacked = {k: v for k, v in params.items() if not k.startswith("h_")}
    stacked["h"] = jax.tree.map(lambda *xs: np.stack(xs), *[params[f"h_{i}"] for i in range(3)])
    m = ModelConfig(**fields)
    for tree in (params, stacked):
        back = hf_from_params(tree, m)
        for name, value in tensors.items():
            np.testing.assert_array_equal(back[name], value, err_msg=name)


@pytest.mark.e2e
def test_padded_vocabulary_imports_padded_and_exports_exactly(tmp_path):
    import gpt_jax

    V = write_bpe_files(tmp_path)
    cfg = hf_config(V, n_layer=1, n_embd=32, n_head=2, n_positions=16)
    tensors = random_hf_tensors(cfg, seed=5)
    write_hf_dir(tmp_path / "hf", cfg, tensors)
    run = from_hf(str(tmp_path / "hf"), str(tmp_path / "run"), vocab_multiple=128)
    lm = gpt_jax.load(run)
    padded_V = -(-V // 128) * 128
    assert lm.model_cfg.vocab_size == V and lm.model_cfg.padded_vocab_size == padded_V > V
    assert lm.params["wte"]["embedding"].shape == (padded_V, 32)
    tokens_BT = np.random.default_rng(2).integers(0, V, (2, 16))
    logits_BTV = gpt_jax_logits(lm.model_cfg, lm.params, tokens_BT)
    assert np.all(logits_BTV[..., V:] == -np.inf)
    np.testing.assert_allclose(logits_BTV[..., :V], numpy_gpt2_logits(tensors, cfg, tokens_BT),
                               atol=1e-4, rtol=0)
    to_hf(run, str(tmp_path / "back"))
    back, _ = read_hf_weights(str(tmp_path / "back"))
    assert sorted(back) == sorted(tensors)
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)
    assert json.loads((tmp_path / "back" / "config.json").read_text())["vocab_size"] == V


def test_padded_untied_head_maps_back(tmp_path):
    cfg = hf_config(50, n_layer=1, tie_word_embeddings=False)
    tensors = random_hf_tensors(cfg, seed=6)
    tensors["lm_head.weight"] = np.random.default_rng(7).normal(0, 0.2, (50, 32)).astype(
        np.float32)
    write_hf_dir(tmp_path / "hf", cfg, tensors, tokenizer=False)
    fields, params = load_hf(str(tmp_path / "hf"), vocab_multiple=16)
    assert params["wte"]["embedding"].shape == (64, 32)
    assert params["lm_head"]["kernel"].shape == (32, 64)
    back = hf_from_params(params, ModelConfig(**fields))
    for name, value in tensors.items():
        np.testing.assert_array_equal(back[name], value, err_msg=name)


def test_bad_hf_directories_fail_with_one_clear_line(tmp_path):
    V = write_bpe_files(tmp_path)
    good = hf_config(V)
    tensors = random_hf_tensors(good)
    cases = {
        "model_type='bert' is not 'gpt2'": (dict(good, model_type="bert"), tensors),
        "activation_function='relu' is not one of gelu_new": (
            dict(good, activation_function="relu"), tensors),
        "wte.weight has shape (317, 32) but config.json": (dict(good, n_embd=64), tensors),
        "lacks 12 tensor(s)": (dict(good, n_layer=3), tensors),
    }
    for i, (message, (cfg, ts)) in enumerate(cases.items()):
        write_hf_dir(tmp_path / f"bad{i}", cfg, ts, tokenizer=False)
        with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace(")", r"\)")):
            load_hf(str(tmp_path / f"bad{i}"))

    (tmp_path / "noweights").mkdir()
    (tmp_path / "noweights" / "config.json").write_text(json.dumps(good))
    with pytest.raises(ConversionError, match="has no weights: expected model.safetensors"):
        load_hf(str(tmp_path / "noweights"))
    with pytest.raises(ConversionError, match="config.json does not exist"):
        load_hf(str(tmp_path / "missing"))

    small = hf_config(V - 10)  # the tokenizer files have V tokens: not this model's
    write_hf_dir(tmp_path / "vocab", small, random_hf_tensors(small))
    with pytest.raises(ConversionError, match=f"tokenizer files have {V} tokens but config.json "
                                              f"vocab_size={V - 10}"):
        from_hf(str(tmp_path / "vocab"), str(tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_bad_tokenizer_files_name_the_problem(tmp_path):
    write_bpe_files(tmp_path)
    vocab, merges = (tmp_path / "vocab.json").read_bytes(), (tmp_path / "merges.txt").read_bytes()
    with pytest.raises(DataError, match="merges.txt line 3: 'oops' is not a merge"):
        GPT2BPETokenizer(vocab, merges.replace(b"\n", b"\noops\n", 2).replace(b"\noops\n", b"\n",
                                                                             1), str(tmp_path))
    no_bytes = json.dumps({k: v for k, v in json.loads(vocab).items() if k != "A"}).encode()
    with pytest.raises(DataError, match="lacks 1 of the 256 byte tokens"):
        GPT2BPETokenizer(no_bytes, merges, str(tmp_path))


def test_tokenizer_round_trips_and_saves(tmp_path):
    write_bpe_files(tmp_path)
    tok = GPT2BPETokenizer.from_files(str(tmp_path))
    ids = tok.encode(TRICKY_TEXT)
    assert tok.decode(ids) == TRICKY_TEXT and tok.eos_id in ids
    assert len(ids) < len(TRICKY_TEXT.encode())  # merges apply
    from gpt_jax.data.tokenizers import load_tokenizer

    tok.save(str(tmp_path / "run" / "tokenizer"))
    again = load_tokenizer(str(tmp_path / "run"))
    assert again.kind == "gpt2_bpe" and again.encode(TRICKY_TEXT) == ids


# -- against transformers ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def hf():
    pytest.importorskip("torch", reason="needs the hf extra: pip install 'gpt_jax[hf]'")
    return pytest.importorskip("transformers", reason="needs the hf extra (transformers)")


def hf_model(hf, folder, seed: int, **cfg):
    import torch

    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    V = write_bpe_files(folder)
    config = hf.GPT2Config(vocab_size=V, bos_token_id=V - 1, eos_token_id=V - 1, **cfg)
    model = hf.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial layer norms, so a swapped scale/bias would show
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.add_(torch.randn_like(p) * 0.2)
    model.save_pretrained(str(folder))
    return model, V


def hf_logits(model, tokens_BT) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(tokens_BT)).logits.numpy()


@pytest.mark.parametrize("shape", [
    dict(n_layer=2, n_embd=32, n_head=2, n_positions=64),
    dict(n_layer=3, n_embd=48, n_head=4, n_positions=32, n_inner=96, layer_norm_epsilon=1e-6,
         tie_word_embeddings=False)], ids=["tied", "untied-ninner-eps"])
@pytest.mark.e2e
def test_logits_equal_hf(hf, tmp_path, shape):
    model, V = hf_model(hf, tmp_path, seed=1, **shape)
    fields, params = load_hf(str(tmp_path))
    tokens_BT = np.random.default_rng(0).integers(0, V, (2, shape["n_positions"]))
    np.testing.assert_allclose(gpt_jax_logits(fields, params, tokens_BT),
                               hf_logits(model, tokens_BT), atol=1e-4, rtol=0)


@pytest.mark.e2e
def test_converted_run_generates_like_hf_and_converts_back(hf, tmp_path):
    import gpt_jax
    model, V = hf_model(hf, tmp_path / "hf", seed=2, n_layer=2, n_embd=64, n_head=4,
                        n_positions=64)
    run = from_hf(str(tmp_path / "hf"), str(tmp_path / "run"))
    lm = gpt_jax.load(run)
    tokens_BT = np.random.default_rng(5).integers(0, V, (3, 40))
    np.testing.assert_allclose(gpt_jax_logits(lm.model_cfg, lm.params, tokens_BT),
                               hf_logits(model, tokens_BT), atol=1e-4, rtol=0)

    import torch

    prompt = lm.tokenizer.encode("def wrap(text, width):")
    with torch.no_grad():
        hf_out = model.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32,
                                do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    ours = lm.generate_tokens([prompt], max_new_tokens=32, temperature=0.0, stop_at_eos=False)
    assert ours.tokens[0] == hf_out

    to_hf(run, str(tmp_path / "back"))
    reloaded = hf.GPT2LMHeadModel.from_pretrained(str(tmp_path / "back")).eval()
    np.testing.assert_array_equal(hf_logits(reloaded, tokens_BT), hf_logits(model, tokens_BT))
    _, params = load_hf(str(tmp_path / "back"))  # --to=hf then --from=hf: exact
    jax.tree.map(np.testing.assert_array_equal, params, jax.device_get(lm.params))
    hf_tok = hf.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    assert hf_tok(TRICKY_TEXT)["input_ids"] == lm.tokenizer.encode(TRICKY_TEXT)


def test_tokenizer_matches_hf(hf, tmp_path):
    write_bpe_files(tmp_path)
    ours = GPT2BPETokenizer.from_files(str(tmp_path))
    # transformers 5 has one GPT-2 tokenizer class (GPT2Tokenizer is GPT2TokenizerFast)
    theirs = hf.GPT2TokenizerFast(vocab=str(tmp_path / "vocab.json"),
                                  merges=str(tmp_path / "merges.txt"))
    rng = random.Random(0)
    alphabet = "ab cd\n\t  é日\u00a0\u2003'sll12３²_-.,!?😀🇫🇷\r\x1c'tve'dre'm 0123456789"
    texts = [TRICKY_TEXT, "", "   ", "\n\n\n", "it's we've I'm they'd"] + [
        "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))) for _ in range(200)]
    for text in texts:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text) == ids, text
        assert ours.decode(ours.encode(text)) == text
        assert ours.decode(ids) == theirs.decode(ids), text
