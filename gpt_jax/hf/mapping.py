"""Hugging Face GPT-2 <-> gpt_jax: config fields and weights, in NumPy only (no torch).

HF's GPT-2 uses `Conv1D` layers whose weight is stored `[in, out]` (x @ W), so no transposes
are needed; only the fused attention projections are reshaped to the named-head layout:
`c_attn.weight [D, 3D] -> qkv.kernel [D, 3, H, K]`, `c_proj.weight [D, D] -> proj.kernel
[H, K, D]`. An untied `lm_head.weight [V, D]` (torch Linear: `[out, in]`) becomes
`lm_head.kernel [D, V]`.
"""

from __future__ import annotations

import jax
import numpy as np

from gpt_jax.errors import ConversionError
from gpt_jax.model import ModelConfig

# activation_function values that are GPT-2's tanh-approximated GELU (what model.MLP computes).
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers of old checkpoints


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConversionError(message)


def model_fields_from_hf(hf: dict, where: str = "config.json") -> dict:
    """The `model` section fields of a HF GPT-2 `config.json`, checked for what gpt_jax runs."""
    model_type = hf.get("model_type")
    _require(model_type == "gpt2", f"{where}: model_type={model_type!r} is not 'gpt2' (only "
             "GPT-2 checkpoints convert)")
    act = hf.get("activation_function", "gelu_new")
    _require(act in TANH_GELUS, f"{where}: activation_function={act!r} is not one of "
             f"{', '.join(TANH_GELUS)} (gpt_jax's GELU is the tanh approximation)")
    for key, allowed in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                         ("add_cross_attention", False)):
        value = hf.get(key, allowed)
        _require(value == allowed, f"{where}: {key}={value!r} is not supported (only {allowed})")
    n_embd, n_head = int(hf["n_embd"]), int(hf["n_head"])
    _require(n_embd % n_head == 0, f"{where}: n_embd={n_embd} is not divisible by "
             f"n_head={n_head}")
    positions, n_ctx = hf.get("n_positions"), hf.get("n_ctx")
    _require(positions is not None or n_ctx is not None, f"{where} has neither n_positions "
             "nor n_ctx (the context length)")
    n_inner = hf.get("n_inner") or 4 * n_embd
    return {
        "vocab_size": int(hf["vocab_size"]), "block_size": int(positions or n_ctx),
        "n_layer": int(hf["n_layer"]), "n_head": n_head, "n_embd": n_embd, "mlp": "gelu",
        "mlp_ratio": n_inner / n_embd, "norm": "layernorm",
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)), "position": "learned",
        "tie_embeddings": bool(hf.get("tie_word_embeddings", True)), "use_bias": True,
        "init_std": float(hf.get("initializer_range", 0.02)), "scan_layers": False,
    }


def hf_config_from_model(m: ModelConfig, eos_id: int | None) -> dict:
    """A HF `config.json` (GPT2LMHeadModel) for the `model` section `m` of a gpt_jax config."""
    # zero_init_proj only changes the initialisation: a model trained with it converts.
    for field, allowed in (("mlp", "gelu"), ("norm", "layernorm"), ("position", "learned"),
                           ("use_bias", True), ("qk_norm", False), ("logit_softcap", 0.0),
                           ("value_embeddings", False)):
        value = getattr(m, field)
        _require(value == allowed, f"model.{field}={value!r} has no GPT-2 (Hugging Face) "
                 f"equivalent (GPT-2 needs {allowed!r})")
    n_kv_head = m.n_kv_head
    _require(n_kv_head in (0, m.n_head), f"model.n_kv_head={n_kv_head!r} has no GPT-2 (Hugging "
             f"Face) equivalent (GPT-2 needs 0 or n_head={m.n_head})")
    n_inner = int(round(m.mlp_ratio * m.n_embd))
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
        "vocab_size": int(m.vocab_size), "n_positions": int(m.block_size),
        "n_ctx": int(m.block_size), "n_embd": int(m.n_embd), "n_layer": int(m.n_layer),
        "n_head": int(m.n_head), "n_inner": None if n_inner == 4 * m.n_embd else n_inner,
        "activation_function": "gelu_new", "layer_norm_epsilon": float(m.norm_eps),
        "tie_word_embeddings": bool(m.tie_embeddings),
        "initializer_range": float(m.init_std), "resid_pdrop": float(m.dropout),
        "embd_pdrop": float(m.dropout), "attn_pdrop": float(m.dropout),
        "bos_token_id": eos_id, "eos_token_id": eos_id, "scale_attn_weights": True,
        "use_cache": True, "torch_dtype": "float32",
    }


def expected_hf_shapes(f: dict) -> dict[str, tuple[int, ...]]:
    """Every HF tensor name (no `transformer.` prefix) -> its shape, for model fields `f`."""
    D, V, L = f["n_embd"], f["vocab_size"], f["n_layer"]
    F = int(round(f["mlp_ratio"] * D))
    shapes = {"wte.weight": (V, D), "wpe.weight": (f["block_size"], D),
              "ln_f.weight": (D,), "ln_f.bias": (D,)}
    for i in range(L):
        p = f"h.{i}."
        shapes.update({
            p + "ln_1.weight": (D,), p + "ln_1.bias": (D,), p + "ln_2.weight": (D,),
            p + "ln_2.bias": (D,), p + "attn.c_attn.weight": (D, 3 * D),
            p + "attn.c_attn.bias": (3 * D,), p + "attn.c_proj.weight": (D, D),
            p + "attn.c_proj.bias": (D,), p + "mlp.c_fc.weight": (D, F),
            p + "mlp.c_fc.bias": (F,), p + "mlp.c_proj.weight": (F, D), p + "mlp.c_proj.bias": (D,)})
    if not f["tie_embeddings"]:
        shapes["lm_head.weight"] = (V, D)
    return shapes


def normalize_hf_names(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the `transformer.` prefix and the attention-mask buffers old checkpoints carry."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(BUFFER_SUFFIXES):
            continue
        out[name.removeprefix("transformer.")] = value
    return out


def check_hf_tensors(tensors: dict[str, np.ndarray], f: dict, where: str) -> None:
    """Every expected tensor present with its shape; nothing unknown (a tied lm_head may be)."""
    expected = expected_hf_shapes(f)
    missing = sorted(set(expected) - set(tensors))
    _require(not missing, f"{where} lacks {len(missing)} tensor(s) the config implies, e.g. "
             f"{missing[0] if missing else ''!r}")
    extra = sorted(set(tensors) - set(expected) - {"lm_head.weight"})
    _require(not extra, f"{where} has tensor(s) a GPT-2 with this config does not, e.g. "
             f"{extra[0] if extra else ''!r}")
    for name, shape in expected.items():
        got = tuple(tensors[name].shape)
        _require(got == shape, f"{where}: {name} has shape {got} but config.json (n_layer="
                 f"{f['n_layer']}, n_embd={f['n_embd']}, vocab_size={f['vocab_size']}, "
                 f"n_positions={f['block_size']}) implies {shape}")


def params_from_hf(tensors: dict[str, np.ndarray], f: dict) -> dict:
    """gpt_jax params (unstacked `h_{i}` blocks, float32) from normalized HF tensors; the
    vocabulary rows padded with zeros to the multiple `f["vocab_multiple"]` (if given)."""
    D, H = f["n_embd"], f["n_head"]
    K = D // H
    t = {k: np.asarray(v, np.float32) for k, v in tensors.items()}
    padding = ModelConfig(**f).padded_vocab_size - f["vocab_size"]  # f["vocab_multiple"]'s
    for name in ("wte.weight", "lm_head.weight"):  # [V, D]: zero rows, masked in the model
        if name in t:
            t[name] = np.pad(t[name], ((0, padding), (0, 0)))
    ln = lambda p: {"scale": t[p + ".weight"], "bias": t[p + ".bias"]}  # noqa: E731
    params = {"wte": {"embedding": t["wte.weight"]}, "wpe": {"embedding": t["wpe.weight"]},
              "ln_f": ln("ln_f")}
    for i in range(f["n_layer"]):
        p = f"h.{i}."
        params[f"h_{i}"] = {
            "ln_1": ln(p + "ln_1"), "ln_2": ln(p + "ln_2"),
            "attn": {"qkv": {"kernel": t[p + "attn.c_attn.weight"].reshape(D, 3, H, K),
                             "bias": t[p + "attn.c_attn.bias"].reshape(3, H, K)},
                     "proj": {"kernel": t[p + "attn.c_proj.weight"].reshape(H, K, D),
                              "bias": t[p + "attn.c_proj.bias"]}},
            "mlp": {"fc": {"kernel": t[p + "mlp.c_fc.weight"], "bias": t[p + "mlp.c_fc.bias"]},
                    "proj": {"kernel": t[p + "mlp.c_proj.weight"],
                             "bias": t[p + "mlp.c_proj.bias"]}}}
    if not f["tie_embeddings"]:
        params["lm_head"] = {"kernel": np.ascontiguousarray(t["lm_head.weight"].T)}
    return params


def _blocks(params: dict, n_layer: int) -> list[dict]:
    """Per-layer param dicts, whether the run stored `h_{i}` or one scanned (stacked) `h`."""
    if "h" in params:
        return [jax.tree.map(lambda x, i=i: np.asarray(x[i]), params["h"]) for i in range(n_layer)]
    return [params[f"h_{i}"] for i in range(n_layer)]


def hf_from_params(params: dict, m) -> dict[str, np.ndarray]:
    """HF tensors (names as `save_pretrained` writes them) from gpt_jax params."""
    D, V = int(m.n_embd), int(m.vocab_size)  # the vocab_multiple padding is dropped
    a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))  # noqa: E731
    out = {"transformer.wte.weight": a(np.asarray(params["wte"]["embedding"])[:V]),
           "transformer.wpe.weight": a(params["wpe"]["embedding"]),
           "transformer.ln_f.weight": a(params["ln_f"]["scale"]),
           "transformer.ln_f.bias": a(params["ln_f"]["bias"])}
    for i, b in enumerate(_blocks(params, int(m.n_layer))):
        p = f"transformer.h.{i}."
        attn, mlp = b["attn"], b["mlp"]
        out.update({
            p + "ln_1.weight": a(b["ln_1"]["scale"]), p + "ln_1.bias": a(b["ln_1"]["bias"]),
            p + "ln_2.weight": a(b["ln_2"]["scale"]), p + "ln_2.bias": a(b["ln_2"]["bias"]),
            p + "attn.c_attn.weight": a(np.reshape(attn["qkv"]["kernel"], (D, 3 * D))),
            p + "attn.c_attn.bias": a(np.reshape(attn["qkv"]["bias"], (3 * D,))),
            p + "attn.c_proj.weight": a(np.reshape(attn["proj"]["kernel"], (D, D))),
            p + "attn.c_proj.bias": a(attn["proj"]["bias"]),
            p + "mlp.c_fc.weight": a(mlp["fc"]["kernel"]), p + "mlp.c_fc.bias": a(mlp["fc"]["bias"]),
            p + "mlp.c_proj.weight": a(mlp["proj"]["kernel"]),
            p + "mlp.c_proj.bias": a(mlp["proj"]["bias"])})
    if not m.tie_embeddings:
        out["lm_head.weight"] = a(np.asarray(params["lm_head"]["kernel"])[:, :V].T)
    return out
