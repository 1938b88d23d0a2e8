"""Directory-level conversion: a HF GPT-2 folder <-> a gpt_jax run directory.

    from_hf("gpt2-hf/", "runs/gpt2")      # config.json + model.safetensors (or pytorch_model.bin)
    to_hf("runs/gpt2-sft", "gpt2-sft-hf/")  # GPT2LMHeadModel.from_pretrained loads this

Reading safetensors needs only `safetensors` (NumPy API); `pytorch_model.bin` needs torch.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors.numpy import load_file, save_file

from gpt_jax import checkpoint
from gpt_jax import config as config_lib
from gpt_jax.config import Config
from gpt_jax.data.gpt2_bpe import load_dir
from gpt_jax.hf.mapping import (
    ConversionError,
    check_hf_tensors,
    hf_config_from_model,
    hf_from_params,
    model_fields_from_hf,
    normalize_hf_names,
    params_from_hf,
)
from gpt_jax.run import run_tokenizer

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"


def read_hf_config(hf_dir: str) -> dict:
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{path} does not exist; --hf_dir must be a Hugging Face model "
                              "directory (config.json + model.safetensors or pytorch_model.bin)")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise ConversionError(f"{path} is not JSON: {e}") from None


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    try:
        return load_file(path)
    except Exception as e:  # noqa: BLE001 -- corrupt file, unsupported dtype (bf16) ...
        raise ConversionError(f"{path} could not be read as safetensors: {e}") from None


def read_hf_weights(hf_dir: str) -> tuple[dict[str, np.ndarray], str]:
    """(tensors, file name) from model.safetensors (or its sharded index) or pytorch_model.bin."""
    single, index = os.path.join(hf_dir, SAFETENSORS), os.path.join(hf_dir, SAFETENSORS_INDEX)
    if os.path.isfile(single):
        return _read_safetensors(single), SAFETENSORS
    if os.path.isfile(index):
        with open(index, encoding="utf-8") as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors: dict[str, np.ndarray] = {}
        for shard in shards:
            tensors.update(_read_safetensors(os.path.join(hf_dir, shard)))
        return tensors, SAFETENSORS_INDEX
    binary = os.path.join(hf_dir, TORCH_BIN)
    if os.path.isfile(binary):
        try:
            import torch  # optional: only .bin checkpoints need it
        except ImportError:
            raise ConversionError(f"{binary} needs torch to read (pip install 'gpt_jax[hf]'), "
                                  "or convert it to model.safetensors first") from None
        state = torch.load(binary, map_location="cpu", weights_only=True)
        return {k: v.detach().float().numpy() for k, v in state.items()}, TORCH_BIN
    raise ConversionError(f"{hf_dir} has no weights: expected {SAFETENSORS}, {SAFETENSORS_INDEX} "
                          f"or {TORCH_BIN}")


def load_hf(hf_dir: str, vocab_multiple: int = 1) -> tuple[dict, dict]:
    """(model fields, gpt_jax params as NumPy) of a HF GPT-2 directory, fully checked; the
    vocabulary padded to a multiple of `vocab_multiple` (model.vocab_multiple)."""
    fields = model_fields_from_hf(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"))
    if vocab_multiple < 1:
        raise ConversionError(f"vocab_multiple={vocab_multiple} must be >= 1 (1: no padding)")
    fields["vocab_multiple"] = vocab_multiple
    raw, name = read_hf_weights(hf_dir)
    tensors = normalize_hf_names(raw)
    check_hf_tensors(tensors, fields, os.path.join(hf_dir, name))
    if fields["tie_embeddings"] and "lm_head.weight" in tensors:
        if not np.array_equal(tensors["lm_head.weight"], tensors["wte.weight"]):
            raise ConversionError(f"{hf_dir}: lm_head.weight differs from wte.weight but "
                                  "config.json says tie_word_embeddings=true")
    return fields, params_from_hf(tensors, fields)


def run_config(fields: dict, hf_dir: str) -> Config:
    """A gpt_jax config for the converted model: GPT-2 tokenizer, fine-tuning friendly."""
    return Config.from_dict({"model": fields,
                             "data": {"tokenizer": "gpt2_bpe",
                                      "bpe_dir": os.path.abspath(hf_dir)},
                             "train": {"num_steps": 1}})


def from_hf(hf_dir: str, workdir: str, seed: int = 0, vocab_multiple: int = 1) -> str:
    """Write a run directory (config, tokenizer/, checkpoint step 0) from a HF GPT-2 folder;
    `vocab_multiple` > 1 pads the embedding/head rows (model.vocab_multiple)."""
    if os.path.isdir(checkpoint.checkpoint_dir(workdir)) and os.listdir(
            checkpoint.checkpoint_dir(workdir)):
        raise ConversionError(f"--workdir={workdir} already holds checkpoints; convert into a "
                              "new directory")
    fields, params = load_hf(hf_dir, vocab_multiple)
    tokenizer = load_dir(hf_dir)
    if tokenizer.vocab_size > fields["vocab_size"]:
        raise ConversionError(f"{hf_dir}: the tokenizer files have {tokenizer.vocab_size} "
                              f"tokens but config.json vocab_size={fields['vocab_size']}; they "
                              "do not belong to this model")
    if tokenizer.vocab_size < fields["vocab_size"]:
        logging.warning("%s: model vocab %d > tokenizer vocab %d (padded embedding rows)",
                        hf_dir, fields["vocab_size"], tokenizer.vocab_size)
    config = run_config(fields, hf_dir)
    os.makedirs(workdir, exist_ok=True)
    tokenizer.save(os.path.join(workdir, "tokenizer"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config_lib.to_json(config))
    state = _train_state(config, params, seed)
    saver = checkpoint.Checkpointer(workdir, config.checkpoint)
    try:
        saver.save(state, {"step": 0, "seed": seed}, config.to_dict(), force=True)
    finally:
        saver.close()
    return workdir


def _train_state(config: Config, params: dict, seed: int) -> dict:
    """A step-0 TrainState like `Trainer.init_state` makes (the optimizer state a resumed run
    expects), built eagerly: no compiled random init of weights that are replaced anyway."""
    params = jax.device_put(params, jax.devices()[0])
    tx = config.optim.build(config.train.num_steps).tx
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
            "rng": jax.random.fold_in(jax.random.PRNGKey(seed), 1)}


def save_safetensors(tensors: dict[str, np.ndarray], path: str) -> None:
    save_file(tensors, path, metadata={"format": "pt"})


def to_hf(workdir: str, hf_dir: str) -> str:
    """Write config.json, model.safetensors (+ vocab.json/merges.txt) for GPT2LMHeadModel."""
    raw, params = checkpoint.load_params(workdir)
    config = Config.from_dict(raw, strict=False)
    params = jax.device_get(params)
    tokenizer = run_tokenizer(workdir)
    eos = getattr(tokenizer, "eos_id", None)
    hf_config = hf_config_from_model(config.model, eos)
    tensors = hf_from_params(params, config.model)
    os.makedirs(hf_dir, exist_ok=True)
    with open(os.path.join(hf_dir, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_safetensors(tensors, os.path.join(hf_dir, SAFETENSORS))
    if getattr(tokenizer, "kind", None) == "gpt2_bpe":
        tokenizer.save_hf(hf_dir)
        with open(os.path.join(hf_dir, "tokenizer_config.json"), "w") as f:
            json.dump({"tokenizer_class": "GPT2Tokenizer", "model_max_length":
                       int(config.model.block_size), "bos_token": "<|endoftext|>",
                       "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
                       "add_prefix_space": False}, f, indent=2)
    else:
        logging.warning("the run's %s tokenizer has no Hugging Face GPT-2 form; wrote the "
                        "weights only", getattr(tokenizer, "kind", "?"))
    return hf_dir
