"""Downstream evaluation: scoring by hand, a copy model vs a random one, tasks, bad inputs,
Hugging Face parity, the lm-eval model, `gpt-jax eval --tasks`, and train.eval_tasks."""

from __future__ import annotations

import dataclasses
import json
import os
import string
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import run_on_one_device
from gpt_jax import evals, sharding
from gpt_jax.config import typed
from gpt_jax.data import ByteTokenizer
from gpt_jax.evals import Example, Request, Score, loglikelihoods, score_examples
from gpt_jax.evals.choice import pick
from gpt_jax.evals.scoring import pack_rows
from gpt_jax.evals.tasks import load_task, nextline_examples, parse_specs
from gpt_jax.model import GPT, ModelConfig

pytestmark = pytest.mark.e2e  # every test here runs a training run or a process


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BYTE = ByteTokenizer()


def random_params(cfg: ModelConfig, seed: int = 0):
    return nn.unbox(GPT(cfg).init(jax.random.PRNGKey(seed), np.zeros((1, 1), np.int32))["params"])


def test_rows_are_truncated_on_the_left_and_padded_on_the_right():
    inputs, targets, mask = pack_rows([Request([1, 2, 3, 4, 5], [6, 7]), Request([9], [8])],
                                      block_size=4, length=4, rows=3)
    # row 0: [1..7] keeps its last block_size + 1 = 5 tokens [3, 4, 5, 6, 7]
    np.testing.assert_array_equal(inputs, [[3, 4, 5, 6], [9, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(targets, [[4, 5, 6, 7], [8, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(mask, [[0, 0, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]])


def test_scores_equal_a_per_row_computation_with_and_without_a_mesh():
    cfg = ModelConfig(vocab_size=40, block_size=8, n_layer=2, n_head=2, n_embd=16)
    params = random_params(cfg, 1)
    rng = np.random.default_rng(0)
    requests = [Request(list(rng.integers(0, 40, n)), list(rng.integers(0, 40, m)))
                for n, m in [(2, 2), (12, 3), (1, 3), (5, 8), (3, 1)]]  # 12+3 and 5+8 truncate

    forward = jax.jit(lambda p, tokens: GPT(cfg).apply({"params": p}, tokens))

    def by_hand(context, continuation):
        seq = (context + continuation)[-(cfg.block_size + 1):]  # what fits, unpadded, alone
        logits = np.asarray(forward(params, np.array([seq[:-1]])))[0]
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        picked = [(t - 1, seq[t]) for t in range(len(seq) - len(continuation), len(seq))]
        return (sum(logp[p, tok] for p, tok in picked),
                all(logits[p].argmax() == tok for p, tok in picked))

    want = [by_hand(c, x) for c, x in requests]
    config = _config_for(cfg)
    mesh = typed(config).mesh.make()  # data=8: every batch's rows over 8 devices
    rules = typed(config).mesh.rules
    sharded = sharding.shard_like(params, sharding.param_shardings(cfg, mesh, rules))
    for got in (loglikelihoods(cfg, params, requests, batch_rows=2),
                loglikelihoods(cfg, sharded, requests, batch_rows=4, mesh=mesh, rules=rules)):
        np.testing.assert_allclose([s.logprob for s in got], [w[0] for w in want], atol=1e-4)
        assert [s.tokens for s in got] == [len(x) for _, x in requests]
        assert [s.greedy for s in got] == [w[1] for w in want]


def test_a_model_with_zero_weights_gives_every_token_log_one_over_vocab():
    cfg = ModelConfig(vocab_size=40, block_size=8, n_layer=1, n_head=2, n_embd=16)
    zeros = jax.tree.map(np.zeros_like, random_params(cfg))  # logits 0: p = 1/40 everywhere
    got = loglikelihoods(cfg, zeros, [Request([1] * 12, [2, 3, 4]), Request([5], [6])])
    assert [s.tokens for s in got] == [3, 1]
    np.testing.assert_allclose([s.logprob for s in got], [3 * np.log(1 / 40), np.log(1 / 40)],
                               rtol=1e-6)


def _config_for(cfg: ModelConfig):
    from gpt_jax import config as config_lib

    config = config_lib.base_config()
    config.model.update(vocab_size=cfg.vocab_size, block_size=cfg.block_size,
                        n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    config.mesh.update(data=-1, fsdp=1, tensor=1)
    return config


def test_each_metric_normalises_as_its_convention_does():
    # ending 0 "abcd": -4 over 4 tokens, 4 characters, 4 bytes (-1, -1, -1 per unit);
    # ending 1 "éé": -3 over 1 token, 2 characters, 4 bytes (-3, -1.5, -0.75 per unit).
    scores = [Score(-4.0, 4, False), Score(-3.0, 1, False)]
    assert pick(scores, ["abcd", "éé"]) == {"acc": 1, "acc_norm": 0, "acc_bytes": 1,
                                            "acc_per_token": 0}
    ties = pick([Score(-2.0, 2, False), Score(-2.0, 2, False)], ["ab", "cd"])
    assert set(ties.values()) == {0}  # ties: the first


def test_results_logged_before_acc_per_token_read_under_todays_names():
    from gpt_jax.evals import format_table, upgrade
    from gpt_jax.report.runs import upgrade_event

    old = {"acc": 0.3, "acc_norm": 0.31, "n": 10}  # acc_norm then meant the per-token mean
    assert upgrade(old) == {"acc": 0.3, "acc_per_token": 0.31, "n": 10}
    new = {"acc": 0.3, "acc_norm": 0.4, "acc_bytes": 0.41, "acc_per_token": 0.31, "n": 10}
    assert upgrade(new) == new
    assert "| t | 10 | 0.3000 | – | – | 0.3100 |" in format_table({"t": old})
    event = {"step": 5, "downstream/t/acc": 0.3, "downstream/t/acc_norm": 0.31,
             "downstream/t/n": 10}
    assert upgrade_event(event) == {"step": 5, "downstream/t/acc": 0.3,
                                    "downstream/t/acc_per_token": 0.31, "downstream/t/n": 10}
    assert upgrade_event({"step": 5, **{f"downstream/t/{k}": v for k, v in new.items()}}) == {
        "step": 5, **{f"downstream/t/{k}": v for k, v in new.items()}}


def copy_model(seed: int = 0):
    """A 1-layer GPT whose blocks add nothing and whose positions are zero: the logits are
    LN(wte[t]) . wte, highest for t itself, so it predicts 'the next byte repeats this one'."""
    cfg = ModelConfig(vocab_size=259, block_size=64, n_layer=1, n_head=2, n_embd=64)
    params = random_params(cfg, seed)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: np.zeros_like(x) if any(getattr(k, "key", "") in ("proj", "wpe")
                                                for k in path) else np.asarray(x), params)
    params["wte"]["embedding"] = np.random.default_rng(seed).normal(0, 1, (259, 64)).astype(
        np.float32)
    params["ln_f"]["scale"] = np.full(64, 0.2, np.float32)
    return cfg, params


def repeat_examples(n: int, seed: int = 0) -> list[Example]:
    """Context: random letters; the right ending repeats one letter, the others are random."""
    rng = np.random.default_rng(seed)
    letters = np.array(list(string.ascii_lowercase))
    out = []
    for _ in range(n):
        endings = ["".join(rng.choice(letters, 5)) for _ in range(3)]
        label = int(rng.integers(4))
        endings.insert(label, str(rng.choice(letters)) * 5)
        out.append(Example("".join(rng.choice(letters, 12)), tuple(endings), label))
    return out


def test_a_model_that_knows_the_task_beats_chance_and_a_random_one_does_not():
    examples = repeat_examples(400)
    cfg, params = copy_model()
    knows = score_examples(cfg, params, BYTE, examples, batch_rows=256)
    assert knows["acc"] > 0.9 and knows["acc_norm"] > 0.9 and knows["n"] == 400
    # Untied: a freshly initialised GPT with tied embeddings is itself a weak copy model
    # (logits ~ LN(wte[t]) . wte), which is exactly this task's answer.
    untied = dataclasses.replace(cfg, tie_embeddings=False)
    random = score_examples(untied, random_params(untied, 3), BYTE, examples, batch_rows=256)
    # 400 examples: the standard error of a 25% accuracy is 2.2 points
    assert abs(random["acc"] - 0.25) < 0.07 and abs(random["acc_norm"] - 0.25) < 0.07


HELLASWAG = [
    {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over "
     "the snow covering the window of a car, and a woman wearing winter clothes smiles.",
     "ctx_b": "then", "ctx": "Then, the man writes over the snow covering the window of a car, "
     "and a woman wearing winter clothes smiles. then", "split": "val",
     "split_type": "indomain", "label": 3,
     "endings": [", the man adds wax to the windshield and cuts it.", ", a person board a ski "
                 "lift, while two men supporting the head of the person wearing winter clothes "
                 "snow as the we girls sled.", ", the man puts on a christmas coat, knitted "
                 "with netting.", ", the man continues removing the snow on his car."]},
    {"ind": 9, "activity_label": "Home and Garden", "ctx_a": "[header] How to grow tomatoes "
     "[title] Pick a sunny spot.", "ctx_b": "tomatoes", "ctx": "[header] How to grow tomatoes "
     "[title] Pick a sunny spot. tomatoes", "label": "1",
     "endings": ["need shade [step] all day.", "need sun.", "eat bugs.", "are blue."]},
]


def write_jsonl(path, rows) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n"
                            for r in rows))
    return str(path)


def test_hellaswag_as_released_and_preprocessed(tmp_path):
    path = write_jsonl(tmp_path / "hs.jsonl", HELLASWAG)
    raw = load_task("hellaswag", path)
    assert [e.label for e in raw] == [3, 1] and raw[0].context == HELLASWAG[0]["ctx"]
    assert raw[0].endings[3] == ", the man continues removing the snow on his car."
    assert raw[1].source == f"{path}:2"
    pre = load_task("hellaswag_preprocessed", path)
    assert pre[0].context == ("Removing ice from car: Then, the man writes over the snow "
                              "covering the window of a car, and a woman wearing winter clothes "
                              "smiles. Then")
    assert pre[1].context == "Home and Garden: How to grow tomatoes. Pick a sunny spot. Tomatoes"
    assert pre[1].endings[0] == "need shade all day."


def test_nextline_picks_the_true_next_line(text_corpus):
    examples = nextline_examples(
        (p.read_text() for p in sorted(text_corpus.iterdir())), limit=50, seed=1)
    assert len(examples) == 50
    for e in examples:
        assert len(set(e.endings)) == 4 and e.separator == "\n"
        assert 0 <= e.label < 4
    texts = {p.name: p.read_text() for p in text_corpus.iterdir()}
    e = examples[0]
    joined = e.context + "\n" + e.endings[e.label]
    assert any(joined in "\n".join(ln.rstrip() for ln in t.splitlines() if ln.strip())
               for t in texts.values())
    assert load_task("nextline", str(text_corpus), limit=7)[0].separator == "\n"


@pytest.mark.parametrize("rows, message", [
    (None, r"missing\.jsonl does not exist"),
    (['{"context": "a", "choices": ["b", "c"], "label": 0}', "{not json"],
     r"bad\.jsonl:2: not JSON"),
    ([{"context": "a", "choices": ["b", "c"], "label": 2}],
     r"bad\.jsonl:1: label 2 is out of range; allowed 0 to 1 for 2 endings"),
    ([{"context": "a", "choices": ["b"], "label": 0}], r"bad\.jsonl:1: the endings must be"),
    ([{"context": "a", "label": 0}], r"bad\.jsonl:1: no 'choices' field"),
])
def test_bad_task_files_are_one_line_errors(tmp_path, rows, message):
    path = str(tmp_path / "missing.jsonl") if rows is None else write_jsonl(
        tmp_path / "bad.jsonl", rows)
    with pytest.raises(evals.EvalError, match=message) as info:
        load_task("choices", path)
    assert "\n" not in str(info.value)


def test_an_ending_longer_than_the_context_and_bad_specs_are_one_line_errors(tmp_path):
    cfg = ModelConfig(vocab_size=259, block_size=8, n_layer=1, n_head=2, n_embd=16)
    path = write_jsonl(tmp_path / "long.jsonl",
                       [{"context": "abc", "choices": ["ok", "x" * 20], "label": 0}])
    with pytest.raises(evals.EvalError, match=r"long\.jsonl:1: ending 1 has 21 tokens, longer "
                       r"than the model's context \(block_size=8\)"):
        score_examples(cfg, random_params(cfg), BYTE, load_task("choices", path))
    with pytest.raises(evals.EvalError,
                       match="hellaswag_tfds: .*(no hellaswag builder|not prepared in)"):
        config = _config_for(cfg)
        config.data.data_dir = str(tmp_path / "no_tfds")
        load_task("hellaswag_tfds", "", config=config)
    with pytest.raises(evals.EvalError, match="unknown kind 'mmlu'; one of hellaswag"):
        parse_specs("mmlu:x.jsonl")
    with pytest.raises(evals.EvalError, match="needs a file: choices:path"):
        parse_specs("nextline,choices")
    from gpt_jax import config as config_lib

    config = config_lib.base_config()
    config.train.eval_tasks = "hellaswag"
    with pytest.raises(config_lib.ConfigError, match="train.eval_tasks: task 'hellaswag' needs"):
        config_lib.validate(config)


# -- against Hugging Face transformers and lm-evaluation-harness ---------------------------

@pytest.fixture(scope="module")
def hf_run(tmp_path_factory):
    """A random GPT-2 in transformers, and the gpt_jax run directory converted from it."""
    pytest.importorskip("torch", reason="needs the hf extra: pip install 'gpt_jax[hf]'")
    hf = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")
    from gpt_jax.hf import from_hf
    from test_convert_hf import hf_model

    tmp = tmp_path_factory.mktemp("hf_run")
    model, _ = hf_model(hf, tmp / "hf", seed=3, n_layer=2, n_embd=32, n_head=2, n_positions=64)
    return model, from_hf(str(tmp / "hf"), str(tmp / "run"))


CHOICES = [{"context": "def wrap(text, width):\n    return", "choices": [
    "textwrap.wrap(text, width)", "None", "[text[i:i + width] for i in range(0, len(text), "
    "width)]", "width"], "label": 0},
    {"context": "import", "choices": ["os", "sys", "json", "re"], "label": 2},
    {"context": "The quick brown fox jumps over the lazy dog, and then the dog wakes up and "
     "chases the fox all the way back to the", "choices": ["forest", "dog", "sea", "den"],
     "label": 3}]


def test_loglikelihoods_equal_gpt2lmheadmodel(hf_run, tmp_path):
    import torch

    import gpt_jax

    model, run = hf_run
    lm = gpt_jax.load(run)
    non_ascii = {"context": "Un café au", "choices": ["lait", "thé vert", "naïve crème",
                                                      "日本の"], "label": 0}
    examples = load_task("choices", write_jsonl(tmp_path / "c.jsonl", CHOICES + [non_ascii]))
    ours = score_examples(lm.model_cfg, lm.params, lm.tokenizer, examples, batch_rows=4)
    block = lm.model_cfg.block_size
    want_sums = []
    for e in examples:
        context = lm.tokenizer.encode(e.context)
        sums = []
        for ending in e.endings:
            cont = lm.tokenizer.encode(" " + ending)
            seq = (context + cont)[-(block + 1):]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([seq[:-1]])).logits[0].double(), -1)
            sums.append(sum(float(logp[t - 1, seq[t]]) for t in range(len(seq) - len(cont),
                                                                        len(seq))))
        want_sums.append(sums)
    assert max(len(lm.tokenizer.encode(CHOICES[2]["context"])), 0) > block  # truncation ran
    np.testing.assert_allclose(ours["logprobs"], want_sums, atol=1e-4)
    # Each convention's pick from transformers' log-likelihoods, normalised by hand.
    for sums, ns, e, got in zip(want_sums, ours["tokens"], examples, ours["predictions"]):
        sums = np.array(sums)
        want = {"acc": np.argmax(sums),
                "acc_norm": np.argmax(sums / [len(x) for x in e.endings]),
                "acc_bytes": np.argmax(sums / [len(x.encode()) for x in e.endings]),
                "acc_per_token": np.argmax(sums / np.array(ns))}
        assert got == {k: int(v) for k, v in want.items()}, (e.endings, sums)


def local_lm_eval_tasks(tmp_path) -> tuple[str, str]:
    """(the JSONL of CHOICES, a folder of YAML tasks over it): gpt_jax_local_mc (multiple
    choice), gpt_jax_local_gen (generate_until) and gpt_jax_local_rolling (perplexity)."""
    data = write_jsonl(tmp_path / "local.jsonl", CHOICES)
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    source = (f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
              "test_split: test\n")
    (tasks / "local_mc.yaml").write_text(
        f"task: gpt_jax_local_mc\n{source}output_type: multiple_choice\n"
        'doc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
        "metric_list:\n  - metric: acc\n")
    (tasks / "local_gen.yaml").write_text(
        f"task: gpt_jax_local_gen\n{source}output_type: generate_until\n"
        'doc_to_text: "{{context}}"\ndoc_to_target: "{{choices[label]}}"\n'
        'generation_kwargs:\n  until: ["\\n"]\n  max_gen_toks: 6\n'
        "metric_list:\n  - metric: exact_match\n")
    (tasks / "local_rolling.yaml").write_text(
        f"task: gpt_jax_local_rolling\n{source}output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{context}}"\n'
        "metric_list:\n  - metric: word_perplexity\n")
    return data, str(tasks)


def test_lm_eval_local_task_matches_our_scorer(hf_run, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'gpt_jax[eval]'")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager

    import gpt_jax
    import gpt_jax.evals.harness  # noqa: F401 -- registers --model gpt_jax

    _, run = hf_run
    data, tasks = local_lm_eval_tasks(tmp_path)
    out = lm_eval.simple_evaluate(
        model="gpt_jax", model_args=f"workdir={run},batch_rows=8", tasks=["gpt_jax_local_mc"],
        task_manager=TaskManager(include_path=tasks), log_samples=True)
    lm = gpt_jax.load(run)
    ours = score_examples(lm.model_cfg, lm.params, lm.tokenizer,
                          load_task("choices", data))
    assert out["results"]["gpt_jax_local_mc"]["acc,none"] == pytest.approx(ours["acc"])
    samples = sorted(out["samples"]["gpt_jax_local_mc"], key=lambda s: s["doc_id"])
    theirs = [[r[0][0] for r in s["resps"]] for s in samples]
    np.testing.assert_allclose(theirs, ours["logprobs"], atol=1e-5)


def test_lm_evals_local_completions_over_the_server_scores_like_our_scorer(hf_run, tmp_path,
                                                                         monkeypatch):
    """lm-eval's stock `local-completions` model (echo + logprobs for the choices, stop strings
    for generation) against `gpt-jax serve`'s server: its log-likelihoods are our scorer's on
    the same tokens, and its generations are the gpt_jax lm-eval model's."""
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'gpt_jax[eval]'")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import lm_eval
    import lm_eval.models.openai_completions  # noqa: F401 -- registers local-completions
    from lm_eval.tasks import TaskManager

    import gpt_jax
    import gpt_jax.evals.harness  # noqa: F401 -- registers --model gpt_jax
    from gpt_jax.evals.choice import requests_for
    from gpt_jax.evals.scoring import Request, loglikelihoods
    from gpt_jax.serve.engine import Engine, EngineConfig
    from test_serve import running

    _, run = hf_run
    data, tasks = local_lm_eval_tasks(tmp_path)
    lm = gpt_jax.load(run)
    block = lm.model_cfg.block_size
    engine = Engine(lm.model_cfg, lm.params, lm.tokenizer, EngineConfig(slots=4))
    names = ["gpt_jax_local_mc", "gpt_jax_local_gen"]
    with running(engine, lm.tokenizer, None, model_name="gpt2-local") as url:
        # max_length: a request is the prompt plus one generated token, so lm-eval keeps the
        # last block_size - 1 tokens of context + continuation.
        served = lm_eval.simple_evaluate(
            model="local-completions", tasks=names, task_manager=TaskManager(include_path=tasks),
            model_args=f"model=gpt2-local,base_url={url}/v1/completions,num_concurrent=1,"
                       f"max_retries=1,max_length={block},tokenizer_backend=huggingface,"
                       f"tokenizer={os.path.join(os.path.dirname(run), 'hf')}",
            log_samples=True)
    direct = lm_eval.simple_evaluate(model="gpt_jax", model_args=f"workdir={run},batch_rows=8",
                                     tasks=names, task_manager=TaskManager(include_path=tasks),
                                     log_samples=True)
    requests = []
    for example in load_task("choices", data):
        for context, ending in requests_for(example, lm.tokenizer, block):
            kept = (context + ending)[-(block - 1):]
            requests.append(Request(kept[:-len(ending)], ending))
    assert len(requests[8].context) < len(requests_for(load_task("choices", data)[2],
                                                       lm.tokenizer, block)[0].context)
    want = np.array([s.logprob for s in loglikelihoods(lm.model_cfg, lm.params, requests)])
    samples = sorted(served["samples"]["gpt_jax_local_mc"], key=lambda s: s["doc_id"])
    got = np.array([[r[0][0] for r in s["resps"]] for s in samples]).ravel()
    np.testing.assert_allclose(got, want, atol=1e-4)
    picks = [int(np.argmax(row)) for row in want.reshape(len(samples), -1)]
    acc = np.mean([p == c["label"] for p, c in zip(picks, CHOICES)])
    assert served["results"]["gpt_jax_local_mc"]["acc,none"] == pytest.approx(acc)
    # The third context is too long: local-completions keeps its last max_length - 1 -
    # max_gen_toks tokens, the gpt_jax model its last block_size - max_gen_toks.
    answers = [[s["resps"] for s in sorted(out["samples"]["gpt_jax_local_gen"],
                                           key=lambda s: s["doc_id"])][:2]
               for out in (served, direct)]
    assert answers[0] == answers[1]


HARNESS_TASKS = ["gpt_jax_local_mc", "gpt_jax_local_gen", "gpt_jax_local_rolling"]


@pytest.mark.multiprocess
def test_lm_eval_two_processes_match_one(hf_run, tmp_path, monkeypatch):
    """`python -m gpt_jax.evals.harness` on 2 processes (process 0 drives, process 1
    follows; params split over both processes' 4 devices) gives the single-process results:
    multiple choice, generation and rolling."""
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'gpt_jax[eval]'")
    offline = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    for name, value in offline.items():
        monkeypatch.setenv(name, value)
    import lm_eval
    from lm_eval.tasks import TaskManager

    import gpt_jax.evals.harness  # noqa: F401 -- registers --model gpt_jax

    _, run = hf_run
    _, tasks = local_lm_eval_tasks(tmp_path)
    model_args = f"workdir={run},batch_rows=4"
    one = lm_eval.simple_evaluate(model="gpt_jax", model_args=model_args, tasks=HARNESS_TASKS,
                                  task_manager=TaskManager(include_path=tasks), log_samples=True)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "local_multihost.py"), "--num_processes=2",
         "--devices_per_process=2", "--", sys.executable, "-m", "gpt_jax.evals.harness",
         "--model", "gpt_jax", "--model_args", f"{model_args},fsdp=4", "--tasks", *HARNESS_TASKS,
         "--include_path", tasks, "--log_samples", f"--output_path={out}"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ROOT, **offline},
        cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:]  # 0 only when both processes exit 0
    two = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    for task in HARNESS_TASKS:
        metrics = {k: v for k, v in one["results"][task].items() if "," in k}
        assert metrics and {k: two[task][k] for k in metrics} == pytest.approx(metrics)
        lines = next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
        got = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
        want = sorted(one["samples"][task], key=lambda s: s["doc_id"])
        got, want = ([s["filtered_resps"] for s in x] for x in (got, want))
        if task == "gpt_jax_local_gen":
            assert got == want and any(text for texts in got for text in texts)
        else:  # log-likelihoods (and greedy flags), which the samples file writes with str()
            as_floats = np.vectorize(lambda v: float(v == "True") if v in ("True", "False")
                                     else float(v))
            np.testing.assert_allclose(as_floats(np.array(got, str)),
                                       as_floats(np.array(want, str)), atol=1e-5)


def test_lm_eval_rolling_and_generation(hf_run):
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'gpt_jax[eval]'")
    from lm_eval.api.instance import Instance

    import gpt_jax
    from gpt_jax.evals.harness import GptJaxLM

    _, run = hf_run
    harness, lm = GptJaxLM(workdir=run, shard="false"), gpt_jax.load(run)
    text = "def wrap(text, width):\n    return textwrap.wrap(text, width) " * 4
    ids = [lm.tokenizer.eos_id] + lm.tokenizer.encode(text)
    B = lm.model_cfg.block_size
    assert len(ids) > 2 * B + 1  # three windows
    rolling = harness.loglikelihood_rolling(
        [Instance("loglikelihood_rolling", {}, (text,), 0)])[0]
    # window k scores tokens [1 + kB, 1 + (k+1)B) after as many tokens before them as fit
    by_hand = 0.0
    for s in range(1, len(ids), B):
        x = ids[s:s + B]
        c = ids[max(0, s - (B + 1 - len(x))):s]
        lg = gpt_jax_logits(lm, c + x).astype(np.float64)
        logp = lg - lg.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        by_hand += sum(logp[len(c) - 1 + i, t] for i, t in enumerate(x))
    assert rolling == pytest.approx(by_hand, abs=1e-3)
    # one engine call for all of them, each with its own stops and length, against one
    # `generate` per prompt cut by hand at the first stop
    asks = [("import", ["\n"], 12), ("def", ["(", "e"], 9), ("class", [], 5)]
    out = harness.generate_until([Instance("generate_until", {}, (
        prompt, {"until": until, "max_gen_toks": n}), i) for i, (prompt, until, n) in
        enumerate(asks)])
    want = []
    for prompt, until, n in asks:
        text = lm.generate([prompt], max_new_tokens=n, temperature=0.0)[0]
        cuts = [text.index(u) for u in until if u in text]
        want.append(text[:min(cuts)] if cuts else text)
    assert out == want and len(set(want)) == 3


def test_generations_cross_to_the_followers_whole():
    pytest.importorskip("lm_eval", reason="needs the eval extra: pip install 'gpt_jax[eval]'")
    from gpt_jax.evals.harness import Generation, pack_generations, unpack_generations

    # temperatures cross as float32 (what the engine samples with): 0.75 and 1.25 exactly
    gens = [Generation([5, 6, 7], 12, 0.0, ("\n", "Question:")),
            Generation([1], 3, 0.75, ()), Generation([9, 9], 1, 1.25, ("é\u00e9",))]
    assert unpack_generations(pack_generations(gens)) == gens


def gpt_jax_logits(lm, seq: list[int]) -> np.ndarray:
    """Logits of the unpadded sequence minus its last token, one forward pass."""
    return np.asarray(GPT(lm.model_cfg).apply({"params": lm.params}, np.array([seq[:-1]])))[0]


def test_eval_command_prints_a_table_and_writes_json(hf_run, tmp_path, text_corpus):
    _, run = hf_run
    data = write_jsonl(tmp_path / "c.jsonl", CHOICES)
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run(
        [sys.executable, "-m", "gpt_jax.cli", "eval", f"--workdir={run}",
         f"--tasks=choices:{data},nextline:{text_corpus}", "--task_examples=20",
         f"--output={out}"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert ("| task | n | acc | acc_norm | acc_bytes | acc_per_token |" in proc.stdout
            and "| nextline | 20 |" in proc.stdout)
    result = json.loads(out.read_text())["tasks"]
    assert result["choices"]["n"] == 3 and set(result) == {"choices", "nextline"}


def test_train_eval_tasks_reach_metrics_and_the_compare_report(tmp_path, text_corpus):
    from conftest import tiny_run_config
    from gpt_jax import report, train
    from gpt_jax.metrics import read_metrics

    config = tiny_run_config(text_corpus, tmp_path / "cache", num_steps=4, log_every=2,
                             eval_every=2, eval_tasks="nextline", eval_tasks_examples=12)
    train.train(config, str(tmp_path / "run"))
    events = [e for e in read_metrics(str(tmp_path / "run")) if "downstream/nextline/acc" in e]
    assert [e["step"] for e in events] == [2, 4]
    assert all(e["downstream/nextline/n"] == 12 and 0 <= e["downstream/nextline/acc_norm"] <= 1
               for e in events) and "eval_loss" in events[0]
    out = report.compare([str(tmp_path / "run")], str(tmp_path / "report"))
    text = open(out["report"]).read()
    assert "## Downstream tasks" in text and "| nextline acc_norm |" in text
    assert "nextline 12" in text and out["plots"]["nextline_acc_norm_vs_step.png"] == 1


def test_bench_evals_measures_and_projects(tmp_path):
    import math

    from gpt_jax import aot
    from gpt_jax import config as config_lib
    from gpt_jax.bench import evals as bench

    config = config_lib.load_preset("tiny")
    local = bench.measure_local(config, n_examples=2, rows=8)
    assert local["examples"] == 2 and local["examples_per_s"] > 0
    if not aot.libtpu_available():
        pytest.skip("the TPU projection needs libtpu (the tpu extra)")
    tpu = bench.project_tpu(config, "v5e-8", rows=16, length=32)
    assert tpu["hellaswag_batches"] == math.ceil(10_042 * 4 / 16)
    assert tpu["hellaswag_s"] == pytest.approx(tpu["batch_s"] * tpu["hellaswag_batches"])
    assert tpu["batch_s"] > 0


def test_bench_generate_engine_and_static_batches_answer_alike(tmp_path, text_corpus):
    """`bench evals --bench_generate`: the engine's answers and the static batches' (run to
    each batch's longest answer, cut at the newline) are the same, the static batches decode
    at least as many tokens, and the engine compiles nothing after its warm-up."""
    from conftest import tiny_run_config
    from gpt_jax import train
    from gpt_jax.bench import evals as bench

    config = tiny_run_config(text_corpus, tmp_path / "cache", num_steps=30, log_every=30)
    train.train(config, str(tmp_path / "run"))
    g = bench.measure_generate(str(tmp_path / "run"), "", 24, slots=4, rounds=1)
    assert g["examples"] >= 8 and g["same_answers"] == g["examples"]  # all the split has
    assert g["engine_tokens_decoded"] <= g["static_tokens_decoded"]
    assert g["engine_compilations_after"] == g["engine_compilations"]
    assert g["engine_examples_per_s"] > 0 and g["static_examples_per_s"] > 0


LEARNABLE = """
import json, sys
from conftest import tiny_run_config
from gpt_jax import api, evals, train
root = sys.argv[1]
config = tiny_run_config(root + "/corpus", __import__("pathlib").Path(root) / "cache",
                         num_steps=300, log_every=100, eval_every=300, eval_batches=1)
config.checkpoint.update(every=300)
config.optim.update(lr=3e-3, warmup_steps=10)
task = "nextline:" + root + "/corpus/cycle0.txt,generate:" + root + "/qa.jsonl?max_tokens=12"
out = {}
for name, steps in (("trained", 300), ("fresh", 1)):  # fresh: the same model, barely trained
    config.train.num_steps = steps
    train.train(config, f"{root}/{name}")
    out[name] = api.evaluate_run(f"{root}/{name}", task, limit=200)
print(json.dumps(out))
"""


def test_a_briefly_trained_model_beats_chance_on_a_learnable_task(tmp_path):
    """Text that cycles through 12 short lines: the next line follows from the last one, so a
    model trained on it picks it among 4 far above 25%; at step 1 it is near chance. (In its
    own process: a 300-step run, like the CLI's.)"""
    words = ["red fox", "blue jay", "old oak", "wet moss", "dry sand", "hot tea",
             "cold rain", "tall pine", "soft wool", "loud bell", "dim lamp", "fast car"]
    (tmp_path / "corpus").mkdir()
    for doc in range(4):
        (tmp_path / "corpus" / f"cycle{doc}.txt").write_text("\n".join(words * 40) + "\n")
    # Generative: after three lines of the cycle, write the next one (greedy, up to "\n").
    qa = [{"prompt": "\n".join(words[(i + k) % 12] for k in range(3)) + "\n",
           "references": [words[(i + 3) % 12]]} for i in range(12)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in qa))
    stdout = run_on_one_device(LEARNABLE, str(tmp_path))
    result = json.loads(stdout.strip().splitlines()[-1])
    trained, fresh = result["trained"]["nextline"], result["fresh"]["nextline"]
    assert trained["n"] == fresh["n"] == 200
    assert trained["acc_norm"] > 0.8 and fresh["acc_norm"] < 0.45, result
    assert trained["acc_per_token"] > 0.8 and fresh["acc_per_token"] < 0.45, result
    # The stop string ends each answer: an exact match needs the answer and nothing after it.
    trained, fresh = result["trained"]["generate"], result["fresh"]["generate"]
    assert trained["n"] == fresh["n"] == 12
    assert trained["exact_match"] >= 0.9 and fresh["exact_match"] <= 0.1, result
    assert trained["rougeL"] > 0.9 and fresh["rougeL"] < 0.5, result  # (BLEU: 0 on 2 words)
