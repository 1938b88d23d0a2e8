"""Multiple-choice tasks from local files; nothing is downloaded.

A task spec is `kind[:path]`, several joined by commas:

    hellaswag:PATH               HellaSwag's released JSONL (ctx, endings, label), scored as llm.c
                                 does: the context as released, each ending after a space
    hellaswag_preprocessed:PATH  the same file with the harness' rendering: "activity_label: ctx_a
                                 Ctx_b", and "[title]"/"[header]" style markers cleaned
    choices:PATH                 generic JSONL of {"context", "choices", "label"}
    nextline[:PATH]              cloze over lines of text: after the lines before it, pick the
                                 true next line among 4 (3 drawn from elsewhere); PATH is a file,
                                 folder or glob of text, else the run's own validation split
    hellaswag_tfds               TFDS `hellaswag` validation split, only if prepared locally
    generate:PATH                generative: JSONL of {"prompt", "references"}, answers scored
                                 by exact match, F1, ROUGE and BLEU (evals/generative.py)

Options follow a path after `?` (URL-encoded): `shots=k` puts k other examples (context and
right ending, or prompt and answer) before each one, joined by `separator` ("\n\n"); the
generative tasks also take `max_tokens`, `stop` and `delimiter` (see evals/generative.py).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterable

import numpy as np

from gpt_jax.data.documents import read_text, split_texts
from gpt_jax.data.files import json_objects, list_files
from gpt_jax.data.prepare import open_tfds
from gpt_jax.errors import DataError, EvalError
import gpt_jax.evals.core as core
import gpt_jax.evals.generative as generative
from gpt_jax.evals.choice import Example

KINDS = ("hellaswag", "hellaswag_preprocessed", "choices", "nextline", "hellaswag_tfds",
         "generate", "core")
NEEDS_PATH = ("hellaswag", "hellaswag_preprocessed", "choices", "generate", "core")
CHOICE_OPTIONS = ("shots", "separator", "seed")
NEXTLINE_CONTEXT_LINES = 6
NEXTLINE_CHOICES = 4


@dataclasses.dataclass
class Task:
    name: str  # unique within a run: the kind, or kind_2, kind_3 ... for repeats
    kind: str
    path: str
    examples: list  # Example (multiple choice) or generative.GenExample
    options: generative.Options = generative.Options()


def parse_specs(spec: str) -> list[tuple[str, str]]:
    """'hellaswag:a.jsonl,nextline' -> [('hellaswag', 'a.jsonl'), ('nextline', '')]."""
    out = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        kind, _, path = item.partition(":")
        if kind not in KINDS:
            raise EvalError(f"task {item!r}: unknown kind {kind!r}; one of {', '.join(KINDS)} "
                            "(written kind:path)")
        if kind in NEEDS_PATH and not path:
            raise EvalError(f"task {item!r} needs a file: {kind}:path/to/file.jsonl")
        out.append((kind, path))
    if not out:
        raise EvalError(f"no task in {spec!r}; expected e.g. hellaswag:path/to/val.jsonl,nextline")
    return out


def _json_lines(path: str) -> Iterable[tuple[str, dict]]:
    return json_objects(path, EvalError)


def make_example(where: str, context, endings, label, separator: str = " ") -> Example:
    if not isinstance(context, str):
        raise EvalError(f"{where}: the context must be a string, got {type(context).__name__}")
    if (not isinstance(endings, list) or len(endings) < 2
            or not all(isinstance(e, str) and e for e in endings)):
        raise EvalError(f"{where}: the endings must be a list of at least 2 non-empty strings")
    if isinstance(label, str) and label.isdigit():  # HellaSwag's label is sometimes "2"
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(endings):
        raise EvalError(f"{where}: label {label!r} is out of range; allowed 0 to "
                        f"{len(endings) - 1} for {len(endings)} endings")
    return Example(context, tuple(endings), label, where, separator)


def _needs(where: str, obj: dict, fields: tuple[str, ...]) -> None:
    missing = [f for f in fields if f not in obj]
    if missing:
        raise EvalError(f"{where}: no {missing[0]!r} field (needs {', '.join(fields)})")


def preprocess(text: str) -> str:
    """The harness' HellaSwag clean-up: ' [title]' -> '. ', other [markers] dropped."""
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def load_hellaswag(path: str, preprocessed: bool = False) -> list[Example]:
    examples = []
    for where, obj in _json_lines(path):
        _needs(where, obj, ("ctx", "endings", "label"))
        context, endings = obj["ctx"], obj["endings"]
        if preprocessed:
            _needs(where, obj, ("activity_label", "ctx_a", "ctx_b"))
            context = preprocess(f"{obj['activity_label']}: {obj['ctx_a']} "
                                 f"{obj['ctx_b'].capitalize()}")
            if isinstance(endings, list):
                endings = [preprocess(e) if isinstance(e, str) else e for e in endings]
        examples.append(make_example(where, context, endings, obj["label"]))
    return examples


def load_choices(path: str) -> list[Example]:
    examples = []
    for where, obj in _json_lines(path):
        _needs(where, obj, ("context", "choices", "label"))
        examples.append(make_example(where, obj["context"], obj["choices"], obj["label"]))
    return examples


def text_files(path: str) -> list[str]:
    """The files of a nextline:PATH (a file, folder or glob; local or remote)."""
    try:
        return [f.path for f in list_files(path, (), what=f"nextline:{path}")]
    except DataError as e:
        raise EvalError(str(e)) from None


def nextline_examples(texts: Iterable[str], limit: int, seed: int = 0, source: str = "text",
                      max_bytes: int = 200) -> list[Example]:
    """Cloze examples: context = the previous lines, choices = the true next line + 3 others.

    A candidate line has 8 to `max_bytes` UTF-8 bytes (so that it fits a small model's context)
    and follows NEXTLINE_CONTEXT_LINES lines of the same document; distractors are candidate
    lines of other places, different from the answer.
    """
    places, lines_of = [], []
    for d, text in enumerate(texts):
        lines = [ln.rstrip() for ln in text.splitlines() if ln.strip()]
        lines_of.append(lines)
        places += [(d, i) for i in range(NEXTLINE_CONTEXT_LINES, len(lines))
                   if len(lines[i].strip()) >= 8 and len(lines[i].encode()) <= max_bytes]
        if len(places) > 200_000:
            break
    pool = [lines_of[d][i] for d, i in places]
    if len(set(pool)) < NEXTLINE_CHOICES:
        raise EvalError(f"nextline: {source} has too few lines (need documents with more than "
                        f"{NEXTLINE_CONTEXT_LINES} non-blank lines of 8-{max_bytes} bytes)")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(places))[:limit or len(places)]
    examples = []
    for k in chosen:
        d, i = places[k]
        answer = lines_of[d][i]
        others: list[str] = []
        while len(others) < NEXTLINE_CHOICES - 1:
            line = pool[int(rng.integers(len(pool)))]
            if line.strip() != answer.strip() and line not in others:
                others.append(line)
        label = int(rng.integers(NEXTLINE_CHOICES))
        endings = others[:label] + [answer] + others[label:]
        context = "\n".join(lines_of[d][i - NEXTLINE_CONTEXT_LINES:i])
        examples.append(Example(context, tuple(endings), label, f"{source} doc {d} line {i}",
                                separator="\n"))
    return examples


def load_tfds_hellaswag(data_dir: str = "") -> list[Example]:
    import tensorflow_datasets as tfds  # only this task kind reads TFDS

    try:
        builder = tfds.builder("hellaswag", data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError:
        raise EvalError("hellaswag_tfds: this tensorflow-datasets has no hellaswag builder; "
                        "pass hellaswag:path/to/hellaswag_val.jsonl") from None
    if not builder.is_prepared():
        raise EvalError(f"hellaswag_tfds: TFDS hellaswag is not prepared in {builder.data_dir}; "
                        "prepare it there (tfds build hellaswag) or pass "
                        "hellaswag:path/to/hellaswag_val.jsonl")
    examples = []
    for i, record in enumerate(builder.as_data_source(split="validation")):
        text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)  # noqa: E731
        examples.append(make_example(f"tfds hellaswag validation {i}", text(record["context"]),
                                     [text(e) for e in record["endings"]],
                                     int(record["label"])))
    return examples


def load_task(kind: str, path: str, *, limit: int = 0, config=None) -> list[Example]:
    """The task's examples (the first `limit`, 0 = all; nextline draws `limit` at random)."""
    if kind in ("hellaswag", "hellaswag_preprocessed"):
        examples = load_hellaswag(path, preprocessed=kind == "hellaswag_preprocessed")
    elif kind == "choices":
        examples = load_choices(path)
    elif kind == "nextline":
        # the separator and the line must fit the context: bytes bound tokens for our tokenizers
        max_bytes = 200 if config is None else min(200, config.model.block_size - 1)
        if path:
            texts = (read_text(f, "all", 0.0)[0] for f in text_files(path))
            return nextline_examples(texts, limit or 1000, source=path, max_bytes=max_bytes)
        if config is None:
            raise EvalError("nextline without a path needs a run (its validation split)")
        if config.data.store:
            raise EvalError(f"nextline without a path needs the run's text; this run reads the "
                            f"token store {config.data.store}: give nextline:PATH (text files)")
        texts = split_texts(config.data, "validation", open_tfds(config.data))
        return nextline_examples(texts, limit or 1000, source="validation split",
                                 max_bytes=max_bytes)
    else:
        examples = load_tfds_hellaswag(config.data.data_dir if config is not None else "")
    if not examples:
        raise EvalError(f"{kind}:{path} holds no examples")
    return examples[:limit] if limit else examples


def with_shots(examples: list[Example], o: generative.Options) -> list[Example]:
    """Multiple choice with `o.shots` other examples (context, separator, right ending) before
    each context."""
    picks = generative.shots_for(len(examples), o.shots, o.seed)
    out = []
    for i, e in enumerate(examples):
        shots = [examples[j].context + examples[j].separator + examples[j].endings[
            examples[j].label] for j in picks[i]]
        out.append(dataclasses.replace(e, context=o.separator.join(shots + [e.context])))
    return out


def load_tasks(spec: str, *, limit: int = 0, config=None) -> list[Task]:
    tasks: list[Task] = []
    for kind, spec_path in parse_specs(spec):
        taken = sum(t.kind == kind for t in tasks)
        name = kind if not taken else f"{kind}_{taken + 1}"
        path, _, query = spec_path.partition("?")
        if kind == "generate":
            options = generative.parse_options(query)
            examples = generative.load(path)
            examples = examples[:limit] if limit else examples
        elif kind == "core":  # a bundle of tasks (evals/core.py): `limit` lines of each
            options, examples = generative.Options(), core.load_bundle(path, limit)
        else:
            options = generative.parse_options(query, CHOICE_OPTIONS)
            examples = load_task(kind, path, limit=limit, config=config)
            examples = with_shots(examples, options) if options.shots else examples
        tasks.append(Task(name, kind, path, examples, options))
    return tasks
