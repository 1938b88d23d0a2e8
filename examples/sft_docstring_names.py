"""Worked example: fine-tune a small base model to name a function from its docstring.

    python examples/sft_docstring_names.py [--out=runs] [--base_steps=600] [--sft_steps=400]

1. Pairs from the Python standard library (no download): prompt = the first line of a
   function's docstring in a `def` header template, response = the function's name. Held out
   by file, so test functions come from modules the fine-tune never saw.
2. A base model: `configs/tiny.py`-sized byte-level GPT pre-trained on the stdlib corpus.
3. `configs/finetune.py` with `train.init_from=<base>`: eval at step 0 (before) and at the end
   (after) reports the response-token loss and the greedy exact-match accuracy.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import os
import sysconfig

PROMPT = '"""{doc}"""\ndef'


def docstring_pairs(max_prompt_chars: int = 80) -> tuple[list[dict], list[dict]]:
    """(train, held-out) pairs {"prompt": '\"\"\"<doc line>\"\"\"\\ndef', "response": " name"}."""
    root = sysconfig.get_paths()["stdlib"]
    train, held = [], []
    for folder, dirs, files in os.walk(root):  # in place, so that the pruning applies
        dirs[:] = sorted(d for d in dirs if d not in ("test", "tests", "idlelib", "site-packages",
                                                      "lib2to3", "__pycache__"))
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(folder, name)
            try:
                tree = ast.parse(open(path, encoding="utf-8").read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            rel = os.path.relpath(path, root)
            into = held if int(hashlib.sha256(rel.encode()).hexdigest()[:8], 16) % 10 == 0 \
                else train
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    line = doc.strip().splitlines()[0].strip() if doc and doc.strip() else ""
                    if line and len(line) <= max_prompt_chars and not node.name.startswith("__"):
                        into.append({"prompt": PROMPT.format(doc=line),
                                     "response": f" {node.name}"})
    return train, held


def write_jsonl(pairs: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs")
    parser.add_argument("--base_steps", type=int, default=600)
    parser.add_argument("--sft_steps", type=int, default=400)
    args = parser.parse_args()

    from gpt_jax import config as config_lib, train

    train_pairs, held = docstring_pairs()
    data_dir = os.path.join(args.out, "sft_data")
    write_jsonl(train_pairs, os.path.join(data_dir, "train.jsonl"))
    write_jsonl(held, os.path.join(data_dir, "heldout.jsonl"))
    print(f"pairs: {len(train_pairs)} train, {len(held)} held out, e.g. {held[0]}")

    base_dir = os.path.join(args.out, "docnames_base")
    base = config_lib.load_preset("tiny")
    base.model.update(block_size=128, n_layer=4, n_head=4, n_embd=128)
    base.data.update(source="python_stdlib", tokenizer="byte")
    base.train.update(global_batch_size=16, num_steps=args.base_steps, log_every=100,
                      eval_every=args.base_steps, eval_batches=10)
    base.optim.update(lr=2e-3, warmup_steps=50)
    base.checkpoint.update(every=args.base_steps)
    train.train(base, base_dir)

    sft = config_lib.load_preset("finetune")
    sft.data.update(paths=os.path.join(data_dir, "train.jsonl"),
                    sft_eval_paths=os.path.join(data_dir, "heldout.jsonl"), sft_exact_match=256)
    sft.train.update(init_from=base_dir, num_steps=args.sft_steps, eval_every=args.sft_steps,
                     global_batch_size=16)
    sft.optim.update(lr=5e-4)
    sft.checkpoint.update(every=args.sft_steps)
    train.train(sft, os.path.join(args.out, "docnames_sft"))


if __name__ == "__main__":
    main()
