"""The sampler against independent references: full forward, numpy filters, one device."""

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
from gpt_jax.model import GPT, ModelConfig

PROMPTS = [[5, 9, 13], [7, 1, 2, 3, 4, 60, 61, 62, 63]]  # lengths 3 and 9


def model_cfg(**overrides) -> ModelConfig:
    config = get_config()
    config.model.update(**overrides)
    return typed(config).model


@functools.lru_cache(maxsize=None)
def init_params(cfg: ModelConfig):
    return GPT(cfg).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]


BASE = model_cfg()


def full_forward_logits(cfg, params, rows: list[list[int]]) -> np.ndarray:
    """Logits of the whole sequences in one uncached pass (right-padded to block_size)."""
    tokens_BT = np.zeros((len(rows), cfg.block_size), np.int32)
    for b, row in enumerate(rows):
        tokens_BT[b, :len(row)] = row
    apply = jax.jit(lambda p, t: GPT(cfg).apply({"params": p}, t))
    return np.asarray(apply(params, tokens_BT), np.float32)


# Every option appears at least once (each case is one compile, so not the full product).
@pytest.mark.parametrize("position,scan_layers,dtype", [
    ("learned", False, "float32"), ("rope", True, "float32"), ("rope", False, "bfloat16")])
@pytest.mark.e2e
def test_cached_logits_equal_full_forward(position, scan_layers, dtype):
    cfg = model_cfg(position=position, scan_layers=scan_layers, dtype=dtype)
    params = init_params(cfg)
    new = 12
    out = sample.sample_tokens(cfg, params, PROMPTS, max_new_tokens=new, temperature=1.0,
                               seed=3, return_logits=True)
    assert out.num_steps == new and (out.lengths == new).all()
    rows = [p + out.tokens[b].tolist() for b, p in enumerate(PROMPTS)]
    full_BTV = full_forward_logits(cfg, params, rows)
    tol = 1e-5 if dtype == "float32" else 2e-2
    for b, prompt in enumerate(PROMPTS):
        expected_NV = full_BTV[b, len(prompt) - 1:len(prompt) - 1 + new]
        np.testing.assert_allclose(out.logits[b], expected_NV, atol=tol, rtol=tol)
        logprobs_N = jax.nn.log_softmax(expected_NV, -1)[np.arange(new), out.tokens[b]]
        np.testing.assert_allclose(out.logprobs[b], logprobs_N, atol=10 * tol, rtol=tol)
    assert len({tuple(t) for t in out.tokens.tolist()}) == 2  # really sampled, not constant


@pytest.mark.e2e
def test_greedy_is_deterministic_and_top_k_1_is_greedy():
    params = init_params(BASE)
    # return_logits=True everywhere on BASE: the same compiled program as the parity test.
    run = functools.partial(sample.sample_tokens, BASE, params, PROMPTS, max_new_tokens=10,
                            return_logits=True)
    greedy = run(temperature=0.0, seed=0)
    assert np.array_equal(greedy.tokens, run(temperature=0.0, seed=1).tokens)
    assert np.array_equal(greedy.tokens, run(temperature=1.5, top_k=1, seed=2).tokens)
    # Greedy picks the argmax of the uncached forward pass at every step.
    full_BTV = full_forward_logits(BASE, params, [p + greedy.tokens[b].tolist()
                                                  for b, p in enumerate(PROMPTS)])
    for b, prompt in enumerate(PROMPTS):
        argmax_N = full_BTV[b, len(prompt) - 1:len(prompt) + 9].argmax(-1)
        assert np.array_equal(greedy.tokens[b], argmax_N)


def test_seeds_and_num_samples():
    params = init_params(BASE)
    run = functools.partial(sample.sample_tokens, BASE, params, [PROMPTS[0]], max_new_tokens=10,
                            temperature=1.0, num_samples=2, return_logits=True)
    a, b, c = run(seed=0), run(seed=0), run(seed=1)
    assert np.array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, c.tokens)
    assert not np.array_equal(a.tokens[0], a.tokens[1])  # two samples of one prompt differ


@pytest.mark.e2e
def test_prompt_result_does_not_depend_on_the_batch():
    params = init_params(BASE)
    kw = dict(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    target = [3, 1, 4, 1, 5]
    alone = sample.sample_tokens(BASE, params, [target], **kw)
    batch = sample.sample_tokens(BASE, params, [[2, 7], target, list(range(1, 21))], **kw)
    assert np.array_equal(alone.tokens[0], batch.tokens[1])
    np.testing.assert_allclose(alone.logprobs[0], batch.logprobs[1], atol=1e-5)


def _count_compiles():
    events = []

    def listener(name, *args, **kwargs):
        if name == "/jax/core/compile/backend_compile_duration":
            events.append(name)

    jax.monitoring.register_event_duration_secs_listener(listener)
    return events, lambda: jax.monitoring.unregister_event_duration_listener(listener)


def test_same_bucket_does_not_compile_again():
    params = init_params(BASE)
    sample.sample_tokens(BASE, params, [[1, 2], [3, 4, 5], list(range(1, 20))], max_new_tokens=9,
                         temperature=0.7, top_k=5, top_p=0.8, seed=0)
    events, stop = _count_compiles()
    try:
        # Other prompt lengths / max_new_tokens in the same buckets, other filter values & seed.
        sample.sample_tokens(BASE, params, [list(range(1, 24)), [9], [4, 4, 4, 4]],
                             max_new_tokens=7, temperature=1.3, top_k=50, top_p=0.5, seed=11,
                             eos_id=3)
        assert events == []
        jax.jit(lambda x: x * 3 + 1)(np.float32(2))  # the counter does see a compilation
        assert len(events) == 1
    finally:
        stop()


def test_eos_stops_the_loop_early():
    params = init_params(BASE)
    run = functools.partial(sample.sample_tokens, BASE, params, [PROMPTS[1]], max_new_tokens=10,
                            temperature=0.0, num_samples=2, return_logits=True)
    free = run()
    eos = int(free.tokens[0, 2])
    first = int(np.argmax(free.tokens[0] == eos))  # eos may already occur before step 2
    stopped = run(eos_id=eos, pad_id=0)
    assert stopped.num_steps == first + 1 and (stopped.lengths == first + 1).all()
    assert np.array_equal(stopped.tokens[:, :first + 1], free.tokens[:, :first + 1])
    assert (stopped.tokens[:, first + 1:] == 0).all() and (stopped.logprobs[:, first + 1:] == 0).all()


@pytest.mark.e2e
def test_sharded_sampling_equals_single_device():
    config = get_config()
    config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh, rules = typed(config).mesh.make(), typed(config).mesh.rules
    params, _ = init_sharded(GPT(BASE), jax.random.key(1), mesh, rules)
    spec = sample.cache_sharding(BASE, mesh, rules).spec
    assert tuple(spec)[:2] == (("data", "fsdp"), "tensor")  # batch, heads
    assert sample.batch_shards(mesh, rules) == 4
    kw = dict(max_new_tokens=8, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    prompts = [[2, 7], [3, 1, 4, 1, 5], list(range(1, 21))]
    sharded = sample.sample_tokens(BASE, params, prompts, mesh=mesh, rules=rules, **kw)
    single = sample.sample_tokens(BASE, jax.device_get(params), prompts, **kw)
    assert np.array_equal(sharded.tokens, single.tokens)
    np.testing.assert_allclose(sharded.logprobs, single.logprobs, atol=1e-5)


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


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (1.0, 0, 1.0), (1.0, 3, 1.0), (1.0, 0, 0.5), (0.5, 0, 0.9), (2.0, 4, 0.6), (1.0, 1, 1.0),
    (1.0, 0, 1e-6), (0.7, 8, 0.95)])
def test_filtered_logits_match_numpy(temperature, top_k, top_p):
    V = LOGITS_BV.shape[-1]
    scaled_BC, ids_BC = sampling_filters.candidates(
        jnp.asarray(LOGITS_BV), jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
        k_bucket=sampling_filters.k_bucket_for(top_k, V), use_top_p=top_p < 1.0)
    got_BV = np.full(LOGITS_BV.shape, -np.inf, np.float32)  # candidates back on the vocabulary
    ids_BC = np.broadcast_to(np.arange(V), LOGITS_BV.shape) if ids_BC is None else ids_BC
    np.put_along_axis(got_BV, np.asarray(ids_BC), np.asarray(scaled_BC), axis=-1)
    for b in range(LOGITS_BV.shape[0]):
        want_V = numpy_filter(LOGITS_BV[b], temperature, top_k, top_p)
        assert np.array_equal(np.isinf(got_BV[b]), np.isinf(want_V)), (got_BV[b], want_V)
        finite = np.isfinite(want_V)
        np.testing.assert_allclose(got_BV[b][finite], want_V[finite], rtol=1e-6)


def test_first_argmax_matches_numpy_including_ties():
    rng = np.random.default_rng(3)
    logits_BV = rng.integers(-3, 4, (64, 37)).astype(np.float32)  # many rows tie for the max
    logits_BV[5] = 2.0  # a whole row tied: the first index
    assert np.array_equal(sampling_filters.first_argmax(jnp.asarray(logits_BV)),
                          np.argmax(logits_BV, axis=-1))


@pytest.mark.e2e
def test_choose_draws_from_the_filtered_distribution():
    n, temperature, top_k, top_p = 20_000, 0.8, 5, 0.9
    logits_NV = jnp.broadcast_to(jnp.asarray(LOGITS_BV[0]), (n, LOGITS_BV.shape[1]))
    keys_N = jax.random.split(jax.random.key(0), n)
    tokens_N, logprob_N = sampling_filters.choose(
        keys_N, logits_NV, jnp.float32(temperature), jnp.int32(top_k), jnp.float32(top_p),
        k_bucket=sampling_filters.k_bucket_for(top_k, 8), use_top_p=True)
    want_V = numpy_filter(LOGITS_BV[0], temperature, top_k, top_p)
    want_V = np.exp(want_V - want_V.max())
    want_V /= want_V.sum()
    freq_V = np.bincount(np.asarray(tokens_N), minlength=8) / n
    np.testing.assert_allclose(freq_V, want_V, atol=0.015)
    raw = jax.nn.log_softmax(LOGITS_BV[0])
    np.testing.assert_allclose(logprob_N, raw[np.asarray(tokens_N)], rtol=1e-6)


# --- bad input: one clear ValueError naming the value -------------------------------------

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
])
def test_bad_input_raises_clear_value_error(prompts, kwargs, match):
    kwargs = {"max_new_tokens": 8, **kwargs}
    with pytest.raises(ValueError, match=match):
        sample.sample_tokens(BASE, None, prompts, **kwargs)


def test_truncation_only_when_asked():
    params = init_params(BASE)
    long_prompt = list(range(1, 31))
    kw = dict(max_new_tokens=16, temperature=0.9, top_k=20, top_p=0.9, seed=7)
    with pytest.raises(ValueError, match="truncate_prompt=True"):
        sample.sample_tokens(BASE, params, [long_prompt], **kw)
    out = sample.sample_tokens(BASE, params, [long_prompt], truncate_prompt=True, **kw)
    assert out.prompt_lengths.tolist() == [16]
    again = sample.sample_tokens(BASE, params, [long_prompt[-16:]], **kw)
    assert np.array_equal(out.tokens, again.tokens)



@pytest.mark.e2e
def test_padded_vocabulary_is_never_sampled():
    import flax.linen as nn

    cfg = model_cfg(vocab_multiple=48, tie_embeddings=False)  # 64 ids, 96 head columns
    params = jax.tree.map(np.array, nn.unbox(init_params(cfg)))
    # Every position's final hidden state is b, and the padded columns are 100 b: unmasked,
    # a padded id would be the argmax everywhere and take nearly all the probability.
    b_D = np.random.default_rng(0).normal(size=cfg.n_embd).astype(np.float32)
    params["ln_f"]["scale"][:], params["ln_f"]["bias"][:] = 0.0, b_D
    params["lm_head"]["kernel"][:, 64:] = 100 * b_D[:, None]
    x_BTD = GPT(cfg).apply({"params": params}, jnp.asarray(PROMPTS[:1]), hidden_only=True)
    assert int(jnp.argmax(x_BTD[0, -1] @ params["lm_head"]["kernel"])) >= 64
    for temperature in (1.0, 0.0):
        out = sample.sample_tokens(cfg, params, PROMPTS, max_new_tokens=12, num_samples=4,
                                   temperature=temperature, return_logits=True)
        assert out.logits.shape[-1] == 64 and out.tokens.max() < 64, out.tokens
