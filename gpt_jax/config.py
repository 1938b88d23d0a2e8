"""Config schema: defaults for every section, preset lookup and validation.

A config is an `ml_collections.ConfigDict` with the sections `model`, `data`, `train`, `optim`,
`mesh`, `checkpoint` and `sample`. Files in `configs/` start from `base_config()` and change what
they need; `validate()` checks the result once, with one clear line per problem.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
from typing import Any

import ml_collections

from gpt_jax.axes import (DEFAULT_LOGICAL_AXIS_RULES, MESH_AXES, RETIRED_AXES, check_rules,
                          normalize_rules)

ATTENTION_IMPLS = ("xla", "cudnn", "reference", "splash", "auto")  # auto: splash on TPU, else xla
# model.remat_policy -> the `jax.checkpoint_policies` member a block is rematerialised with,
# or a tuple of `checkpoint_name`s (model.py) for `save_only_these_names`: only those are kept.
REMAT_CHECKPOINT_POLICIES = {
    "none": None,  # no rematerialisation
    "full": "nothing_saveable",  # recompute the whole block in the backward pass
    "save_dots": "checkpoint_dots",
    "save_dots_no_batch": "checkpoint_dots_with_no_batch_dims",
    "save_qkv_proj": ("qkv_proj",),  # the attention's q/k/v projection
    "save_out_proj": ("out_proj",),  # the attention's output projection
    "save_qkv_out_proj": ("qkv_proj", "out_proj"),
}
REMAT_POLICIES = tuple(REMAT_CHECKPOINT_POLICIES)
POSITIONS = ("learned", "rope")
NORMS = ("layernorm", "rmsnorm")
MLPS = ("gelu", "swiglu", "relu2")
DTYPES = ("float32", "bfloat16", "float16")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
OPTIMIZERS = ("adamw", "muon")
DATA_SOURCES = ("python_stdlib", "text_files", "tfds", "jsonl", "parquet", "sft_jsonl")
TOKENIZERS = ("sentencepiece", "byte", "char", "gpt2_bpe")
SPM_TYPES = ("bpe", "unigram")

class ConfigError(ValueError):
    """A config value that cannot work; the message names the field and what is allowed."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The `model` section; `base_config().model` holds these fields with these defaults.

    Frozen, so that Flax modules can hold it.
    """
    vocab_size: int = 4096
    block_size: int = 256  # context length
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    mlp: str = "gelu"  # gelu | swiglu | relu2 (squared ReLU)
    mlp_ratio: float = 4.0  # MLP hidden width / n_embd
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    position: str = "learned"  # learned | rope
    rope_theta: float = 10_000.0
    tie_embeddings: bool = True  # the LM head is the token embedding
    use_bias: bool = True
    dropout: float = 0.0
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention_impl: str = "auto"  # auto (TPU: splash if it fits, else xla) | xla | cudnn | splash
    scan_layers: bool = False  # one nn.scan over stacked layers instead of n_layer modules
    remat_policy: str = "none"  # see REMAT_CHECKPOINT_POLICIES
    init_std: float = 0.02
    # >1: the loss runs the LM head + log-softmax over this many sequence chunks, recomputed in
    # the backward pass, so no [B, T, V] float32 logits exist at once; 0 or 1: one piece.
    loss_chunks: int = 0
    # Embedding/head rows padded to a multiple of this (e.g. 128, the TPU tile); the padded
    # logits are -inf: no loss, no sample. 1: no padding.
    vocab_multiple: int = 1
    n_kv_head: int = 0  # key/value heads (grouped-query attention); 0: n_head
    qk_norm: bool = False  # RMSNorm (learned [head_dim] scale) on each query and key head
    zero_init_proj: bool = False  # attention and MLP output projections start at zero
    logit_softcap: float = 0.0  # >0: logits = cap * tanh(logits / cap), in float32; 0: off
    # Per-layer v = a*v + b*value_embed(tokens): an extra [vocab, kv width] table; a=1, b=0 at init.
    value_embeddings: bool = False

    def __post_init__(self):
        if self.n_kv_head and self.n_head % self.n_kv_head:
            raise ValueError(f"model.n_head={self.n_head} is not divisible by "
                             f"model.n_kv_head={self.n_kv_head}")

    @classmethod
    def from_config(cls, model_config) -> "ModelConfig":
        return cls(**{k: v for k, v in dict(model_config).items() if k in MODEL_FIELDS})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_kv_head, or n_head when it is 0."""
        return self.n_kv_head or self.n_head

    @property
    def mlp_dim(self) -> int:
        return int(round(self.mlp_ratio * self.n_embd))

    @property
    def padded_vocab_size(self) -> int:
        """Rows of the embedding and LM head: vocab_size up to a multiple of vocab_multiple."""
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
# How a run computes, not what its params are: a fine-tune may choose these for itself.
RUNTIME_MODEL_FIELDS = ("dropout", "dtype", "param_dtype", "attention_impl", "remat_policy",
                        "init_std", "loss_chunks")
# The architecture a fine-tune takes from its parent, so that the parent's params fit.
PARENT_MODEL_FIELDS = tuple(f for f in MODEL_FIELDS if f not in RUNTIME_MODEL_FIELDS)


def base_config() -> ml_collections.ConfigDict:
    """Every field with its default: a small GPT on the built-in corpus, trainable on a CPU."""
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))

    c.data = d = ml_collections.ConfigDict()
    d.source = "python_stdlib"  # python_stdlib | text_files | tfds | jsonl | parquet | sft_jsonl
    d.paths = ""  # text_files/jsonl/parquet: comma-separated files, folders or globs (or gs://)
    d.store = ""  # a prepared token store (gpt-jax prepare), or PATH=W,PATH=W,... to mix several
    d.shard_mb = 64.0  # prepare: MB of JSONL per shard (compressed files: one shard per file)
    d.shard_docs = 4096  # prepare: documents per shard of TFDS / text_files / python_stdlib
    d.extensions = ".txt,.md,.py,.rst"  # text_files: which files a directory contributes
    d.include_tests = False  # python_stdlib: also the test/ folders
    d.tfds_name = ""  # tfds: e.g. tiny_shakespeare, lm1b, c4/en
    d.text_field = "text"  # tfds feature / JSONL key / Parquet column holding the text
    d.train_split = "train"
    d.eval_split = "validation"
    d.data_dir = ""  # TFDS data_dir (local or gs://); "" = ~/.cache/gpt_jax/tfds (tfds: TFDS's own)
    d.validation_fraction = 0.02  # held out: files by the hash of their path (text_files,
    # python_stdlib), documents by the hash of their position (jsonl, parquet)
    d.max_files = 0  # text_files / python_stdlib: use only the first N files (0 = all)
    d.tokenizer = "sentencepiece"  # sentencepiece | byte | char | gpt2_bpe
    d.spm_model = ""  # an existing .model file; "" = train one on the training split
    d.spm_type = "bpe"  # bpe | unigram
    d.spm_sample_bytes = 4_000_000  # how much training text the tokenizer is trained on
    d.spm_special_tokens = ""  # extra comma-separated specials, e.g. "<|im_start|>,<|im_end|>"
    d.spm_byte_fallback = True  # unknown characters become UTF-8 byte pieces
    d.cache_dir = ""  # where small corpora are prepared on first use; "" = ~/.cache/gpt_jax/stores
    d.bpe_dir = ""  # gpt2_bpe: a folder with GPT-2's vocab.json + merges.txt
    d.sft_eval_paths = ""  # sft_jsonl: held-out JSONL; "" = validation_fraction of data.paths
    d.prompt_field = "prompt"  # sft_jsonl: the JSON keys of a pair
    d.response_field = "response"
    d.sft_exact_match = 64  # sft_jsonl: held-out pairs answered greedily at each eval (0: off)
    d.prefetch = 2  # batches a background thread prepares ahead (0: none, synchronous)

    c.train = t = ml_collections.ConfigDict()
    t.seed = 0
    t.global_batch_size = 32
    t.microbatches = 1  # gradient accumulation steps inside one train step
    t.num_steps = 1000
    t.log_every = 25
    t.eval_every = 250
    t.eval_batches = 20
    t.z_loss = 0.0
    t.skip_nonfinite = False  # skip an update with a non-finite loss/grad instead of stopping
    t.init_from = ""  # a run directory or checkpoint to fine-tune from
    t.eval_tasks = ""  # downstream tasks at each eval, e.g. "nextline,hellaswag:val.jsonl"
    t.eval_tasks_examples = 200  # examples per task at each eval (0: all)

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 1e-3
    o.schedule = "cosine"
    o.warmup_steps = 100
    o.decay_steps = -1  # -1: train.num_steps
    o.min_lr_ratio = 0.1
    o.wsd_decay_fraction = 0.2
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.weight_decay = 0.1
    o.decay_embeddings = False
    o.clip_norm = 1.0  # 0 disables clipping
    o.mu_dtype = ""  # AdamW's first moment: "" = the param dtype, or e.g. "bfloat16"
    o.optimizer = "adamw"  # "muon": Muon on the attention/MLP kernels, AdamW on the rest
    o.muon_lr = 0.02  # Muon's peak lr; its schedule has the shape of lr's (warmup, decay)
    o.muon_momentum = 0.95  # Muon's momentum (EMA) coefficient
    o.muon_nesterov = True  # Nesterov momentum for Muon
    o.muon_weight_decay = 0.0  # decoupled weight decay of Muon's matrices (x the Muon lr)

    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = -1  # -1: the devices the other axes leave
    ms.fsdp = 1
    ms.tensor = 1
    ms.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES

    c.checkpoint = ck = ml_collections.ConfigDict()
    ck.every = 250
    ck.keep = 3
    ck.keep_period = 0  # >0: also keep every step divisible by this
    ck.async_save = True

    c.sample = s = ml_collections.ConfigDict()
    s.max_new_tokens = 200
    s.temperature = 0.8
    s.top_k = 40
    s.top_p = 1.0
    s.num_samples = 1
    s.seed = 0
    s.prompt = ""
    return c


def _configs_dir() -> str:
    import configs  # the presets ship as a package next to gpt_jax

    return os.path.dirname(configs.__file__)


def preset_path(name: str) -> str:
    """The file of a preset in `configs/`, e.g. 'gpt2_124m' -> .../configs/gpt2_124m.py."""
    path = os.path.join(_configs_dir(), f"{name}.py")
    if not os.path.exists(path):
        raise ConfigError(f"unknown preset {name!r}; available: {', '.join(list_presets())}")
    return path


def list_presets() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(_configs_dir())
                  if f.endswith(".py") and not f.startswith("_"))


def load_preset(name: str) -> ml_collections.ConfigDict:
    """`get_config()` of configs/<name>.py, validated."""
    preset_path(name)
    config = importlib.import_module(f"configs.{name}").get_config()
    validate(config)
    return config


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise ConfigError(message)


def _check_choice(value: Any, field: str, allowed: tuple[str, ...]) -> None:
    _check(value in allowed, f"{field}={value!r} is not one of {', '.join(allowed)}")


def _check_positive(section: ml_collections.ConfigDict, prefix: str, names: tuple[str, ...]):
    for name in names:
        value = section[name]
        _check(value > 0, f"{prefix}.{name}={value!r} must be > 0")


def resolve_mesh_shape(mesh: ml_collections.ConfigDict, num_devices: int) -> tuple[int, ...]:
    """(data, fsdp, tensor) sizes with the one -1 replaced by the devices left over."""
    sizes = [mesh[a] for a in MESH_AXES]
    spec = ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes))
    _check(all(s == -1 or s >= 1 for s in sizes), f"mesh ({spec}): sizes must be >= 1 or -1")
    _check(sizes.count(-1) <= 1, f"mesh ({spec}): at most one axis may be -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        _check(num_devices % known == 0,
               f"mesh ({spec}) does not divide the {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // known
    _check(math.prod(sizes) == num_devices,
           f"mesh ({spec}) has {math.prod(sizes)} devices but {num_devices} are available")
    return tuple(sizes)


def _validate_data(d: ml_collections.ConfigDict) -> None:
    _check_choice(d.source, "data.source", DATA_SOURCES)
    _check_choice(d.tokenizer, "data.tokenizer", TOKENIZERS)
    _check_choice(d.spm_type, "data.spm_type", SPM_TYPES)
    if d.source in ("text_files", "jsonl", "parquet"):
        _check(bool(d.paths.strip()), f"data.source={d.source!r} needs data.paths "
               "(comma-separated files, directories or globs, local or gs://)")
    if d.source == "sft_jsonl":
        _check(bool(d.paths.strip()), "data.source='sft_jsonl' needs data.paths (comma-separated "
               "JSONL files of {\"prompt\": ..., \"response\": ...})")
    if d.source == "tfds":
        _check(bool(d.tfds_name), "data.source='tfds' needs data.tfds_name, e.g. tiny_shakespeare")
    elif not d.store:  # a store names its own splits
        for field in ("train_split", "eval_split"):
            _check(d[field] in ("train", "validation"), f"data.{field}={d[field]!r} is not one of "
                   f"train, validation (the splits of data.source={d.source!r})")
    _check(0.0 < d.validation_fraction < 1.0,
           f"data.validation_fraction={d.validation_fraction!r} must be in (0, 1)")
    _check(d.max_files >= 0, f"data.max_files={d.max_files} must be >= 0 (0 = all)")
    _check(d.shard_mb > 0, f"data.shard_mb={d.shard_mb} must be > 0")
    _check(d.shard_docs >= 1, f"data.shard_docs={d.shard_docs} must be >= 1")
    _check(d.spm_sample_bytes > 0, f"data.spm_sample_bytes={d.spm_sample_bytes} must be > 0")
    _check(d.prefetch >= 0, f"data.prefetch={d.prefetch} must be >= 0 (0 = no thread)")


def validate(config: ml_collections.ConfigDict, num_devices: int | None = None) -> None:
    """Raise ConfigError naming the first field that cannot work."""
    m, t, o = config.model, config.train, config.optim
    _check_positive(m, "model", ("vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                                 "mlp_ratio", "norm_eps"))
    _check(m.n_embd % m.n_head == 0,
           f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}")
    if m.position == "rope":
        _check((m.n_embd // m.n_head) % 2 == 0,
               f"model.position='rope' needs an even head size, got {m.n_embd // m.n_head}")
    _check(0.0 <= m.dropout < 1.0, f"model.dropout={m.dropout!r} must be in [0, 1)")
    _check_choice(m.attention_impl, "model.attention_impl", ATTENTION_IMPLS)
    _check_choice(m.remat_policy, "model.remat_policy", REMAT_POLICIES)
    _check_choice(m.position, "model.position", POSITIONS)
    _check_choice(m.norm, "model.norm", NORMS)
    _check_choice(m.mlp, "model.mlp", MLPS)
    _check_choice(m.dtype, "model.dtype", DTYPES)
    _check_choice(m.param_dtype, "model.param_dtype", DTYPES)
    _check(m.loss_chunks >= 0, f"model.loss_chunks={m.loss_chunks} must be >= 0 (0 or 1: off)")
    if m.loss_chunks > 1:
        _check(m.block_size % m.loss_chunks == 0, f"model.loss_chunks={m.loss_chunks} does "
               f"not divide model.block_size={m.block_size}")
    _check(m.n_kv_head >= 0, f"model.n_kv_head={m.n_kv_head} must be >= 0 (0: n_head)")
    try:
        ModelConfig.from_config(m)  # the schema's own checks (n_kv_head divides n_head)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(m.logit_softcap >= 0, f"model.logit_softcap={m.logit_softcap} must be >= 0 (0: off)")
    _check(m.vocab_multiple >= 1,
           f"model.vocab_multiple={m.vocab_multiple} must be >= 1 (1: no padding)")

    _validate_data(config.data)

    _check_positive(t, "train", ("global_batch_size", "microbatches", "num_steps", "log_every",
                                 "eval_every", "eval_batches"))
    _check(t.global_batch_size % t.microbatches == 0,
           f"train.global_batch_size={t.global_batch_size} is not divisible by "
           f"train.microbatches={t.microbatches}")
    _check(t.get("eval_tasks_examples", 0) >= 0,
           f"train.eval_tasks_examples={t.get('eval_tasks_examples')} must be >= 0 (0: all)")
    if t.get("eval_tasks"):
        from gpt_jax.evals.tasks import EvalError, parse_specs

        try:
            parse_specs(t.eval_tasks)
        except EvalError as e:
            raise ConfigError(f"train.eval_tasks: {e}") from None
    _check(o.lr > 0, f"optim.lr={o.lr!r} must be > 0")
    _check_choice(o.schedule, "optim.schedule", SCHEDULES)
    _check(o.warmup_steps >= 0, f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    _check(o.clip_norm >= 0, f"optim.clip_norm={o.clip_norm} must be >= 0 (0 disables)")
    _check_choice(o.optimizer, "optim.optimizer", OPTIMIZERS)
    _check(o.muon_lr > 0, f"optim.muon_lr={o.muon_lr!r} must be > 0")
    _check(0 <= o.muon_momentum < 1, f"optim.muon_momentum={o.muon_momentum!r} must be in [0, 1)")
    _check(o.mu_dtype in ("",) + DTYPES, f"optim.mu_dtype={o.mu_dtype!r} is "
           f"not one of '' (the param dtype), {', '.join(DTYPES)}")
    _check(0 < config.sample.top_p <= 1, f"sample.top_p={config.sample.top_p} must be in (0, 1]")
    _check(config.checkpoint.keep >= 1, f"checkpoint.keep={config.checkpoint.keep} must be >= 1")
    try:
        check_rules(normalize_rules(config.mesh.logical_axis_rules))
    except ValueError as e:
        raise ConfigError(f"mesh.logical_axis_rules: {e}") from None

    if num_devices is not None:
        data, fsdp, tensor = resolve_mesh_shape(config.mesh, num_devices)
        rows = t.global_batch_size // t.microbatches
        _check(rows % (data * fsdp) == 0,
               f"train.global_batch_size/microbatches={rows} is not divisible by the "
               f"data*fsdp={data * fsdp} devices it is split over")
        _check(m.n_head % tensor == 0,
               f"model.n_head={m.n_head} is not divisible by mesh.tensor={tensor}")
        _check(m.n_kv_head % tensor == 0, f"model.n_kv_head={m.n_kv_head} is not divisible "
               f"by mesh.tensor={tensor} (key/value heads are split over it)")


def flatten(tree: dict, prefix: str = "") -> dict:
    """{"model": {"n_layer": 4}} -> {"model.n_layer": 4}: the keys overrides are written in."""
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=list)


def from_json(text: str) -> ml_collections.ConfigDict:
    """Inverse of `to_json`, with tuples restored where the schema keeps tuples."""
    raw = json.loads(text)
    config = base_config()
    _merge(config, raw)
    return config


def _merge(config: ml_collections.ConfigDict, raw: dict) -> None:
    for key, value in raw.items():
        if key not in config:
            config[key] = value  # fields newer/older than this schema are kept as written
        elif isinstance(config[key], ml_collections.ConfigDict):
            _merge(config[key], value)
        elif key == "logical_axis_rules":
            config[key] = tuple((n, a) for n, a in normalize_rules(value) if n not in RETIRED_AXES)
        else:
            config[key] = value
