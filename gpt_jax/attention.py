"""Causal multi-head attention as one function with an implementation switch.

- `reference`: plain einsum + mask + softmax, everything in float32; the yardstick in tests.
- `xla`: the same einsums in the compute dtype (float32 accumulation and softmax), any backend.
  On CPU it beats `jax.nn.dot_product_attention(implementation="xla")`, whose batched layout
  costs the shakespeare_char step 2 ms (BENCHMARKS.md).
- `cudnn`: the same API with cuDNN's fused flash attention (NVIDIA GPUs, bf16/fp16).
- `splash`: the TPU Pallas splash-attention kernel (TPU backends only).
- `auto`: `splash` when compiling for a TPU and the shapes suit the kernel (`resolve_impl`),
  else `xla`; so on CPU and GPU exactly `xla`.

Grouped-query attention: k and v may have fewer heads G than q's H (H % G == 0); query head
h reads key/value head h // (H / G) (group-major, as `jax.nn.dot_product_attention`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from gpt_jax.axes import ACT_BATCH, ACT_HEADS, ACT_KV, ACT_LENGTH

IMPLS = ("xla", "cudnn", "reference", "splash", "auto")  # model.attention_impl


def resolve_impl(impl: str, platform: str | None, head_dim: int, seq_len: int) -> str:
    """`auto` -> `splash` on TPU when head_dim % 64 == 0 and seq_len % 128 == 0 (the kernel's
    lane width and block tiles), else `xla`; any other impl is returned unchanged."""
    if impl != "auto":
        return impl
    if platform == "tpu" and head_dim % 64 == 0 and seq_len % 128 == 0:
        return "splash"
    return "xla"


def attend(q_BTHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, *, impl: str,
           mask_BTS: jax.Array | None = None, kv_layout: str = "bshk") -> jax.Array:
    """softmax(q k^T / sqrt(K)) v; causal when `mask_BTS` is None (T == S), else `mask_BTS`.

    k and v have G heads (G divides H). `kv_layout="bhsk"` takes them heads-major ([B, G, S,
    K], the KV cache's layout); only the masked (cache) path accepts it.
    """
    if impl == "auto":
        impl = resolve_impl(impl, _target_platform() or jax.devices()[0].platform,
                            q_BTHK.shape[-1], q_BTHK.shape[1] if mask_BTS is None else 1)
    if kv_layout != "bshk" and mask_BTS is None:
        raise ValueError(f"kv_layout={kv_layout!r} needs mask_BTS (the KV-cache path)")
    if impl == "reference" or (impl == "splash" and mask_BTS is not None):
        return reference_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS, kv_layout=kv_layout)
    if impl in ("xla", "cudnn"):
        if mask_BTS is not None or impl == "xla":
            # cuDNN takes causal masks only; an explicit mask (the KV-cache path) goes to XLA.
            return einsum_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS, probs_dtype=v_BSGK.dtype,
                                    kv_layout=kv_layout)
        platform = jax.devices()[0].platform
        if platform != "gpu":  # jax's own error here is a bare "cuDNN is not detected."
            raise ValueError(f"attention_impl='cudnn' runs on NVIDIA GPUs only (this backend is "
                             f"{platform!r}); use 'xla' here")
        if q_BTHK.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError("attention_impl='cudnn' needs model.dtype bfloat16 or float16, got "
                             f"{q_BTHK.dtype}; use 'xla' for float32")
        return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, is_causal=True,
                                            implementation="cudnn")
    if impl == "splash":
        return splash_attention(q_BTHK, k_BSGK, v_BSGK)
    raise ValueError(f"attention_impl={impl!r} is not one of reference, xla, cudnn, splash")


def reference_attention(q_BTHK, k_BSHK, v_BSHK, mask_BTS=None, kv_layout="bshk"):
    return einsum_attention(q_BTHK, k_BSHK, v_BSHK, mask_BTS, probs_dtype=jnp.float32,
                            kv_layout=kv_layout)


def einsum_attention(q_BTHK, k_BSGK, v_BSGK, mask_BTS=None, *, probs_dtype, kv_layout="bshk"):
    """Scores and softmax in float32; probabilities (and so the second einsum) in probs_dtype.

    With G < H key/value heads, each one's Q = H / G query heads become Q query rows per
    position (X = T * Q rows; no copy of k or v), under the same mask."""
    B, T, H, K = q_BTHK.shape
    S, G = k_BSGK.shape[kv_layout.index("s")], k_BSGK.shape[kv_layout.index("h")]
    if mask_BTS is None:
        mask_BTS = jnp.tril(jnp.ones((T, S), bool))[None]
    if G != H:
        Q = H // G
        q_BXGK = jnp.swapaxes(q_BTHK.reshape(B, T, G, Q, K), 2, 3).reshape(B, T * Q, G, K)
        out_BXGK = einsum_attention(q_BXGK, k_BSGK, v_BSGK, jnp.repeat(mask_BTS, Q, axis=1),
                                    probs_dtype=probs_dtype, kv_layout=kv_layout)
        return jnp.swapaxes(out_BXGK.reshape(B, T, Q, G, K), 2, 3).reshape(B, T, H, K)
    scores_BHTS = jnp.einsum(f"bthk,{kv_layout}->bhts", q_BTHK, k_BSGK,
                             preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(K))
    scores_BHTS = jnp.where(mask_BTS[:, None], scores_BHTS, jnp.finfo(jnp.float32).min)
    probs_BHTS = jax.nn.softmax(scores_BHTS, axis=-1).astype(probs_dtype)
    out_BTHK = jnp.einsum(f"bhts,{kv_layout}->bthk", probs_BHTS, v_BSGK.astype(probs_dtype),
                          preferred_element_type=jnp.float32)
    return out_BTHK.astype(q_BTHK.dtype)


DECODE_CHUNK = 256  # cache slots per step of `decode_attention`'s loop
DECODE_FIRST = 16  # the shortest cache prefix `decode_attention` reads


def _online_softmax_step(carry, q_BGQK, k_BGCK, v_BGCK, start, positions_B):
    """(running max, sum, output) after the cache slots start..start+C-1; slots past a row's
    position are masked, and a chunk wholly past it leaves that row's carry bitwise unchanged."""
    m_BGQ, l_BGQ, acc_BGQK = carry
    s_BGQC = jnp.einsum("bgqk,bgck->bgqc", q_BGQK, k_BGCK.astype(jnp.float32))
    seen_BC = start + jnp.arange(k_BGCK.shape[2])[None] <= positions_B[:, None]
    s_BGQC = jnp.where(seen_BC[:, None, None], s_BGQC, jnp.finfo(jnp.float32).min)
    m_new = jnp.maximum(m_BGQ, jnp.max(s_BGQC, axis=-1))
    p_BGQC = jnp.exp(s_BGQC - m_new[..., None])
    scale = jnp.exp(m_BGQ - m_new)
    l_BGQ = l_BGQ * scale + jnp.sum(p_BGQC, axis=-1)
    acc_BGQK = acc_BGQK * scale[..., None] + jnp.einsum(
        "bgqc,bgck->bgqk", p_BGQC, v_BGCK.astype(jnp.float32))
    return m_new, l_BGQ, acc_BGQK


def whole_cache_decode() -> bool:
    """Whether a decode step reads and writes its cache whole: on TPU (the platform compiled
    for). There a `lax.switch` over cache prefixes and a per-row scatter make XLA copy the
    cache (its cost model, GPT-2 124M on v5e-8 at 32 slots: a 3.70 ms step, against 1.30 ms
    with one masked pass over every slot and the new keys written by a select); XLA:CPU
    runs both in place, so there a step reads only the prefix its longest row needs."""
    return (_target_platform() or jax.devices()[0].platform) == "tpu"


def decode_attention(q_B1HK: jax.Array, k_BGSK: jax.Array, v_BGSK: jax.Array,
                     positions_B: jax.Array, whole: bool | None = None) -> jax.Array:
    """One new query per row against its cache slots 0..positions_B[b] (heads-major cache;
    the cache may have more rows than the batch: row b of the batch is its row b).

    Reading the cache is most of this op's time, so it reads only what the longest row needs:
    the shortest of the prefixes DECODE_FIRST, 2*DECODE_FIRST, ... < DECODE_CHUNK that holds
    every row's position (one branch of a `lax.switch`), past that a loop over chunks of
    DECODE_CHUNK slots with an online softmax. A row's result does not depend on how far the
    other rows reach (a slot past its position is masked, and a chunk wholly past it leaves its
    carry bitwise unchanged), so every row of a batch of decode slots computes what it would
    alone. `whole` (default: `whole_cache_decode()`): one pass over every slot instead.
    """
    B, _, H, K = q_B1HK.shape
    _, G, S, _ = k_BGSK.shape  # [R >= B, G, S, K]
    Q = H // G
    chunk = DECODE_CHUNK
    while S % chunk:
        chunk //= 2
    q_BGQK = q_B1HK.reshape(B, G, Q, K).astype(jnp.float32) / jnp.sqrt(jnp.float32(K))
    init = (jnp.full((B, G, Q), jnp.finfo(jnp.float32).min, jnp.float32),
            jnp.zeros((B, G, Q), jnp.float32), jnp.zeros((B, G, Q, K), jnp.float32))
    need = jnp.max(positions_B) + 1  # slots the longest row reads

    def prefix(size):  # rows and slots cut in one slice: a cache[:B] alone would be a copy
        return lambda: _online_softmax_step(init, q_BGQK, k_BGSK[:B, :, :size],
                                            v_BGSK[:B, :, :size], 0, positions_B)

    def chunks():
        def body(c, carry):
            start = c * chunk
            k_BGCK = jax.lax.dynamic_slice(k_BGSK, (0, 0, start, 0), (B, G, chunk, K))
            v_BGCK = jax.lax.dynamic_slice(v_BGSK, (0, 0, start, 0), (B, G, chunk, K))
            return _online_softmax_step(carry, q_BGQK, k_BGCK, v_BGCK, start, positions_B)

        return jax.lax.fori_loop(0, jnp.minimum((need - 1) // chunk + 1, S // chunk), body, init)

    if whole if whole is not None else whole_cache_decode():
        _, l_BGQ, acc_BGQK = prefix(S)()
        return (acc_BGQK / l_BGQ[..., None]).reshape(B, 1, H, K).astype(q_B1HK.dtype)
    sizes = []
    while (size := DECODE_FIRST * 2 ** len(sizes)) < chunk:
        sizes.append(size)
    branch = jnp.sum(need > jnp.array(sizes, jnp.int32)) if sizes else 0
    _, l_BGQ, acc_BGQK = jax.lax.switch(branch, [prefix(s) for s in sizes] + [chunks])
    out_BGQK = acc_BGQK / l_BGQ[..., None]
    return out_BGQK.reshape(B, 1, H, K).astype(q_B1HK.dtype)


def _target_platform() -> str | None:
    """The platform being compiled for: the active mesh's (AOT for a TPU slice), else None."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else None


def splash_attention(q_BTHK, k_BSHK, v_BSHK, interpret: bool = False):
    """Causal splash attention (Pallas, TPU only); heads go through the kernel, batch via vmap.

    Under a mesh the kernel runs per shard (shard_map over the batch and head axes of the
    logical rules), since XLA cannot partition a Pallas call by itself. Grouped-query k and v
    are repeated to H heads first. `interpret`: run the kernel in Pallas' interpreter, on any
    backend (slow; the tests check this wrapper and the kernel on CPU that way).
    """
    Q = q_BTHK.shape[2] // k_BSHK.shape[2]
    if Q > 1:
        k_BSHK, v_BSHK = jnp.repeat(k_BSHK, Q, axis=2), jnp.repeat(v_BSHK, Q, axis=2)
    platform = _target_platform()
    if not interpret and platform is None and jax.devices()[0].platform != "tpu":
        # No mesh: shape-only tracing (e.g. eval_shape of init on a CPU host compiling for a
        # TPU slice); the reference has the same shapes. Steps always run under a mesh.
        return reference_attention(q_BTHK, k_BSHK, v_BSHK)
    platform = platform or jax.devices()[0].platform
    if not interpret and platform != "tpu":
        raise ValueError("attention_impl='splash' runs on TPU only (this backend is "
                         f"{platform!r}); use 'xla' here")
    # TPU only: Pallas' TPU kernels are loaded where they can run.
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    def local(q_BTHK, k_BSHK, v_BSHK):
        B, T, H, K = q_BTHK.shape
        kernel = _splash_kernel(H, T, sk, sm, interpret)
        q_BHTK = jnp.swapaxes(q_BTHK, 1, 2) / jnp.sqrt(jnp.float32(K)).astype(q_BTHK.dtype)
        out_BHTK = jax.vmap(kernel)(q_BHTK, jnp.swapaxes(k_BSHK, 1, 2),
                                    jnp.swapaxes(v_BSHK, 1, 2))
        return jnp.swapaxes(out_BHTK, 1, 2)

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(q_BTHK, k_BSHK, v_BSHK)
    spec = nn.logical_to_mesh_axes((ACT_BATCH, ACT_LENGTH, ACT_HEADS, ACT_KV))
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q_BTHK, k_BSHK, v_BSHK)


def _splash_kernel(num_heads, seq_len, sk, sm, interpret=False):
    """A kernel made for the trace that calls it. Its mask arrays belong to that trace: a kernel
    kept for later traces (it was, in an lru_cache) carried flax scan's partial-eval tracers
    into the next compile (UnexpectedTracerError); the mask's block analysis, the costly part,
    is cached by Pallas itself."""
    mask = sm.MultiHeadMask([sm.CausalMask((seq_len, seq_len)) for _ in range(num_heads)])
    return sk.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
