"""The serving engine: continuous batching over a fixed set of decode slots and one KV cache.

    engine = Engine(model_cfg, params, tokenizer, EngineConfig(slots=8), mesh, rules)
    engine.warm_up()                       # compiles every shape the engine will run
    handle = engine.submit(Request(prompt_ids, max_tokens=64, sampling=Sampling(0.7, seed=1)))
    engine.run_until_idle()                # or engine.start(): a thread runs the loop
    handle.choices[0].text, handle.choices[0].finish_reason

Device state: one KV cache of `slots` rows of the full context (sharded by the model's cache
axes: slots over the batch axes, heads over `tensor`), and per slot its last token, position,
generated count, PRNG key, sampling settings and how many top log-probs it wants. Three
compiled functions move it:

- `prefill(params, prompt)`: the prompt right-padded to a power-of-two bucket (>= 16) through
  the model with a cache of the bucket's length: that cache and the logits at the last prompt
  token (and, for `echo` with `logprobs`, every prompt token's log-prob);
- `insert(state, prefill cache, slot, ...)`: writes that cache into slot `slot` (a traced
  index: one compile per bucket) and samples the request's first token there;
- `decode_step(params, state)`: the next token of every active slot at its own position,
  over the first `rows` slots: one compile per power-of-two row count, so one request alone
  does not pay for all slots; it reads the cache only as far as the longest row has reached.

A loop iteration (`step`) admits waiting requests into free slots (the server one per step, so
running slots wait for at most one prefill; `generate`, offline, as many as fit), then runs one
decode step for the active slots;
finished slots (EOS, max_tokens, a stop string, a full context, a cancelled request) are freed
on the host. A row's tokens depend only on its own prompt, settings and seed: the same
whether it runs alone or beside others (`attention.decode_attention`, `sampling_filters`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import secrets
import threading
import time
import zlib
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_jax import sampling_filters
from gpt_jax.axes import ACT_BATCH, LogicalRules
from gpt_jax.errors import OverloadedError, SamplingError
from gpt_jax.model import GPT, KVCache, ModelConfig, init_kv_cache, kv_cache_axes
from gpt_jax.serve.text import TextStream
from gpt_jax.sharding import activate, batch_shards, named

MIN_BUCKET = 16
TOP_LOGPROBS = 5  # alternatives per token a request may ask for (OpenAI's completions limit)
FINISH_REASONS = ("stop", "length", "cancelled")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    slots: int = 8  # requests decoded at once (each choice of n takes one)
    max_queue: int = 256  # waiting requests; more are refused (OverloadedError: HTTP 429)
    k_bucket: int = sampling_filters.K_BUCKET  # top-k up to this uses the fast candidate path
    # True: every decode step runs all slots, so a request's log-probs are bitwise the same
    # whatever else runs (its tokens are anyway, but for ties in the last bit); False: a step
    # runs the smallest power-of-two number of slots that holds the active ones (faster when
    # few are busy; the matmuls' rounding then depends on that number).
    batch_invariant: bool = False
    # Prompts of one bucket prefilled in one call, up to this many (a power-of-two row count
    # each, so 1, 2, 4, ...); `generate` uses it, the server admits one request per step.
    prefill_rows: int = 4

    def __post_init__(self):
        for name in ("slots", "max_queue", "k_bucket", "prefill_rows"):
            if getattr(self, name) < 1:
                raise SamplingError(f"{name}={getattr(self, name)} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int | None = None  # None: a random one

    def check(self) -> None:
        if not self.temperature >= 0:
            raise SamplingError(f"temperature={self.temperature!r} must be >= 0 (0 means greedy)")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise SamplingError(f"top_k={self.top_k!r} must be an integer >= 0 (0 means no "
                                "top-k)")
        if not 0 < self.top_p <= 1:
            raise SamplingError(f"top_p={self.top_p!r} must be in (0, 1] (1 means no top-p)")


@dataclasses.dataclass
class Request:
    prompt: list[int]  # token ids, at least one
    max_tokens: int = 16  # new tokens per choice; 0: none (echo / prompt log-probs only)
    sampling: Sampling = Sampling()
    n: int = 1  # choices, each in its own slot, sample j keyed by (seed, prompt, j)
    stop: tuple[str, ...] = ()  # stop strings (need a tokenizer)
    logprobs: int | None = None  # None: none; k: the chosen token's and the top k (0-5)
    echo: bool = False  # with logprobs: also score the prompt's tokens
    ignore_eos: bool = False


@dataclasses.dataclass
class Choice:
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = dataclasses.field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stream: TextStream | None = None


@dataclasses.dataclass
class Event:
    """What `Handle.on_event` receives: choice `index`'s new token (with its log-prob and top
    alternatives) and the text it made showable, or the choice's end."""
    index: int
    text: str = ""
    tokens: tuple[int, ...] = ()
    logprobs: tuple[float, ...] = ()
    top: tuple[tuple[tuple[int, float], ...], ...] = ()
    finish_reason: str | None = None


class Handle:
    """A submitted request: its choices fill in as the engine runs; `on_event` (if set) hears
    each new piece of text and each choice's end, from the engine's thread."""

    def __init__(self, request: Request, on_event: Callable[[Event], None] | None = None):
        self.request, self.on_event = request, on_event
        self.choices = [Choice() for _ in range(request.n)]
        self.prompt_logprobs: list[float | None] | None = None
        self.prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.done = threading.Event()
        self._cancel = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def cancel(self) -> None:
        """Stop generating: the engine frees the request's slots at its next step."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)

    def _emit(self, event: Event) -> None:
        if self.on_event is not None:
            self.on_event(event)


def prompt_hash(prompt: Sequence[int]) -> int:
    """A stable 31-bit hash of a token sequence (keys each choice's random stream)."""
    return zlib.crc32(np.asarray(prompt, np.int32).tobytes()) & 0x7FFFFFFF


def bucket(n: int, cap: int, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum), but at most `cap` (itself >= n)."""
    return min(sampling_filters.power_of_two_bucket(n, minimum), cap)


def row_buckets(slots: int, shards: int = 1) -> list[int]:
    """Decode row counts: powers of two from max(2, shards) up to the slots, then the slots.
    Never 1 of several: XLA:CPU turns a one-row cache write into a select over a copy of the
    whole cache (measured: 1.25 s a step for GPT-2 124M at 32 slots, against 0.18 s at 8)."""
    out, b = [], min(max(2, shards), slots)
    while b < slots:
        out.append(b)
        b *= 2
    return out + [slots]


def prompt_buckets(block_size: int) -> list[int]:
    sizes, size = [], MIN_BUCKET
    while size < block_size:
        sizes.append(size)
        size *= 2
    return sizes + [block_size]


# -- the compiled functions -----------------------------------------------------------------

def _top(logprobs_XV):
    lp, ids = jax.lax.top_k(logprobs_XV, min(TOP_LOGPROBS, logprobs_XV.shape[-1]))
    return ids.astype(jnp.int32), lp


def _whole(tree, cache_sharding):
    """`tree` replicated on the cache's mesh (what the host reads must be on every process)."""
    if cache_sharding is None:
        return tree
    return jax.lax.with_sharding_constraint(tree, NamedSharding(cache_sharding.mesh, P()))


@functools.partial(jax.jit, static_argnames=("cfg", "with_logprobs", "cache_sharding"))
def _prefill(params, tokens_NP, last_N, *, cfg: ModelConfig, with_logprobs: bool,
             cache_sharding=None):
    """(prefill cache of the N prompts, logits at each one's last token [N, V], and with
    `with_logprobs` (N = 1) the prompt's log-probs)."""
    N, P_ = tokens_NP.shape
    model, cache = GPT(cfg), init_kv_cache(cfg, N, P_)
    positions_NP = jnp.broadcast_to(jnp.arange(P_), (N, P_))
    if not with_logprobs:
        logits_N1V, cache = model.apply({"params": params}, tokens_NP, positions_NP, cache,
                                        last_N)
        return cache, logits_N1V[:, 0, :cfg.vocab_size].astype(jnp.float32), None
    logits_1PV, cache = model.apply({"params": params}, tokens_NP, positions_NP, cache)
    logits_PV = logits_1PV[0, :, :cfg.vocab_size].astype(jnp.float32)
    logprobs_PV = jax.nn.log_softmax(logits_PV, axis=-1)
    next_P = jnp.concatenate([tokens_NP[0, 1:], jnp.zeros((1,), jnp.int32)])
    chosen_P = jnp.take_along_axis(logprobs_PV, next_P[:, None], -1)[:, 0]  # of token t+1
    return (cache, logits_PV[last_N[0]][None],
            _whole((chosen_P, *_top(logprobs_PV)), cache_sharding))


def _row_key(seed, prompt_hash_, index):
    """The key of choice `index` of a prompt: its tokens come from it alone."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), prompt_hash_), index)


@functools.partial(jax.jit, static_argnames=("cfg", "k_bucket", "cache_sharding"),
                   donate_argnums=(0,))
def _insert(state, pcache, logits_NV, count, row_S, slot_S, prompt_len_S, seed_S, hash_S,
            index_S, temperature_S, top_k_S, top_p_S, logprobs_S, *, cfg: ModelConfig,
            k_bucket: int, cache_sharding):
    """`state` with the first `count` inserts done: insert i puts prefill row `row_S[i]`'s
    cache into slot `slot_S[i]` with its settings and samples its first token there. The
    per-insert arrays have one entry per slot (the traced `count` says how many are real),
    so one compile per prefill shape serves any number of inserts."""
    def write(i, cache):
        def one(big, small):
            axis = 1 if cfg.scan_layers else 0  # the batch axis: [(layers,) B, G, S, K]
            row = jax.lax.dynamic_slice_in_dim(small, row_S[i], 1, axis)
            start = [0] * big.ndim
            start[axis] = slot_S[i]
            return jax.lax.dynamic_update_slice(big, row.astype(big.dtype), start)
        return KVCache(*(jax.tree.map(one, getattr(cache, f), getattr(pcache, f))
                         for f in ("keys", "values")))

    cache = jax.lax.fori_loop(0, count, write, state["cache"])
    if cache_sharding is not None:
        cache = jax.lax.with_sharding_constraint(cache, KVCache(cache_sharding, cache_sharding))
    keys_S = jax.vmap(_row_key)(seed_S, hash_S, index_S)
    logits_SV = logits_NV[row_S]
    first_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys_S)
    tok_S, logp_S = sampling_filters.choose(first_keys, logits_SV, temperature_S, top_k_S,
                                            top_p_S, k_bucket=k_bucket)
    ids_SK, top_SK = _top(jax.nn.log_softmax(logits_SV, axis=-1))
    S = state["token"].shape[0]
    target_S = jnp.where(jnp.arange(S) < count, slot_S, S)  # past the end: dropped
    put = lambda name, v: state[name].at[target_S].set(v, mode="drop")  # noqa: E731
    state = {"cache": cache, "token": put("token", tok_S),
             "position": put("position", prompt_len_S), "count": put("count", jnp.ones_like(
                 prompt_len_S)), "key": put("key", jax.vmap(jax.random.key_data)(keys_S)),
             "temperature": put("temperature", temperature_S), "top_k": put("top_k", top_k_S),
             "top_p": put("top_p", top_p_S), "logprobs": put("logprobs", logprobs_S)}
    return state, _whole((tok_S, logp_S, ids_SK, top_SK), cache_sharding)


@functools.partial(jax.jit, static_argnames=("cfg", "k_bucket", "cache_sharding", "rows"),
                   donate_argnums=(1,))
def decode_step(params, state, active_S, *, cfg: ModelConfig, k_bucket: int, cache_sharding,
                rows: int | None = None):
    """The next token of every active slot among the first `rows` (None: all), each at its
    own position (a free slot computes at position 0 and is ignored); the outputs have `rows`
    rows. The cache stays whole: the model writes rows 0..rows-1 and reads only the prefix of
    slots the longest row has reached (`attention.decode_attention`)."""
    rows = rows or state["token"].shape[0]
    cache = state["cache"]
    if cache_sharding is not None:
        cache = jax.lax.with_sharding_constraint(cache, KVCache(cache_sharding, cache_sharding))
    head = {k: v[:rows] for k, v in state.items() if k != "cache"}
    position_R = jnp.where(active_S[:rows], head["position"], 0)
    logits_R1V, cache = GPT(cfg).apply({"params": params}, head["token"][:, None],
                                       position_R[:, None], cache)
    logits_RV = logits_R1V[:, 0, :cfg.vocab_size].astype(jnp.float32)
    keys_R = jax.vmap(lambda k, c: jax.random.fold_in(jax.random.wrap_key_data(k), c))(
        head["key"], head["count"])
    tok_R, logp_R = sampling_filters.choose(keys_R, logits_RV, head["temperature"],
                                            head["top_k"], head["top_p"], k_bucket=k_bucket)
    # the alternatives only when an active row asked for them: a top-k over the vocabulary
    wanted = jnp.any(active_S[:rows] & (head["logprobs"] > 0))
    K = min(TOP_LOGPROBS, logits_RV.shape[-1])
    ids_RK, top_RK = jax.lax.cond(
        wanted, lambda: _top(jax.nn.log_softmax(logits_RV, axis=-1)),
        lambda: (jnp.zeros((rows, K), jnp.int32), jnp.zeros((rows, K), jnp.float32)))
    state = {**state, "cache": cache, "token": state["token"].at[:rows].set(tok_R),
             "position": state["position"].at[:rows].set(position_R + 1),
             "count": state["count"].at[:rows].add(1)}
    return state, _whole((tok_R, logp_R, ids_RK, top_RK), cache_sharding)


def initial_state(cfg: ModelConfig, slots: int) -> dict:
    """The engine's device state: the KV cache of `slots` rows of the full context, and per
    slot its last token, position, generated count, PRNG key, sampling settings and how many
    alternatives' log-probs it wants (0: the decode step skips their top-k)."""
    S, key = slots, jax.random.key_data(jax.random.key(0))
    return {"cache": init_kv_cache(cfg, S, cfg.block_size),
            "token": jnp.zeros((S,), jnp.int32), "position": jnp.zeros((S,), jnp.int32),
            "count": jnp.zeros((S,), jnp.int32), "key": jnp.broadcast_to(key, (S,) + key.shape),
            "temperature": jnp.zeros((S,), jnp.float32), "top_k": jnp.zeros((S,), jnp.int32),
            "top_p": jnp.ones((S,), jnp.float32), "logprobs": jnp.zeros((S,), jnp.int32)}


def state_shardings(mesh: Mesh, cache_sharding) -> dict:
    """`initial_state`'s shardings: the cache by the model's cache axes, the rest replicated."""
    repl = NamedSharding(mesh, P())
    shardings = {k: repl for k in ("token", "position", "count", "key", "temperature", "top_k",
                                   "top_p", "logprobs")}
    return {**shardings, "cache": KVCache(cache_sharding, cache_sharding)}


# -- the engine -----------------------------------------------------------------------------

class Engine:
    def __init__(self, model_cfg: ModelConfig, params, tokenizer=None,
                 config: EngineConfig = EngineConfig(), mesh: Mesh | None = None,
                 rules: LogicalRules | None = None, eos_id: int | None = None):
        if mesh is not None and rules is None:
            raise SamplingError("mesh given without rules; pass the config's logical axis rules")
        self.cfg, self.params, self.tokenizer, self.config = model_cfg, params, tokenizer, config
        self.mesh, self.rules = mesh, rules
        if eos_id is None and tokenizer is not None:
            eos_id = getattr(tokenizer, "eos_id", None)
        self.eos_id = None if eos_id is None or eos_id < 0 else int(eos_id)
        S = config.slots
        if mesh is not None and S % batch_shards(mesh, rules):
            raise SamplingError(f"slots={S} is not divisible by the {batch_shards(mesh, rules)} "
                                "devices the batch is split over")
        self.cache_sharding = None if mesh is None else named(mesh, rules, kv_cache_axes(model_cfg))
        self.rows = ([S] if config.batch_invariant else
                     row_buckets(S, 1 if mesh is None else batch_shards(mesh, rules)))
        rows = 1 if config.batch_invariant else min(config.prefill_rows, S)
        self.prefill_rows = [2 ** k for k in range(rows.bit_length()) if 2 ** k <= rows]
        # A prefill's rows are not split over the mesh (heads still are, over `tensor`).
        self.prefill_rules = None if rules is None else LogicalRules(
            tuple((n, None if n == ACT_BATCH else a) for n, a in rules))
        self.state = self._new_state()
        self.slots: list[tuple[Handle, int] | None] = [None] * S
        self.waiting: collections.deque[Handle] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0
        self.decode_seconds = self.host_seconds = 0.0

    # -- state and compiled calls --------------------------------------------------------

    def _new_state(self) -> dict:
        make = functools.partial(initial_state, self.cfg, self.config.slots)
        if self.mesh is None:
            return jax.jit(make)()
        with activate(self.mesh, self.rules):
            return jax.jit(make, out_shardings=state_shardings(self.mesh,
                                                               self.cache_sharding))()

    def _context(self, rules=None):
        if self.mesh is None:
            return _Null()
        return activate(self.mesh, rules or self.rules)

    def _prefill(self, prompts: list[list[int]], with_logprobs: bool, rows: int = 0):
        """One prefill call for `prompts` (of one bucket), padded to `rows` rows (default
        the smallest prefill row count that holds them)."""
        P_ = bucket(max(len(p) for p in prompts), self.cfg.block_size)
        N = rows or next(n for n in self.prefill_rows if n >= len(prompts))
        tokens, last = np.zeros((N, P_), np.int32), np.zeros((N,), np.int32)
        for row, prompt in enumerate(prompts):
            tokens[row, :len(prompt)], last[row] = prompt, len(prompt) - 1
        with self._context(self.prefill_rules):
            return _prefill(self.params, tokens, last, cfg=self.cfg, with_logprobs=with_logprobs,
                            cache_sharding=self.cache_sharding)

    def _insert(self, pcache, logits_NV, inserts: list[tuple]):
        """One insert call: each of `inserts` is (prefill row, slot, prompt, seed, choice
        index, Sampling, logprobs); the first tokens' outputs, still on the device."""
        rows = [(row, slot, len(prompt), seed, prompt_hash(prompt), index, s.temperature,
                 s.top_k, s.top_p, logprobs)
                for row, slot, prompt, seed, index, s, logprobs in inserts]
        rows += [(0, 0, 0, 0, 0, 0, 0.0, 0, 1.0, 0)] * (self.config.slots - len(rows))
        dtypes = (np.int32,) * 4 + (np.uint32, np.int32, np.float32, np.int32, np.float32,
                  np.int32)  # the order of _insert's per-insert arguments
        cols = [np.array(col, dtype) for col, dtype in zip(zip(*rows), dtypes)]
        with self._context():
            self.state, out = _insert(self.state, pcache, logits_NV, np.int32(len(inserts)),
                                      *cols, cfg=self.cfg, k_bucket=self.config.k_bucket,
                                      cache_sharding=self.cache_sharding)
        return out

    def _decode(self, rows: int | None = None):
        """One decode step over the smallest row bucket that holds every active slot (free
        slots are taken lowest first, so the active ones stay low)."""
        if rows is None:
            top = max((i for i, s in enumerate(self.slots) if s is not None), default=0)
            rows = next(b for b in self.rows if b > top)
        active_S = np.array([s is not None for s in self.slots])
        with self._context():
            self.state, out = decode_step(self.params, self.state, active_S, cfg=self.cfg,
                                          k_bucket=self.config.k_bucket,
                                          cache_sharding=self.cache_sharding, rows=rows)
        return out

    def compilations(self) -> int:
        """Compiled programs of the engine's functions so far (constant after `warm_up`)."""
        return sum(f._cache_size() for f in (_prefill, _insert, decode_step))

    def warm_up(self) -> float:
        """Compile every shape the engine runs (each prompt bucket's prefill at each prefill
        row count and with prompt log-probs, and its insert; the decode step at each row
        count); returns the seconds it took. The slots are left free."""
        start = time.perf_counter()
        for size in prompt_buckets(self.cfg.block_size):
            prompt = [0] * size
            shapes = [(rows, False) for rows in self.prefill_rows] + [(1, True)]
            for rows, with_logprobs in shapes:
                pcache, logits_NV, _ = self._prefill([prompt], with_logprobs, rows)
                if not with_logprobs:
                    self._insert(pcache, logits_NV, [(0, 0, prompt, 0, 0, Sampling(0.0), 0)])
        for rows in self.rows:
            jax.block_until_ready(self._decode(rows))
        return time.perf_counter() - start

    # -- requests ------------------------------------------------------------------------

    def check(self, request: Request) -> None:
        """SamplingError naming the first value of `request` that cannot be served."""
        r, L = request, self.cfg.block_size
        if not r.prompt:
            raise SamplingError("the prompt is empty; start it with a BOS token")
        bad = [t for t in r.prompt if not 0 <= int(t) < self.cfg.vocab_size]
        if bad:
            raise SamplingError(f"the prompt has token id {bad[0]} outside the model's "
                                f"vocabulary [0, {self.cfg.vocab_size})")
        if not isinstance(r.max_tokens, (int, np.integer)) or r.max_tokens < 0:
            raise SamplingError(f"max_tokens={r.max_tokens!r} must be an integer >= 0")
        if len(r.prompt) + r.max_tokens > L:
            raise SamplingError(f"the prompt has {len(r.prompt)} tokens and max_tokens="
                                f"{r.max_tokens}: {len(r.prompt) + r.max_tokens} exceed the "
                                f"model's context of {L} tokens")
        if not 1 <= r.n <= self.config.slots:
            raise SamplingError(f"n={r.n} must be between 1 and the engine's "
                                f"{self.config.slots} slots")
        if r.logprobs is not None and not 0 <= r.logprobs <= TOP_LOGPROBS:
            raise SamplingError(f"logprobs={r.logprobs} must be between 0 and {TOP_LOGPROBS}")
        if r.stop and self.tokenizer is None:
            raise SamplingError("stop strings need the engine's tokenizer")
        r.sampling.check()

    def submit(self, request: Request, on_event: Callable[[Event], None] | None = None) -> Handle:
        """Queue `request` (checked first); OverloadedError when the queue is full."""
        self.check(request)
        handle = Handle(request, on_event)
        with self._lock:
            if len(self.waiting) >= self.config.max_queue:
                raise OverloadedError(f"the engine's queue is full ({self.config.max_queue} "
                                      "waiting requests); retry later")
            self.waiting.append(handle)
            self._lock.notify()
        return handle

    @property
    def active(self) -> int:
        return sum(s is not None for s in self.slots)

    # -- the loop ------------------------------------------------------------------------

    def step(self, admit: int = 1) -> bool:
        """Admit up to `admit` waiting requests, then decode one token for every active slot;
        False when there was nothing to do. The server admits one per step, so running slots
        wait for at most one prefill; `generate`, which has no one waiting on each token,
        fills every free slot."""
        start = time.perf_counter()
        self._drop_cancelled()
        host = time.perf_counter() - start
        admitted, calls = self._admit(admit)
        if not self.active:
            self._accept_first(calls)
            return admitted > 0
        start = time.perf_counter()
        owners = list(self.slots)
        decoded = self._decode()  # queued behind the inserts: it runs while their first
        self._accept_first(calls)  # tokens are read and handled here
        tok_R, logp_R, ids_RK, top_RK = jax.device_get(decoded)
        middle = time.perf_counter()
        for slot, owner in enumerate(owners[:len(tok_R)]):
            if owner is not None and self.slots[slot] is owner:  # not ended by its first token
                self._accept(slot, int(tok_R[slot]), float(logp_R[slot]), ids_RK[slot],
                             top_RK[slot])
        self.steps += 1
        self.decode_seconds += middle - start
        self.host_seconds += host + time.perf_counter() - middle
        return True

    def run_until_idle(self) -> None:
        while self.step():
            pass

    def generate(self, requests: Sequence[Request]) -> list[Handle]:
        """Run `requests` to the end on this thread (continuous batching when they outnumber
        the slots); the engine must not be running its own thread."""
        if self._running:
            raise SamplingError("the engine runs its own thread; submit() to it instead")
        handles = [Handle(r) for r in requests]
        for r in requests:
            self.check(r)
        pending = collections.deque(handles)
        while pending or self.waiting or self.active:
            while pending and len(self.waiting) < self.config.max_queue:
                self.waiting.append(pending.popleft())
            self.step(admit=self.config.slots)
        return handles

    def start(self) -> None:
        """Run the loop in a thread until `stop`."""
        self._running = True
        self._thread = threading.Thread(target=self._run, name="gpt_jax-engine", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self._running:
            with self._lock:
                while self._running and not self.waiting and not self.active:
                    self._lock.wait(0.5)
            if self._running:
                self.step()

    def stop(self, deadline_s: float = 0.0) -> None:
        """Stop the loop: in-flight requests get up to `deadline_s` to finish, the rest (and
        everything waiting) end as cancelled."""
        end = time.monotonic() + deadline_s
        while self._running and (self.active or self.waiting) and time.monotonic() < end:
            time.sleep(0.01)
        with self._lock:
            self._running = False
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        for handle in list(self.waiting) + [s[0] for s in self.slots if s is not None]:
            handle.cancel()
        self._drop_cancelled()

    # -- slots ----------------------------------------------------------------------------

    def _drop_cancelled(self) -> None:
        with self._lock:
            cancelled = [h for h in self.waiting if h.cancelled]
            for h in cancelled:
                self.waiting.remove(h)
        for h in cancelled:
            for index in range(h.request.n):
                self._finish(h, index, "cancelled")
        for slot, owner in enumerate(self.slots):
            if owner is not None and owner[0].cancelled:
                self._release(slot, "cancelled")

    def _admit(self, limit: int = 1) -> tuple[int, list]:
        """Take up to `limit` waiting requests (in order) while free slots hold them, prefill
        them (prompts of one bucket together, up to `prefill_rows` per call) and insert each
        choice into a slot. Returns how many were taken and [(slots, first-token outputs
        still on the device)] per insert call."""
        free = [i for i, s in enumerate(self.slots) if s is None]
        taken = []
        with self._lock:
            while (len(taken) < limit and self.waiting
                   and len(free) >= self.waiting[0].request.n):
                handle = self.waiting.popleft()
                room = handle.request.n if handle.request.max_tokens else 0
                taken.append((handle, free[:room]))
                free = free[room:]
        calls = []
        for scored, group in self._prefill_groups(taken):
            pcache, logits_NV, prompt_lp = self._prefill([h.request.prompt for h, _ in group],
                                                         scored)
            if prompt_lp is not None:
                self._keep_prompt_logprobs(group[0][0], prompt_lp)
            inserts = []
            for row, (handle, slots) in enumerate(group):
                r = handle.request
                if not slots:  # max_tokens=0: the prompt's log-probs only
                    for index in range(r.n):
                        self._finish(handle, index, "length")
                    continue
                seed = r.sampling.seed if r.sampling.seed is not None else secrets.randbits(31)
                for index, slot in enumerate(slots):
                    self.slots[slot] = (handle, index)
                    if r.stop or self.tokenizer is not None:
                        handle.choices[index].stream = TextStream(self.tokenizer, r.stop)
                    inserts.append((row, slot, r.prompt, seed, index, r.sampling,
                                    r.logprobs or 0))
            if inserts:
                slots_used = [slot for _, slot, *_ in inserts]
                calls.append((slots_used, self._insert(pcache, logits_NV, inserts)))
        return len(taken), calls

    def _prefill_groups(self, taken: list) -> list[tuple[bool, list]]:
        """[(scored, [(handle, slots)])] per prefill call: a prompt scored for `echo` alone,
        the others by bucket, at most `prefill_rows` per call."""
        groups, by_bucket = [], {}
        for handle, slots in taken:
            r = handle.request
            if r.echo and r.logprobs is not None:
                groups.append((True, [(handle, slots)]))
            else:
                by_bucket.setdefault(bucket(len(r.prompt), self.cfg.block_size),
                                     []).append((handle, slots))
        most = self.prefill_rows[-1]
        return groups + [(False, g[i:i + most]) for g in by_bucket.values()
                         for i in range(0, len(g), most)]

    def _keep_prompt_logprobs(self, handle: Handle, prompt_lp) -> None:
        chosen, ids, top = jax.device_get(prompt_lp)
        r, n = handle.request, len(handle.request.prompt)
        handle.prompt_logprobs = [None] + [float(x) for x in chosen[:n - 1]]
        handle.prompt_top_logprobs = [None] + [
            list(zip(ids[t].tolist(), top[t].tolist()))[:r.logprobs] for t in range(n - 1)]

    def _accept_first(self, calls: list) -> None:
        for (slots, _), (tok_S, logp_S, ids_SK, top_SK) in zip(
                calls, jax.device_get([out for _, out in calls])):
            for i, slot in enumerate(slots):
                handle = self.slots[slot][0]
                if handle.first_token_at is None:
                    handle.first_token_at = time.monotonic()
                self._accept(slot, int(tok_S[i]), float(logp_S[i]), ids_SK[i], top_SK[i])

    def _accept(self, slot: int, token: int, logprob: float, ids, top) -> None:
        handle, index = self.slots[slot]
        r, choice = handle.request, handle.choices[index]
        if token == self.eos_id and not r.ignore_eos:
            return self._release(slot, "stop")
        choice.tokens.append(token)
        choice.logprobs.append(logprob)
        alternatives = list(zip(ids.tolist(), top.tolist()))[:r.logprobs or 0]
        if r.logprobs:
            choice.top_logprobs.append(alternatives)
        text = ""
        if choice.stream is not None:
            text = choice.stream.add(token)
            choice.text = choice.stream.text
        handle._emit(Event(index, text, (token,), (logprob,), (tuple(alternatives),)))
        if choice.stream is not None and choice.stream.stopped:
            self._release(slot, "stop")
        elif (len(choice.tokens) >= r.max_tokens
              or len(r.prompt) + len(choice.tokens) >= self.cfg.block_size):
            self._release(slot, "length")

    def _release(self, slot: int, reason: str) -> None:
        handle, index = self.slots[slot]
        self.slots[slot] = None
        self._finish(handle, index, reason)

    def _finish(self, handle: Handle, index: int, reason: str) -> None:
        choice = handle.choices[index]
        if choice.finish_reason is not None:
            return
        if choice.stream is not None and reason != "stop":
            rest = choice.stream.finish()
            choice.text = choice.stream.text
            if rest:
                handle._emit(Event(index, rest))
        choice.finish_reason = reason
        handle._emit(Event(index, finish_reason=reason))
        if all(c.finish_reason is not None for c in handle.choices):
            handle.done.set()


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
