"""The `data` section: where a run's documents come from and how they become tokens.

Plain Python (no JAX): `gpt-jax prepare`'s worker processes build it from a dict.
"""

from __future__ import annotations

import dataclasses

from gpt_jax.schema import Section, field

# Document sources; all of them go through `gpt-jax prepare` into a token store (data/prepare.py).
SOURCES = ("python_stdlib", "text_files", "tfds", "jsonl", "parquet", "sft_jsonl")
FILE_SOURCES = ("text_files", "jsonl", "parquet", "sft_jsonl")  # read from data.paths
TOKENIZERS = ("sentencepiece", "byte", "char", "gpt2_bpe")
SPM_TYPES = ("bpe", "unigram")
SPLITS = ("train", "validation")


@dataclasses.dataclass(frozen=True)
class DataConfig(Section):
    name = "data"
    source: str = field("python_stdlib")  # one of SOURCES
    paths: str = field("")  # file sources: comma-separated files, folders or globs (or gs://)
    store: str = field("")  # a prepared token store (gpt-jax prepare), or PATH=W,PATH=W,...
    shard_mb: float = field(64.0)  # prepare: MB of JSONL per shard (compressed: one per file)
    shard_docs: int = field(4096)  # prepare: documents per shard of the other sources
    extensions: str = field(".txt,.md,.py,.rst")  # text_files: what a folder contributes
    include_tests: bool = field(False)  # python_stdlib: also the test/ folders
    tfds_name: str = field("")  # tfds: e.g. tiny_shakespeare, lm1b, c4/en
    text_field: str = field("text")  # tfds feature / JSONL key / Parquet column of the text
    train_split: str = field("train")
    eval_split: str = field("validation")
    data_dir: str = field("")  # TFDS data_dir (local or gs://); "" = TFDS's own
    # Held out: files by the hash of their path (text_files, python_stdlib), documents by the
    # hash of their position (jsonl, parquet), pairs by the hash of their prompt (sft_jsonl).
    validation_fraction: float = field(0.02)
    max_files: int = field(0)  # text_files / python_stdlib: only the first N files (0 = all)
    tokenizer: str = field("sentencepiece", resume=True)  # one of TOKENIZERS
    spm_model: str = field("")  # an existing .model file; "" = train one on the training split
    spm_type: str = field("bpe")  # bpe | unigram
    spm_sample_bytes: int = field(4_000_000)  # how much training text the tokenizer sees
    spm_special_tokens: str = field("")  # extra comma-separated specials, e.g. "<|im_end|>"
    spm_byte_fallback: bool = field(True)  # unknown characters become UTF-8 byte pieces
    cache_dir: str = field("")  # where small corpora are prepared; "" = ~/.cache/gpt_jax/stores
    bpe_dir: str = field("")  # gpt2_bpe: a folder with GPT-2's vocab.json + merges.txt
    sft_eval_paths: str = field("")  # sft_jsonl: held-out JSONL; "" = validation_fraction
    prompt_field: str = field("prompt")  # sft_jsonl: the JSON keys of a pair
    response_field: str = field("response")
    sft_exact_match: int = field(64)  # sft_jsonl: held-out pairs answered at each eval (0: off)
    prefetch: int = field(2)  # batches a background thread prepares ahead (0: synchronous)

    def check(self) -> None:
        self.one_of("source", SOURCES)
        self.one_of("tokenizer", TOKENIZERS)
        self.one_of("spm_type", SPM_TYPES)
        if self.source in FILE_SOURCES and not self.store:
            what = ('JSONL files of {"prompt": ..., "response": ...}' if self.source == "sft_jsonl"
                    else "comma-separated files, directories or globs, local or gs://")
            self.require(bool(self.paths.strip()),
                         f"data.source={self.source!r} needs data.paths ({what})")
        if self.source == "tfds" and not self.store:
            self.require(bool(self.tfds_name),
                         "data.source='tfds' needs data.tfds_name, e.g. tiny_shakespeare")
        elif not self.store:  # a store names its own splits
            for name in ("train_split", "eval_split"):
                self.require(getattr(self, name) in SPLITS, f"data.{name}={getattr(self, name)!r} "
                             f"is not one of train, validation (the splits of "
                             f"data.source={self.source!r})")
        self.require(0.0 < self.validation_fraction < 1.0, f"data.validation_fraction="
                     f"{self.validation_fraction!r} must be in (0, 1)")
        self.require(self.max_files >= 0, f"data.max_files={self.max_files} must be >= 0 (0 = all)")
        self.positive("shard_mb", "shard_docs", "spm_sample_bytes")
        self.require(self.prefetch >= 0,
                     f"data.prefetch={self.prefetch} must be >= 0 (0 = no thread)")

    @property
    def is_sft(self) -> bool:
        return self.source == "sft_jsonl"
