"""Generation through the serving engine against independent references: the uncached
forward pass, numpy filters, a request alone, one device."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.tiny import get_config
from conftest import init_sharded
from gpt_jax import sample, sampling_filters
from gpt_jax.config import typed
from gpt_jax.errors import SamplingError
from gpt_jax.model import GPT, ModelConfig
from gpt_jax.serve.engine import Engine, EngineConfig, Request, Sampling

PROMPTS = [[5, 9, 13], [7, 1, 2, 3, 4, 60, 61, 62, 63]]  # lengths 3 and 9


def model_cfg(**overrides) -> ModelConfig:
    config = get_config()
    config.model.update(**overrides)
    return typed(config).model


@functools.lru_cache(maxsize=None)
def init_params(cfg: ModelConfig):
    return GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


BASE = model_cfg()


def engine(cfg=BASE, params=None, slots: int = 4, batch_invariant: bool = False,
           **kw) -> Engine:
    return Engine(cfg, init_params(cfg) if params is None else params,
                  config=EngineConfig(slots=slots, batch_invariant=batch_invariant), **kw)


def full_forward_logits(cfg, params, rows: list[list[int]]) -> np.ndarray:
    """Logits of the whole sequences in one uncached pass (right-padded to block_size)."""
    tokens_BT = np.zeros((len(rows), cfg.block_size), np.int32)
    for b, row in enumerate(rows):
        tokens_BT[b, :len(row)] = row
    apply = jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t))
    return np.asarray(apply(params, tokens_BT), np.float32)


def check_against_full_forward(cfg, params, prompts, new: int, tol: float) -> list[list[int]]:
    """Sampled tokens' log-probs and top-5 log-probs equal the uncached forward pass's."""
    handles = engine(cfg, params).generate([
        Request(p, new, Sampling(1.0, seed=3), logprobs=5) for p in prompts])
    rows = [p + h.choices[0].tokens for p, h in zip(prompts, handles)]
    full_BTV = full_forward_logits(cfg, params, rows)
    for b, (prompt, h) in enumerate(zip(prompts, handles)):
        c = h.choices[0]
        assert len(c.tokens) == new and c.finish_reason == "length"
        expected_NV = np.asarray(jax.nn.log_softmax(
            full_BTV[b, len(prompt) - 1:len(prompt) - 1 + new, :cfg.vocab_size], -1))
        np.testing.assert_allclose(c.logprobs, expected_NV[np.arange(new), c.tokens],
                                   atol=10 * tol, rtol=tol)
        for t, top in enumerate(c.top_logprobs):
            ids, lps = zip(*top)
            np.testing.assert_allclose(lps, np.sort(expected_NV[t])[::-1][:5], atol=10 * tol,
                                       rtol=tol)
            np.testing.assert_allclose(expected_NV[t][list(ids)], lps, atol=10 * tol, rtol=tol)
    assert len({tuple(r) for r in rows}) == len(rows)  # really sampled, not constant
    return rows


# Every option appears at least once (each case is one compile, so not the full product).
@pytest.mark.parametrize("position,scan_layers,dtype", [
    ("learned", False, "float32"), ("rope", True, "float32"), ("rope", False, "bfloat16")])
@pytest.mark.e2e
def test_cached_logprobs_equal_full_forward(position, scan_layers, dtype):
    cfg = model_cfg(position=position, scan_layers=scan_layers, dtype=dtype)
    check_against_full_forward(cfg, init_params(cfg), PROMPTS, 12,
                               1e-5 if dtype == "float32" else 2e-2)


@pytest.mark.e2e
def test_greedy_is_deterministic_and_top_k_1_is_greedy():
    params = init_params(BASE)
    run = functools.partial(sample.generate, engine(), PROMPTS, max_new_tokens=10)
    greedy = run(temperature=0.0, seed=0)
    assert greedy.tokens == run(temperature=0.0, seed=1).tokens
    assert greedy.tokens == run(temperature=1.5, top_k=1, seed=2).tokens
    # Greedy picks the argmax of the uncached forward pass at every step.
    full_BTV = full_forward_logits(BASE, params, [p + t for p, t in zip(PROMPTS, greedy.tokens)])
    for b, prompt in enumerate(PROMPTS):
        argmax_N = full_BTV[b, len(prompt) - 1:len(prompt) + 9, :BASE.vocab_size].argmax(-1)
        assert greedy.tokens[b] == argmax_N.tolist()


def test_seeds_and_num_samples():
    run = functools.partial(sample.generate, engine(), [PROMPTS[0]], max_new_tokens=10,
                            temperature=1.0, num_samples=2)
    a, b, c = run(seed=0), run(seed=0), run(seed=1)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    assert a.tokens[0] != a.tokens[1]  # two samples of one prompt differ


@pytest.mark.parametrize("batch_invariant", [True, False])
def test_a_request_returns_the_same_tokens_alone_or_beside_others(batch_invariant):
    """Bitwise (batch_invariant: every step runs all slots): tokens and log-probs of a seeded
    request do not depend on its neighbours, whatever their settings, lengths or number (more
    requests than slots included). By default a step runs as few slots as hold the active
    ones: the same tokens, log-probs equal to float32 rounding."""
    target = Request([3, 1, 4, 1, 5], 10, Sampling(0.9, top_k=20, top_p=0.9, seed=7), logprobs=3)
    alone = engine(batch_invariant=batch_invariant).generate([target])[0].choices[0]
    others = [Request(list(range(1, 21)), 8, Sampling(1.0, seed=1)),
              Request([2, 7], 12, Sampling(0.0)),
              Request([9, 9, 9], 5, Sampling(0.5, top_p=0.5, seed=3), n=2),
              Request([4] * 25, 6, Sampling(1.2, top_k=3, seed=4)),
              Request([1, 2, 3], 3, Sampling(0.7, top_k=100, seed=5))]
    for neighbours in (others, others[::-1], others * 3):
        eng = engine(batch_invariant=batch_invariant)
        for h in eng.generate(neighbours + [target] + neighbours[:2]):
            if h.request is target:
                beside = h.choices[0]
        assert beside.tokens == alone.tokens
        if batch_invariant:
            assert beside.logprobs == alone.logprobs
            assert beside.top_logprobs == alone.top_logprobs
        else:
            np.testing.assert_allclose(beside.logprobs, alone.logprobs, rtol=1e-5, atol=1e-6)
            assert [[i for i, _ in t] for t in beside.top_logprobs] == [
                [i for i, _ in t] for t in alone.top_logprobs]


def test_compilations_stay_constant_over_mixed_requests():
    eng = engine()
    eng.warm_up()
    compiled = eng.compilations()
    rng = np.random.default_rng(0)
    requests = []
    for i in range(300):
        n = int(rng.integers(1, 3))
        prompt = rng.integers(0, BASE.vocab_size, int(rng.integers(1, 28))).tolist()
        requests.append(Request(prompt, int(rng.integers(0, BASE.block_size - len(prompt) + 1)),
                                Sampling(float(rng.choice([0.0, 0.7, 1.3])),
                                         int(rng.choice([0, 1, 5, 100])),
                                         float(rng.choice([1.0, 0.8])), int(rng.integers(99))),
                                n=n, logprobs=int(rng.choice([0, 5])), echo=bool(i % 3 == 0)))
    handles = eng.generate(requests)
    assert all(h.done.is_set() for h in handles)
    assert eng.compilations() == compiled


def test_eos_ends_a_choice_and_is_not_returned():
    free = sample.generate(engine(), [PROMPTS[1]], max_new_tokens=10, temperature=0.0)
    eos = free.tokens[0][2]
    first = free.tokens[0].index(eos)  # eos may already occur before step 2
    stopped = sample.generate(engine(eos_id=eos), [PROMPTS[1]], max_new_tokens=10,
                              temperature=0.0, num_samples=2)
    assert stopped.tokens == [free.tokens[0][:first]] * 2
    assert stopped.finish_reasons == ["stop", "stop"] and free.finish_reasons == ["length"]
    ignored = sample.generate(engine(eos_id=eos), [PROMPTS[1]], max_new_tokens=10,
                              temperature=0.0, stop_at_eos=False)
    assert ignored.tokens == free.tokens


@pytest.mark.e2e
def test_sharded_generation_equals_single_device():
    config = get_config()
    config.mesh.update(data=4, fsdp=1, tensor=2)
    mesh, rules = typed(config).mesh.make(), typed(config).mesh.rules
    params, _ = init_sharded(GPT(BASE), jax.random.key(1), mesh, rules)
    sharded = engine(params=params, mesh=mesh, rules=rules)
    spec = sharded.cache_sharding.spec
    assert tuple(spec)[:2] == (("data", "fsdp"), "tensor")  # slots, heads
    kw = dict(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    prompts = [[2, 7], [3, 1, 4, 1, 5], list(range(1, 21))]
    on_mesh = sample.generate(sharded, prompts, **kw)
    single = sample.generate(engine(params=jax.device_get(params)), prompts, **kw)
    assert on_mesh.tokens == single.tokens
    np.testing.assert_allclose(sum(on_mesh.logprobs, []), sum(single.logprobs, []), atol=1e-5)


# --- filters on hand-made logits against plain numpy --------------------------------------

def numpy_filter(logits_V, temperature, top_k, top_p):
    x = np.asarray(logits_V, np.float64) / temperature
    order = np.argsort(-x, kind="stable")
    keep = np.ones_like(x, bool)
    if top_k > 0:
        keep[order[top_k:]] = False
    if top_p < 1:
        kept = order[keep[order]]
        probs = np.exp(x[kept] - x[kept].max())
        probs /= probs.sum()
        before = np.cumsum(probs) - probs
        keep[kept[before >= top_p]] = False
    return np.where(keep, x, -np.inf)


LOGITS_BV = np.array([[2.0, 1.0, 0.5, 3.0, -1.0, 0.0, 1.5, -2.0],
                      [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8]], np.float32)
SETTINGS = [(1.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.5), (0.5, 0, 0.9), (2.0, 4, 0.6),
            (1.0, 1, 1.0), (1.0, 0, 1e-6), (0.7, 8, 0.95)]


@pytest.mark.parametrize("temperature,top_k,top_p", SETTINGS)
def test_filtered_logits_match_numpy(temperature, top_k, top_p):
    V = LOGITS_BV.shape[-1]
    scaled_BV = jnp.asarray(LOGITS_BV) / temperature
    B = LOGITS_BV.shape[0]
    scaled_BC, ids_BC = sampling_filters.filtered(scaled_BV, jnp.full((B,), top_k),
                                                  jnp.full((B,), top_p), V)
    got_BV = np.full(LOGITS_BV.shape, -np.inf, np.float32)  # candidates back on the vocabulary
    np.put_along_axis(got_BV, np.asarray(ids_BC), np.asarray(scaled_BC), axis=-1)
    for b in range(B):
        want_V = numpy_filter(LOGITS_BV[b], temperature, top_k, top_p)
        assert np.array_equal(np.isinf(got_BV[b]), np.isinf(want_V)), (got_BV[b], want_V)
        finite = np.isfinite(want_V)
        np.testing.assert_allclose(got_BV[b][finite], want_V[finite], rtol=1e-6)


@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (40, 0.9), (64, 0.5)])
def test_the_candidate_path_matches_numpy_on_a_real_vocabulary(top_k, top_p):
    """A vocabulary far past the default bucket (64 candidates of 50257 with GPT-2): the
    `lax.top_k` candidates, then top-k and top-p among them, equal numpy's full-vocab filter."""
    V, B = 50257, 3
    logits_BV = np.random.default_rng(4).normal(size=(B, V)).astype(np.float32) * 4
    scaled_BC, ids_BC = sampling_filters.filtered(
        jnp.asarray(logits_BV), jnp.full((B,), top_k), jnp.full((B,), top_p),
        sampling_filters.K_BUCKET)
    assert scaled_BC.shape == (B, sampling_filters.K_BUCKET)
    for b in range(B):
        want_V = numpy_filter(logits_BV[b], 1.0, top_k, top_p)
        kept = np.asarray(ids_BC[b])[np.isfinite(np.asarray(scaled_BC[b]))]
        assert sorted(kept) == sorted(np.flatnonzero(np.isfinite(want_V)))
        np.testing.assert_allclose(np.asarray(scaled_BC[b])[np.isfinite(scaled_BC[b])],
                                   want_V[kept], rtol=1e-6)


def test_first_argmax_matches_numpy_including_ties():
    rng = np.random.default_rng(3)
    logits_BV = rng.integers(-3, 4, (64, 37)).astype(np.float32)  # many rows tie for the max
    logits_BV[5] = 2.0  # a whole row tied: the first index
    assert np.array_equal(sampling_filters.first_argmax(jnp.asarray(logits_BV)),
                          np.argmax(logits_BV, axis=-1))


@pytest.mark.e2e
def test_choose_draws_each_row_from_its_own_filtered_distribution():
    """One batch, every row under other settings (each of the three paths: plain, top-k up to
    the bucket, full sort), k_bucket 4 so that top_k=8 takes the sort."""
    n = 12_000
    rows = [(t, k, p) for t, k, p in SETTINGS if k != 1] + [(0.0, 0, 1.0)]
    logits_NV = jnp.asarray(np.tile(LOGITS_BV[0], (n * len(rows), 1)))
    settings = np.repeat(np.array(rows, np.float64), n, axis=0)
    keys = jax.random.split(jax.random.key(0), len(logits_NV))
    tokens, logprob = jax.jit(functools.partial(sampling_filters.choose, k_bucket=4))(
        keys, logits_NV, settings[:, 0].astype(np.float32), settings[:, 1].astype(np.int32),
        settings[:, 2].astype(np.float32))
    tokens = np.asarray(tokens).reshape(len(rows), n)
    for r, (temperature, top_k, top_p) in enumerate(rows):
        if temperature == 0:
            assert (tokens[r] == np.argmax(LOGITS_BV[0])).all()
            continue
        want_V = numpy_filter(LOGITS_BV[0], temperature, top_k, top_p)
        want_V = np.exp(want_V - want_V.max())
        freq_V = np.bincount(tokens[r], minlength=8) / n
        np.testing.assert_allclose(freq_V, want_V / want_V.sum(), atol=0.02)
    raw = jax.nn.log_softmax(LOGITS_BV[0])
    np.testing.assert_allclose(logprob, raw[np.asarray(tokens).ravel()], rtol=1e-6)


# --- bad input: one clear error naming the value ------------------------------------------

@pytest.mark.parametrize("prompts,kwargs,match", [
    ([[1] * 40], {}, "longer than the context"),
    ([[1] * 30], {}, "overflows the context"),
    ([[1, 2]], {"max_new_tokens": 32}, "max_new_tokens=32"),
    ([[1, 2]], {"max_new_tokens": 0}, "max_new_tokens=0"),
    ([[]], {}, "prompt 0 is empty"),
    ([], {}, "prompts is empty"),
    ([[1, 64]], {}, "token id 64"),
    ([[1]], {"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ([[1]], {"top_p": 1.5}, "top_p=1.5"),
    ([[1]], {"top_k": -1}, "top_k=-1"),
    ([[1]], {"temperature": -0.5}, "temperature=-0.5"),
    ([[1]], {"num_samples": 0}, "num_samples=0"),
    ([[1]], {"num_samples": 5}, "n=5 must be between 1 and the engine's 4 slots"),
])
def test_bad_input_raises_clear_error(prompts, kwargs, match):
    kwargs = {"max_new_tokens": 8, **kwargs}
    with pytest.raises(SamplingError, match=match):
        sample.generate(engine(), prompts, **kwargs)


def test_truncation_only_when_asked():
    long_prompt = list(range(1, 31))
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    with pytest.raises(SamplingError, match="truncate_prompt=True"):
        sample.generate(engine(), [long_prompt], **kw)
    out = sample.generate(engine(), [long_prompt], truncate_prompt=True, **kw)
    assert out.prompts == [long_prompt[-16:]]
    assert out.tokens == sample.generate(engine(), [long_prompt[-16:]], **kw).tokens
