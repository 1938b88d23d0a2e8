"""gpt_jax.attention.attend against a plain-numpy attention, and the impl switch's errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import attention, sharding
from gpt_jax.config import load_preset, typed

B, T, H, K = 2, 8, 3, 4


def numpy_attention(q_BTHK: np.ndarray, k_BSHK: np.ndarray, v_BSHK: np.ndarray,
                    mask_BTS: np.ndarray | None = None) -> np.ndarray:
    """softmax(q k^T / sqrt(K)) v, one (batch, head) at a time, in float64."""
    q, k, v = (np.asarray(a, np.float64) for a in (q_BTHK, k_BSHK, v_BSHK))
    batch, t_len, heads, k_dim = q.shape
    s_len = k.shape[1]
    if mask_BTS is None:
        mask_BTS = np.broadcast_to(np.tril(np.ones((t_len, s_len), bool)), (batch, t_len, s_len))
    out = np.zeros_like(q)
    for b in range(batch):
        for h in range(heads):
            scores_TS = q[b, :, h] @ k[b, :, h].T / np.sqrt(k_dim)
            scores_TS = np.where(mask_BTS[b], scores_TS, -np.inf)
            probs_TS = np.exp(scores_TS - scores_TS.max(-1, keepdims=True))
            probs_TS /= probs_TS.sum(-1, keepdims=True)
            out[b, :, h] = probs_TS @ v[b, :, h]
    return out


def random_qkv(seed: int = 0, s_len: int = T) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    q_BTHK = rng.normal(size=(B, T, H, K)).astype(np.float32)
    k_BSHK = rng.normal(size=(B, s_len, H, K)).astype(np.float32)
    v_BSHK = rng.normal(size=(B, s_len, H, K)).astype(np.float32)
    return q_BTHK, k_BSHK, v_BSHK


@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_causal_attention_matches_numpy(impl: str):
    q, k, v = random_qkv()
    out_BTHK = attention.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl=impl)
    assert out_BTHK.shape == (B, T, H, K)
    np.testing.assert_allclose(out_BTHK, numpy_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_layout", ["bshk", "bhsk"])
@pytest.mark.parametrize("impl", ["reference", "xla", "splash"])
def test_explicit_mask_matches_numpy(impl: str, kv_layout: str):
    """The KV-cache form: T queries at given positions against S > T slots, k/v either layout."""
    S = 12
    q, k, v = random_qkv(seed=1, s_len=S)
    positions_BT = np.array([np.arange(3, 3 + T), np.arange(T) + 4])
    mask_BTS = np.arange(S)[None, None] <= positions_BT[:, :, None]
    as_layout = (lambda x: x) if kv_layout == "bshk" else (lambda x: np.swapaxes(x, 1, 2))
    out_BTHK = attention.attend(jnp.asarray(q), jnp.asarray(as_layout(k)),
                                jnp.asarray(as_layout(v)), impl=impl,
                                mask_BTS=jnp.asarray(mask_BTS), kv_layout=kv_layout)
    np.testing.assert_allclose(out_BTHK, numpy_attention(q, k, v, mask_BTS), atol=1e-5,
                               rtol=1e-5)


def test_heads_major_kv_needs_a_mask():
    q, k, v = (jnp.asarray(a) for a in random_qkv())
    with pytest.raises(ValueError, match=r"kv_layout='bhsk' needs mask_BTS"):
        attention.attend(q, k, v, impl="xla", kv_layout="bhsk")


def test_first_query_sees_only_first_key():
    """Causality in the plainest form: output 0 is v 0, whatever the other keys hold."""
    q, k, v = random_qkv(seed=2)
    out_BTHK = attention.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="xla")
    np.testing.assert_allclose(out_BTHK[:, 0], v[:, 0], atol=1e-6)


def test_xla_and_reference_agree_in_bfloat16():
    q, k, v = (jnp.asarray(a, jnp.bfloat16) for a in random_qkv(seed=3))
    ref_BTHK = attention.attend(q, k, v, impl="reference")
    xla_BTHK = attention.attend(q, k, v, impl="xla")
    assert ref_BTHK.dtype == xla_BTHK.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.float32(xla_BTHK), np.float32(ref_BTHK), atol=2e-2)


@pytest.mark.e2e  # the Pallas interpreter: ~10 s on CPU
def test_the_splash_kernel_and_its_wrapper_match_numpy_in_the_interpreter():
    """The TPU kernel itself (Pallas interpret mode) behind our wrapper: the 1/sqrt(K) scale,
    the layout swaps, grouped-query k/v repeated to every head, the batch through vmap."""
    rng = np.random.default_rng(5)
    b, t, heads, groups, k_dim = 2, 256, 4, 2, 64
    q = rng.normal(size=(b, t, heads, k_dim)).astype(np.float32)
    k, v = (rng.normal(size=(b, t, groups, k_dim)).astype(np.float32) for _ in range(2))
    out = attention.splash_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                     interpret=True)
    repeat = heads // groups
    want = numpy_attention(q, np.repeat(k, repeat, axis=2), np.repeat(v, repeat, axis=2))
    np.testing.assert_allclose(np.asarray(out), want, atol=2e-5, rtol=1e-4)


@pytest.mark.e2e  # the Pallas interpreter
def test_splash_inside_a_scan_under_grad_leaves_nothing_for_the_next_trace():
    """A kernel made inside a scan under grad (microbatches over scanned layers) holds that
    trace's tracers: kept for the next trace (the next compile), it failed there with
    UnexpectedTracerError."""
    q = jnp.full((1, 128, 2, 64), 0.1, jnp.float32)

    def loss(q):
        def body(c, _):
            return c + attention.splash_attention(q, q, q, interpret=True).sum(), None
        return jax.lax.scan(body, 0.0, None, length=2)[0]

    first = jax.jit(jax.grad(jax.checkpoint(loss)))(q)
    again = jax.jit(jax.grad(loss))(q)  # a new trace
    np.testing.assert_allclose(np.asarray(again), np.asarray(first), rtol=1e-5)


def test_cudnn_fails_clearly_on_cpu():
    if jax.devices()[0].platform != "cpu":
        pytest.skip("checks the error on CPU")
    q = jnp.ones((1, 4, 2, 8), jnp.bfloat16)
    with pytest.raises(ValueError, match="attention_impl='cudnn'.*cpu") as info:
        attention.attend(q, q, q, impl="cudnn")
    assert "\n" not in str(info.value)


def test_splash_fails_clearly_under_a_cpu_mesh():
    """Steps run under a mesh: there splash on a CPU is a one-line error."""
    if jax.devices()[0].platform != "cpu":
        pytest.skip("checks the error on CPU")
    config = load_preset("tiny")
    mesh = typed(config).mesh.make()
    q = jnp.ones((8, 4, 2, 8), jnp.bfloat16)
    with sharding.activate(mesh, typed(config).mesh.rules):
        with pytest.raises(ValueError, match="attention_impl='splash'.*cpu") as info:
            jax.jit(lambda q: attention.attend(q, q, q, impl="splash"))(q)
    assert "\n" not in str(info.value)


def test_splash_without_a_mesh_off_tpu_traces_as_reference():
    """Shape-only tracing off TPU (e.g. AOT for a TPU slice from a CPU host) uses the
    reference, so the values must be the reference's."""
    if jax.devices()[0].platform == "tpu":
        pytest.skip("on TPU the kernel itself runs")
    q, k, v = random_qkv(seed=4)
    out_BTHK = attention.attend(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), impl="splash")
    np.testing.assert_allclose(out_BTHK, numpy_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_unknown_impl_lists_the_allowed_ones():
    q = jnp.ones((1, 4, 2, 8))
    with pytest.raises(ValueError, match="'flash'.*reference.*xla.*cudnn.*splash"):
        attention.attend(q, q, q, impl="flash")


def _decode_reference(q_B1HK, k_BGSK, v_BGSK, positions_B):
    """numpy: each row's query against its cache slots 0..position, grouped-query heads."""
    B, _, H, K = q_B1HK.shape
    G = k_BGSK.shape[1]
    out = np.zeros((B, 1, H, K), np.float64)
    for b in range(B):
        n = positions_B[b] + 1
        for h in range(H):
            g = h // (H // G)
            s = k_BGSK[b, g, :n].astype(np.float64) @ q_B1HK[b, 0, h] / np.sqrt(K)
            p = np.exp(s - s.max())
            out[b, 0, h] = (p / p.sum()) @ v_BGSK[b, g, :n]
    return out


@pytest.mark.parametrize("whole", [False, True])  # True: the TPU path, one pass over all
@pytest.mark.parametrize("positions", [[0, 5], [15, 3], [16, 17], [40, 2], [63, 63]])
def test_decode_attention_matches_numpy_in_every_branch(positions, whole):
    # S=64: prefixes of 16 and 32 slots, then the chunk loop (one 64-slot chunk)
    rng = np.random.default_rng(0)
    B, H, G, S, K = 2, 4, 2, 64, 8
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((B, 1, H, K), (B + 1, G, S, K), (B + 1, G, S, K)))
    got = attention.decode_attention(q, k, v, jnp.array(positions, jnp.int32), whole=whole)
    np.testing.assert_allclose(np.asarray(got), _decode_reference(q, k, v, positions),
                               rtol=1e-5, atol=1e-6)


def test_the_tpu_cache_write_by_select_equals_the_scatter():
    """One new key/value per row written by a select over the first B rows of a larger cache
    (the TPU path) gives the scatter's cache exactly; other rows and slots are untouched."""
    from gpt_jax.model import _write_cache

    rng = np.random.default_rng(2)
    R, B, G, S, K = 4, 3, 2, 16, 8
    cache = tuple(jnp.asarray(rng.standard_normal((R, G, S, K)), jnp.float32) for _ in "kv")
    new = tuple(jnp.asarray(rng.standard_normal((B, 1, G, K)), jnp.bfloat16) for _ in "kv")
    positions = jnp.array([[0], [7], [15]], jnp.int32)
    scattered = _write_cache(cache, positions, *new, whole=False)
    selected = _write_cache(cache, positions, *new, whole=True)
    for a, b, old, fresh in zip(scattered, selected, cache, new):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        np.testing.assert_array_equal(np.asarray(b[1, :, 7]), np.asarray(fresh[1, 0], np.float32))
        np.testing.assert_array_equal(np.asarray(b[3]), np.asarray(old[3]))
        assert int((np.asarray(b) != np.asarray(old)).any(axis=(1, 3)).sum()) <= B


def test_a_decode_row_is_bitwise_the_same_beside_a_longer_row():
    rng = np.random.default_rng(1)
    B, H, S, K = 2, 2, 1024, 8
    q, k, v = (rng.standard_normal(s).astype(np.float32)
               for s in ((B, 1, H, K), (B, H, S, K), (B, H, S, K)))
    step = jax.jit(attention.decode_attention)
    for position in (3, 15, 30, 60, 120, 300):
        alone = np.asarray(step(q, k, v, jnp.array([position] * 2, jnp.int32)))[0]
        for far in (20, 40, 100, 200, 700, 1023):  # longer prefixes, then the chunk loop
            if far > position:
                beside = np.asarray(step(q, k, v, jnp.array([position, far], jnp.int32)))[0]
                np.testing.assert_array_equal(beside, alone, err_msg=f"{position} by {far}")
