"""Generative tasks: the metrics against the libraries and by hand, few-shot choice, task
options and files (no model: the engine's part is tested in test_evals.py)."""

from __future__ import annotations

import json

import pytest
import sacrebleu
from rouge_score import rouge_scorer

from gpt_jax.errors import EvalError
from gpt_jax.evals import format_table, generative, load_tasks
from gpt_jax.evals.generative import Options, normalize, parse_options, score, shots_for, token_f1


@pytest.mark.parametrize("text, want", [
    ("The Cat!", "cat"), ("  an apple,  a pear ", "apple pear"), ("Paris.", "paris"),
    ("theatre", "theatre"), ("A", ""), ("it's 3.5%", "its 35")])
def test_exact_match_normalisation_by_hand(text, want):
    assert normalize(text) == want


def test_token_f1_by_hand():
    assert token_f1("the red fox", "a red fox") == 1.0
    assert token_f1("red fox jumps", "red fox") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert token_f1("blue", "red") == 0.0 and token_f1("", "") == 1.0


def test_rouge_and_bleu_are_the_libraries_own():
    preds = ["the cat sat on the mat", "a quick brown dog", "hello there"]
    refs = [["the cat is on the mat", "a cat sat on a mat"], ["the quick brown fox"],
            ["hello there"]]
    got = score(preds, refs)
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    for k in ("rouge1", "rouge2", "rougeL"):
        want = sum(max(rouge.score(r, p)[k].fmeasure for r in rs) for p, rs in zip(preds, refs))
        assert got[k] == pytest.approx(want / 3)
    streams = [[rs[0] for rs in refs], [rs[1] if len(rs) > 1 else None for rs in refs]]
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(preds, streams).score)
    # "hello there", and "the cat sat on the mat" = "a cat sat on a mat" once articles go
    assert got["exact_match"] == pytest.approx(2 / 3)


def test_few_shot_choice_is_deterministic_and_never_the_example_itself():
    picks = shots_for(10, 3, seed=1234)
    assert picks == shots_for(10, 3, seed=1234) and picks != shots_for(10, 3, seed=1)
    assert all(len(set(p)) == 3 and i not in p and all(0 <= j < 10 for j in p)
               for i, p in enumerate(picks))
    with pytest.raises(EvalError, match="shots=3 needs more than 3 examples"):
        shots_for(3, 3, 0)
    examples = [generative.GenExample(f"Q{i}:", (f"A{i}",)) for i in range(4)]
    prompts = generative.prompts(examples, Options(shots=1, separator="|"))
    j = shots_for(4, 1, 1234)[0][0]
    assert prompts[0] == f"Q{j}: A{j}|Q0:"


def test_options_and_bad_task_files_are_one_line_errors(tmp_path):
    o = parse_options("shots=2&max_tokens=8&stop=%0A&stop=%23%23&separator=%0A")
    assert o == Options(shots=2, max_tokens=8, stop=("\n", "##"), separator="\n")
    with pytest.raises(EvalError, match="task option 'temp' is unknown; allowed: shots"):
        parse_options("temp=1")
    with pytest.raises(EvalError, match=r"max_tokens='0' must be an integer >= 1"):
        parse_options("max_tokens=0")
    with pytest.raises(EvalError, match="task option 'max_tokens' is unknown"):
        load_tasks(f"choices:{tmp_path}/x.jsonl?max_tokens=3")
    for line, error in ((json.dumps({"answer": "x"}), "needs a 'prompt' string"),
                        (json.dumps({"prompt": "q", "references": []}), "needs 'references'"),
                        (json.dumps({"prompt": "q", "references": [""]}), "needs 'references'")):
        (tmp_path / "bad.jsonl").write_text(line + "\n")
        with pytest.raises(EvalError, match=error):
            load_tasks(f"generate:{tmp_path}/bad.jsonl")
    (tmp_path / "ok.jsonl").write_text(json.dumps({"prompt": "q", "answer": "a"}) + "\n")
    task, = load_tasks(f"generate:{tmp_path}/ok.jsonl?stop=.")
    assert task.examples[0].references == ("a",) and task.options.stop == (".",)


def test_multiple_choice_few_shot_puts_right_endings_before_the_context(tmp_path):
    rows = [{"context": f"c{i}", "choices": [f"x{i}", f"y{i}"], "label": i % 2} for i in range(5)]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    task, = load_tasks(f"choices:{tmp_path}/c.jsonl?shots=2&separator=%0A")
    for i, e in enumerate(task.examples):
        a, b = shots_for(5, 2, 1234)[i]
        right = lambda j: rows[j]["choices"][rows[j]["label"]]  # noqa: E731
        assert e.context == f"c{a} {right(a)}\nc{b} {right(b)}\nc{i}"


def test_the_table_shows_each_kind_with_its_metrics():
    text = format_table({"choices": {"acc": 0.5, "acc_norm": 0.5, "acc_bytes": 0.5,
                                     "acc_per_token": 0.25, "n": 4},
                         "generate": {"exact_match": 1.0, "f1": 1.0, "rouge1": 1.0,
                                      "rouge2": 1.0, "rougeL": 1.0, "bleu": 100.0, "n": 2}})
    assert "| choices | 4 | 0.5000 | 0.5000 | 0.5000 | 0.2500 |" in text
    assert "| task | n | exact_match | f1 | rouge1 | rouge2 | rougeL | bleu |" in text
    assert "| generate | 2 | 1.0000 | 1.0000 | 1.0000 | 1.0000 | 1.0000 | 100.00 |" in text
