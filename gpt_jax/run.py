"""A run resolved once: typed config, mesh, tokenizer and data, which everything below takes.

    run = resolve_run(config, workdir)   # a training run: checks, tokenizer, prepared data
    run = open_run(path)                 # a trained run, read only (eval, sample, serve)

`resolve_run` is where a config becomes a `Config` (and with it the one `ModelConfig` of the
run and its checked `LogicalRules`): a fine-tune first takes its parent's architecture, the
tokenizer settles the vocabulary, then every section is made and checked before anything is
written. The corpus is then prepared into the local cache if the config names no store (an
explicit step: reading a store never writes one), and both splits are opened.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
from typing import Any, Mapping

import jax
import ml_collections
from absl import logging
from etils import epath
from jax.sharding import Mesh

from gpt_jax import checkpoint
from gpt_jax.axes import LogicalRules
from gpt_jax.config import Config, fields_flagged
from gpt_jax.data import prepare as prepare_lib
from gpt_jax.data.config import DataConfig
from gpt_jax.data.documents import split_texts
from gpt_jax.data.loader import Dataset
from gpt_jax.data.mixture import open_dataset
from gpt_jax.data.tokenizer_base import META_FILE, TOKENIZER_DIR, Tokenizer
from gpt_jax.data.tokenizers import (
    CharTokenizer,
    build_tokenizer,
    is_saved,
    load_tokenizer,
    ready_tokenizer,
    tokenizer_dir,
)
from gpt_jax.errors import ConfigError, ConfigMismatchError
from gpt_jax.model import ModelConfig
from gpt_jax.serve.chat import write_template

# What resolve_run may set in a config beyond what it was given (a byte/char tokenizer's
# vocabulary); a fine-tune also takes its parent's `arch` fields.
RESOLVED_FIELDS = ("model.vocab_size",)


@dataclasses.dataclass(frozen=True)
class Run:
    config: Config
    workdir: str
    mesh: Mesh
    tokenizer: Tokenizer
    train_data: Dataset | None = None
    val_data: Dataset | None = None

    @property
    def model(self) -> ModelConfig:
        return self.config.model

    @property
    def rules(self) -> LogicalRules:
        return self.config.mesh.rules


def _raw(config: Config | ml_collections.ConfigDict | Mapping) -> dict:
    if isinstance(config, Config):
        return config.to_dict()
    if isinstance(config, ml_collections.ConfigDict):
        return config.to_dict()
    return copy.deepcopy(dict(config))


def inherit_parent(raw: dict) -> None:
    """A fine-tune takes its parent's architecture (the `arch` fields) and tokenizer kind into
    `raw`, the run's own copy: the params must fit."""
    init_from = raw.get("train", {}).get("init_from", "")
    if not init_from:
        return
    parent = checkpoint.load_config(init_from)
    changed = []
    for key in fields_flagged("arch"):
        section, name = key.split(".")
        if name in parent[section] and raw[section].get(name) != parent[section][name]:
            raw[section][name] = parent[section][name]
            changed.append(name)
    raw["data"]["tokenizer"] = parent["data"]["tokenizer"]
    if changed:
        logging.warning("init_from=%s: model fields %s follow the parent run", init_from,
                        ", ".join(changed))


def known_tokenizer(d: DataConfig, workdir: str, init_from: str) -> Tokenizer | None:
    """The run's tokenizer if it can be had without training or writing anything: saved in
    the run directory, the parent's (a fine-tune), ready-made, or a char tokenizer (a scan
    of the training text); None for a SentencePiece model still to be trained."""
    if is_saved(workdir):
        return load_tokenizer(workdir)
    if init_from:
        parent = _run_dir_of(init_from)
        if parent is not None:
            return load_tokenizer(parent)
        return None  # its files are in the checkpoint: restored with the run directory
    ready = ready_tokenizer(d)
    if ready is None and d.tokenizer == "char":
        ready = CharTokenizer.from_texts(split_texts(d, "train", prepare_lib.open_tfds(d)))
    return ready


def _run_dir_of(path: str) -> str | None:
    """The run directory holding `path` (itself, or two levels up from checkpoints/<step>)."""
    path = epath.Path(path)
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / TOKENIZER_DIR / META_FILE).is_file():
            return str(candidate)
    return None


def tokenizer_home(path: str) -> str:
    """A local directory whose tokenizer/ folder holds the tokenizer files of the run at `path`
    (a run directory or checkpoint step, local or remote): the run's own folder where it is
    local, else a temporary copy of its remote folder or of the files stored in the checkpoint."""
    run_dir = _run_dir_of(path)
    if run_dir is not None and "://" not in run_dir:
        return run_dir
    tmp = tempfile.mkdtemp(prefix="gpt_jax_tokenizer_")
    if run_dir is None:
        checkpoint.restore_tokenizer_files(path, tokenizer_dir(tmp))
    else:
        local = epath.Path(tokenizer_dir(tmp))
        local.mkdir()
        for file in epath.Path(tokenizer_dir(run_dir)).iterdir():
            (local / file.name).write_bytes(file.read_bytes())
    return tmp


def run_tokenizer(path: str) -> Tokenizer:
    """The tokenizer of a run directory or checkpoint step (see `tokenizer_home`)."""
    return load_tokenizer(tokenizer_home(path))


def settle_vocab(raw: dict, tok: Tokenizer | None, explicit: frozenset[str] = frozenset()
                 ) -> None:
    """A byte/char tokenizer fixes model.vocab_size (a fine-tune keeps its parent's): a value
    the config file gave is replaced (logged at INFO), one given on the command line (in
    `explicit`) is an error. Any tokenizer must fit the model's vocabulary."""
    if tok is None:
        return
    model = raw["model"]
    if tok.kind in ("byte", "char") and not raw["train"].get("init_from"):
        given = model.get("vocab_size")
        if given is not None and given != tok.vocab_size:
            if "model.vocab_size" in explicit:
                raise ConfigError(f"--config.model.vocab_size={given} but the {tok.kind} "
                                  f"tokenizer has {tok.vocab_size} ids and sets the vocabulary; "
                                  f"drop the flag or give {tok.vocab_size}")
            logging.info("model.vocab_size=%s replaced by the %s tokenizer's %d ids", given,
                         tok.kind, tok.vocab_size)
        model["vocab_size"] = tok.vocab_size
    if tok.vocab_size > model.get("vocab_size", ModelConfig.vocab_size):
        raise ConfigError(f"the {tok.kind} tokenizer has {tok.vocab_size} tokens but "
                          f"model.vocab_size={model.get('vocab_size')}; it must be at least that")


def check_resume(workdir: str, config: Config) -> None:
    """ConfigMismatchError naming every `resume` field whose value differs from the newest
    readable checkpoint's. Reads only the saved config, so a config that cannot resume the run
    is reported as such before any checkpoint is opened."""
    saved = checkpoint.saved_config(workdir)
    if saved is None:
        return
    step, old = saved
    old = Config.from_dict(old, strict=False).to_dict()  # fields it lacks: their defaults
    now = config.to_dict()
    diffs = []
    for key in fields_flagged("resume"):
        section, name = key.split(".")
        if old[section][name] != now[section][name]:
            diffs.append(f"{key}={old[section][name]!r} (the config says {now[section][name]!r})")
    if diffs:
        raise ConfigMismatchError(
            f"the run in {workdir} was trained with {', '.join(diffs)} (checkpoint {step}); "
            "resume with the run's values, use another --workdir, or start a new run from it "
            f"with --config.train.init_from={workdir}")


def _copy_parent_tokenizer(init_from: str, workdir: str) -> None:
    own = epath.Path(tokenizer_dir(workdir))
    if own.exists() or jax.process_index() != 0:
        return
    parent = _run_dir_of(init_from)
    if parent is not None:
        own.mkdir(parents=True)
        for file in epath.Path(tokenizer_dir(parent)).iterdir():
            file.copy(own / file.name)
    else:
        checkpoint.restore_tokenizer_files(init_from, str(own))


def open_data(config: Config, tok: Tokenizer, split: str) -> Dataset:
    """One split of the run's data: data.store, else the corpus prepared into the cache."""
    d = config.data
    store = d.store or prepare_lib.prepare_cached(d, tok)
    return open_dataset(store, tok, split, config.model.block_size)


def resolve_run(config: Config | ml_collections.ConfigDict | Mapping, workdir: str,
                explicit: frozenset[str] = frozenset()) -> Run:
    """The training run of `config` in `workdir` (see the module docstring); `config` itself
    is left as it was. `explicit`: the "section.field" names the user set on the command
    line, which the run may not replace."""
    raw = _raw(config)
    inherit_parent(raw)
    data_cfg = DataConfig.from_dict(raw.get("data", {}))
    init_from = raw.get("train", {}).get("init_from", "")
    tok = known_tokenizer(data_cfg, workdir, init_from)
    settle_vocab(raw, tok, explicit)
    config = Config.from_dict(raw, data=data_cfg)  # the run's one ModelConfig and rules
    config.check_devices(jax.device_count())
    check_resume(workdir, config)
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    if init_from:
        _copy_parent_tokenizer(init_from, workdir)
    if tok is not None and not is_saved(workdir) and jax.process_index() == 0:
        tok.save(tokenizer_dir(workdir))
    tok = build_tokenizer(config.data, config.model.vocab_size, workdir, jax.process_index(),
                          tfds_corpus=prepare_lib.open_tfds(config.data))
    if tok.vocab_size > config.model.vocab_size:
        raise ConfigError(f"the {tok.kind} tokenizer has {tok.vocab_size} tokens but "
                          f"model.vocab_size={config.model.vocab_size}")
    if config.data.is_sft and jax.process_index() == 0:
        write_template(workdir)  # the chat template of the prompt/response format
    mesh = config.mesh.make()
    train_data, val_data = open_data(config, tok, "train"), open_data(config, tok, "validation")
    for dataset in (train_data, val_data):  # both splits must hold a window of the context
        dataset.num_windows(config.model.block_size)
    return Run(config, workdir, mesh, tok, train_data, val_data)


def open_run(path: str, overrides: Mapping[str, Any] | None = None,
             devices: list | None = None) -> tuple[Config, Tokenizer, Mesh]:
    """(config, tokenizer, mesh) of a trained run directory or checkpoint step, read only:
    its saved config with `overrides` ({"section.field": value}) applied, its tokenizer, and
    the config's mesh over `devices` (default: all)."""
    config = Config.from_dict(checkpoint.load_config(path), strict=False)
    if overrides:
        config = config.replace(overrides)
    return config, run_tokenizer(path), config.mesh.make(devices)


