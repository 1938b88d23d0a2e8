"""CORE on a hand-made miniature bundle (nanochat's layout): prompts, splits, scores, centring."""

from __future__ import annotations

import json

import flax.linen as nn
import jax
import numpy as np
import pytest

from gpt_jax.data import ByteTokenizer
from gpt_jax.errors import EvalError
from gpt_jax.evals import core
from gpt_jax.model import GPT, ModelConfig

BYTE = ByteTokenizer()
MC = [{"query": f"Q{i}: {a} plus one is", "choices": [" one", " two", " three"], "gold": g}
      for i, (a, g) in enumerate([("zero", 0), ("one", 1), ("two", 2), ("one", 1)])]
SCHEMA = [{"context_options": ["The cat sat", "The dog ran"], "continuation": "on the mat.",
           "gold": 0},
          {"context_options": ["Birds fly", "Fish swim", "Rocks sing"], "continuation":
           "in the sky.", "gold": 0},
          {"context_options": ["It rained", "It shone"], "continuation": "so we got wet.",
           "gold": 0}]
LM = [{"context": "abc abc abc ", "continuation": "abc"},
      {"context": "one two one two", "continuation": "one"},
      {"context": "xyz", "continuation": "xyz"}]


def write_bundle(root, *, baselines=(25.0, 50.0, 0.0)):
    (root / "eval_data" / "sub").mkdir(parents=True)
    tasks = [("mc", "multiple_choice", "sub/mc.jsonl", MC, 2, " "),
             ("schema", "schema", "schema.jsonl", SCHEMA, 0, " "),
             ("lm", "language_modeling", "lm.jsonl", LM, 1, "")]
    lines = ["icl_tasks:"]
    for (label, kind, uri, rows, shots, delim) in tasks:
        (root / "eval_data" / uri).write_text("".join(json.dumps(r) + "\n" for r in rows))
        lines += [f"- label: {label}", f"  dataset_uri: {uri}", f"  num_fewshot: [{shots}]",
                  f"  icl_task_type: {kind}", f"  continuation_delimiter: {json.dumps(delim)}"]
    (root / "core.yaml").write_text("\n".join(lines) + "\n")
    (root / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Random baseline\n" +
        "".join(f"{t[0]},x,{b}\n" for t, b in zip(tasks, baselines)))
    return str(root)


def test_prompts_are_rendered_whole_with_other_examples_first(tmp_path):
    tasks = {t.label: t for t in core.load_bundle(write_bundle(tmp_path))}
    mc, schema, lm = tasks["mc"], tasks["schema"], tasks["lm"]
    assert sorted(r["query"] for r in mc.items) == sorted(r["query"] for r in MC)  # shuffled
    for i, item in enumerate(mc.items):
        got = core.prompts(mc, i)
        assert got == core.prompts(mc, i)  # deterministic
        assert len(got) == 3 and all(p.count("\n\n") == 2 for p in got)  # two shots
        shots = got[0].split("\n\n")[:2]
        others = [f"{r['query']} {r['choices'][r['gold']]}" for j, r in enumerate(mc.items)
                  if j != i]
        assert all(s in others for s in shots) and item["query"] not in got[0].split("\n\n")[0]
        assert [p.split("\n\n")[-1] for p in got] == [f"{item['query']} {c}"
                                                      for c in item["choices"]]
    assert core.prompts(schema, 0) == [f"{c} {schema.items[0]['continuation']}"
                                       for c in schema.items[0]["context_options"]]
    without, with_ = core.prompts(lm, 0)
    assert with_.startswith(without) and with_.endswith(lm.items[0]["continuation"])


def test_core_equals_a_computation_by_hand(tmp_path):
    cfg = ModelConfig(vocab_size=BYTE.vocab_size, block_size=256, n_layer=2, n_head=2,
                      n_embd=32)
    params = nn.unbox(GPT(cfg).init(jax.random.PRNGKey(3), np.zeros((1, 1), np.int32))["params"])
    tasks = core.load_bundle(write_bundle(tmp_path))
    forward = jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t))

    def nll_and_argmax(seq):
        logits = np.asarray(forward(params, np.array([seq[:-1]])), np.float64)[0]
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -logp[np.arange(len(seq) - 1), seq[1:]], logits.argmax(-1)

    want = {}
    for task in tasks:
        right = []
        for i, item in enumerate(task.items):
            seqs = [[BYTE.bos_id] + BYTE.encode(p) for p in core.prompts(task, i)]
            if task.kind == "language_modeling":  # every continuation token greedy
                start, seq = len(seqs[0]), seqs[1]
                _, argmax = nll_and_argmax(seq)
                right.append(list(argmax[start - 1:]) == seq[start:])
                continue
            n = min(map(len, seqs))
            if task.kind == "multiple_choice":  # after the common prefix
                start = next(k for k in range(n) if len({s[k] for s in seqs}) > 1)
                spans = [(start, len(s)) for s in seqs]
            else:  # the common suffix
                k = next(k for k in range(1, n) if len({s[-k] for s in seqs}) > 1) - 1
                spans = [(len(s) - k, len(s)) for s in seqs]
            means = [nll_and_argmax(s)[0][a - 1:b - 1].mean() for s, (a, b) in zip(seqs, spans)]
            right.append(int(np.argmin(means)) == item["gold"])
        assert core.task_right(cfg, params, BYTE, task, batch_rows=4) == right, task.label
        acc = float(np.mean(right))
        want[task.label] = (acc, (acc - task.baseline) / (1 - task.baseline))
    got = core.evaluate(cfg, params, BYTE, tasks, batch_rows=4)
    for label, (acc, centered) in want.items():
        assert got[label]["acc"] == pytest.approx(acc)
        assert got[label]["centered"] == pytest.approx(centered)
    assert got["mc"]["n"] == 4 and got["lm"]["n"] == 3
    assert got["CORE"]["core"] == pytest.approx(np.mean([c for _, c in want.values()]))
    # and the baselines are read as percentages: 25% of mc, 50% of schema
    assert [t.baseline for t in tasks] == [0.25, 0.5, 0.0]


def test_a_missing_or_bad_bundle_is_one_line(tmp_path):
    with pytest.raises(EvalError, match=r"no CORE bundle at .*nowhere \(no core.yaml\): unzip "
                       r"DCLM's eval bundle \(https://karpathy-public.*\) so that"):
        core.load_bundle(str(tmp_path / "nowhere"))
    bundle = write_bundle(tmp_path / "b")
    path = tmp_path / "b" / "eval_data" / "lm.jsonl"
    path.write_text(json.dumps({"context": "x"}) + "\n")
    with pytest.raises(EvalError, match=r"lm.jsonl:1: a language_modeling line needs context, "
                       "continuation; missing continuation"):
        core.load_bundle(bundle)
    with pytest.raises(EvalError, match=r"CORE task 'mc': num_fewshot 2 needs more than its 2 "
                       r"lines"):
        core.load_bundle(write_bundle(tmp_path / "c"), max_per_task=2)
    (tmp_path / "b" / "eval_meta_data.csv").write_text("Eval Task,Random baseline\nmc,25\n")
    with pytest.raises(EvalError, match="no random baseline for 'schema'"):
        core.load_bundle(bundle)


def test_the_tpu_projection_counts_each_tasks_rows_at_its_longest_rows_bucket(tmp_path):
    """`bench evals --bench_core`: per task the rows its one scoring call packs (a row per
    choice, per context option, one per language-modelling line) and their padded length, by
    hand from the same requests."""
    from gpt_jax.bench.evals import core_shapes
    from gpt_jax.config import load_preset

    config = load_preset("tiny")
    config.model.block_size = 64
    bundle = write_bundle(tmp_path)
    shapes = {t["task"]: t for t in core_shapes(config, bundle, BYTE)}
    assert [shapes[k]["rows"] for k in ("mc", "schema", "lm")] == [
        3 * len(MC), sum(len(r["context_options"]) for r in SCHEMA), len(LM)]
    for task in core.load_bundle(bundle):
        rows = [r for i in range(len(task.items)) for r in core.requests(task, i, BYTE)]
        longest = max(min(len(c) + len(x), 65) - 1 for c, x in rows)
        want = min(max(16, 1 << (longest - 1).bit_length()), 64)
        assert shapes[task.label]["length"] == want
        assert shapes[task.label]["rows_cut"] == sum(len(c) + len(x) > 65 for c, x in rows)
    assert shapes["mc"]["rows_cut"] > 0  # two shots of ~25 bytes each do not fit 64
