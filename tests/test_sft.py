"""Supervised fine-tuning data: JSONL pairs, packing with response-only loss weights, and a
fine-tune of a converted GPT-2 that improves the held-out metrics."""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import pytest

from conftest import run_on_one_device
from gpt_jax import config as config_lib
from gpt_jax.config import typed
from gpt_jax.data import ByteTokenizer, SFTDataset
from gpt_jax.data.documents import Pair, read_pairs
from gpt_jax.errors import DataError
from gpt_jax.run import open_data

pytestmark = pytest.mark.e2e  # every test here runs a training run or a process


def sft_config(tmp_path, pairs_file="", **model):
    config = config_lib.load_preset("tiny")
    config.model.update(block_size=32, vocab_size=259, **model)
    config.data.update(source="sft_jsonl", paths=str(pairs_file or tmp_path / "none.jsonl"),
                       tokenizer="byte", cache_dir=str(tmp_path / "stores"))
    return config


def sft_train_split(tmp_path, pairs: list[tuple[str, str]], config=None) -> SFTDataset:
    """The train split of an SFT store prepared from `pairs` (all of them: a one-pair
    held-out file is given)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path, held_out = tmp_path / "pairs.jsonl", tmp_path / "heldout.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in pairs))
    held_out.write_text(json.dumps({"prompt": "h", "response": "o"}) + "\n")
    config = config or sft_config(tmp_path)
    config.data.update(paths=str(path), sft_eval_paths=str(held_out))
    return open_data(typed(config), ByteTokenizer(), "train")


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    good = json.dumps({"prompt": "a", "response": "b"})
    for lines, message in [
        ([good, "{not json", good], "pairs.jsonl:2: not JSON"),
        ([good, "", json.dumps({"prompt": "a"})], "pairs.jsonl:3: has no 'response' field"),
        ([json.dumps({"prompt": 1, "response": "b"})], "jsonl:1: has a non-string 'prompt' field"),
        ([json.dumps(["a", "b"])], "jsonl:1: a JSON list, expected an object"),
    ]:
        path.write_text("\n".join(lines) + "\n")
        with pytest.raises(DataError, match=message):
            list(read_pairs(str(path)))
    path.write_text(good + "\n\n" + good + "\n")
    assert list(read_pairs(str(path))) == [Pair("a", "b", 1), Pair("a", "b", 3)]
    with pytest.raises(DataError, match="missing.jsonl does not exist"):
        list(read_pairs(str(tmp_path / "missing.jsonl")))


def test_prompt_longer_than_the_context_is_an_error(tmp_path):
    pairs = [("q", "a")] * 6 + [("x" * 40, "y")]
    with pytest.raises(DataError, match="pairs.jsonl:7: the prompt is 40 tokens but "
                                        "model.block_size=32"):
        sft_train_split(tmp_path / "long_prompt", pairs)
    long_answer = sft_train_split(tmp_path / "long_answer", [("q", "z" * 50)])
    assert long_answer.num_truncated == 1 and len(long_answer.examples[0].tokens) == 33


def test_packing_keeps_whole_examples_and_weights_only_responses(tmp_path):
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    pairs = [Pair("q" + "p" * int(rng.integers(1, 9)) + ":",
                  "r" * int(rng.integers(1, 7)) + str(i % 10), i) for i in range(40)]
    ds = sft_train_split(tmp_path, [(p.prompt, p.response) for p in pairs])
    seen = []
    for r in range(ds.num_windows(32)):
        batch = ds.gather(np.array([r]), 32)
        inputs, targets, weights = batch["inputs"][0], batch["targets"][0], batch["weights"][0]
        assert np.array_equal(inputs[1:], targets[:-1])
        row = np.concatenate([inputs[:1], targets])
        text = tok.decode(row)  # whole examples: each starts with its prompt
        counted = tok.decode(targets[weights > 0])
        expected = ""
        for example in text.split("q")[1:]:
            prompt, response = example.split(":")
            expected += response
            seen.append("q" + prompt + ":" + response)
        assert counted == expected  # response bytes, in order
        assert weights[targets == tok.eos_id].all() and weights.sum() == len(expected) + (
            targets == tok.eos_id).sum()
        assert not weights[targets == tok.pad_id].any()
    assert sorted(seen) == sorted(p.prompt + p.response for p in pairs)


def test_response_only_loss_equals_hand_computation(tmp_path):
    from gpt_jax import sharding
    from gpt_jax.step import Trainer

    pairs = [(f"question {i}?", f" answer {i * 7}") for i in range(30)]
    config = sft_config(tmp_path)
    config.train.update(global_batch_size=8)
    ds = sft_train_split(tmp_path, pairs, config)
    host = ds.host_batch(3, 8, 32, 0)
    assert 0 < host["weights"].sum() < host["weights"].size

    mesh = typed(config).mesh.make()
    trainer = Trainer.for_config(typed(config), mesh)
    import flax.linen as nn

    params = nn.unbox(trainer.model.init(jax.random.PRNGKey(0), host["inputs"][:1])["params"])
    logits = np.asarray(trainer.model.apply({"params": params}, host["inputs"]), np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, host["targets"][..., None].astype(int), -1)[..., 0]
    by_hand = (nll * host["weights"]).sum() / host["weights"].sum()
    with sharding.activate(mesh, trainer.rules):
        batch = {k: jax.device_put(v, trainer.batch_sharding) for k, v in host.items()}
        s, c = jax.jit(trainer._eval_step)(params, batch)
        assert float(s) / float(c) == pytest.approx(by_hand, rel=1e-5)
        assert float(c) == host["weights"].sum()
        unmasked = nll.mean()
        assert abs(unmasked - by_hand) > 1e-3  # the weights matter


def finetune_converted_gpt2(tmp: str) -> None:
    """200 SFT steps from a converted random GPT-2 into `tmp`/sft (run by the test below)."""
    tmp_path = pathlib.Path(tmp)
    from gpt_jax import train
    from gpt_jax.hf import from_hf
    from test_convert_hf import hf_config, random_hf_tensors, write_hf_dir

    V = 317  # write_bpe_files' vocabulary
    cfg = hf_config(V, n_layer=2, n_embd=32, n_head=2, n_positions=32)
    write_hf_dir(tmp_path / "hf", cfg, {k: v * 0.1 for k, v in random_hf_tensors(cfg).items()})
    base = from_hf(str(tmp_path / "hf"), str(tmp_path / "base"))

    colors = {"apple": "red", "banana": "yellow", "grape": "purple", "lime": "green",
              "plum": "blue", "orange": "orange", "coal": "black", "snow": "white"}

    def lines(ids):
        return "".join(json.dumps({"prompt": f"#{i} color of {fruit}:", "response": f" {color}"})
                       + "\n" for i in ids for fruit, color in colors.items())

    (tmp_path / "train.jsonl").write_text(lines(range(12)))
    (tmp_path / "heldout.jsonl").write_text(lines(range(50, 52)))
    config = config_lib.load_preset("finetune")
    config.data.update(paths=str(tmp_path / "train.jsonl"),
                       sft_eval_paths=str(tmp_path / "heldout.jsonl"))
    config.train.update(init_from=base, num_steps=200, global_batch_size=8, eval_every=200,
                        log_every=50)
    config.optim.update(lr=1e-2, warmup_steps=5)
    config.checkpoint.update(every=200, async_save=False)
    train.train(config, str(tmp_path / "sft"))


def test_finetuning_a_converted_gpt2_improves_heldout_metrics(tmp_path):
    # In its own process on one device: 200 steps, like the CLI's runs.
    run_on_one_device("import sys, test_sft; test_sft.finetune_converted_gpt2(sys.argv[1])",
                      str(tmp_path))
    events = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in events if "eval_exact_match" in e]
    before, after = evals[0], evals[-1]
    assert (before["step"], after["step"]) == (0, 200)
    assert after["eval_loss"] < 0.5 * before["eval_loss"]
    assert before["eval_exact_match"] == 0.0 and after["eval_exact_match"] >= 0.75
    # The run carries the chat template of its prompt/response format, for `gpt-jax serve`.
    from gpt_jax.data.tokenizers import load_tokenizer
    from gpt_jax.serve.chat import PROMPT_RESPONSE, ChatTemplate, load_template

    template = load_template(str(tmp_path / "sft"))
    assert template == ChatTemplate.from_dict(PROMPT_RESPONSE)
    tok = load_tokenizer(str(tmp_path / "sft"))
    assert template.render([{"role": "user", "content": "Q: x"}], tok) == tok.encode("Q: x")
