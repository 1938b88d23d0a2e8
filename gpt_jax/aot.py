"""TPU projections without a TPU: compile a config's exact sharded steps for a named TPU slice.

With `libtpu` installed (`pip install 'libtpu==0.0.42.*'`, the version jax 0.10.2 pins),
`jax.experimental.topologies.get_topology_desc` describes a TPU slice on any host, and XLA's
TPU compiler runs on the CPU. `compile_train_step` lowers the real `Trainer` step (same
shardings, donation, remat, attention) for that slice's devices; `report` turns the compiled
executable into per-chip memory (against the chip's HBM), XLA's FLOPs and estimated step time,
and a projected MFU. JAX itself keeps running on the CPU (`JAX_PLATFORMS=cpu`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from gpt_jax import hardware, hlo_profile, projection, sharding, tpu_flags
from gpt_jax.attention import resolve_impl
from gpt_jax.axes import MESH_AXES
from gpt_jax.config import Config, list_presets, load_preset, typed
from gpt_jax.errors import AotError, ConfigError, OutOfMemory
from gpt_jax.flops import count_params, flops_per_token
from gpt_jax.hardware import peak_flops
from gpt_jax.model import ModelConfig, kv_cache_axes
from gpt_jax.sharding import MeshConfig
from gpt_jax.step import Trainer

GiB = 2**30
TOP_OPS = 5  # op labels and buffers kept in a record (`bound`)
# The GPT-2 family by size; any preset file name (`tiny`, `gpt2_124m`, …) works too.
PRESETS = {"124M": "gpt2_124m", "350M": "gpt2_350m", "774M": "gpt2_774m", "1558M": "gpt2_1558m"}


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A Cloud TPU slice as its user-facing name (v5e-8) and libtpu's topology description."""
    name: str
    topology: str  # libtpu's name, e.g. "v5e:2x4" (v4/v5p: chips as x*y*z)
    chip_config: str  # "megacore": one JAX device per chip (v4, v5p); "default": one core
    hbm_bytes: int  # per chip
    hbm_bytes_per_s: float  # per chip, published bandwidth
    wrap: tuple[bool, bool, bool]

    @property
    def chips(self) -> int:
        return math.prod(int(d) for d in self.topology.split(":")[1].split("x"))


def _slices() -> dict[str, TpuSlice]:
    """Every slice of the hardware table's `aot_shapes`, by our name (v5e-8, v4-8, ...)."""
    out = {}
    for gen in hardware.TPUS.values():
        for shape in gen.aot_shapes:
            dims = [int(d) for d in shape.split("x")]
            chips = math.prod(dims)
            wrap = tuple(d >= 4 and chips >= (64 if len(dims) == 3 else 256) for d in dims)
            wrap = (wrap + (False,) * 3)[:3]
            name = gen.slice_name(chips)
            out[name] = TpuSlice(name, f"{gen.libtpu}:{shape}", gen.chip_config, gen.hbm_bytes,
                                 gen.hbm_bytes_per_s, wrap)
    return out


SLICES = _slices()


def get_slice(name: str) -> TpuSlice:
    """A slice by our name or gcloud's (v5e-8 or v5litepod-8)."""
    if name not in SLICES and "-" in name:
        prefix, size = name.split("-", 1)
        try:
            name = f"{hardware.tpu(prefix).name}-{size}"
        except ValueError:
            pass
    if name not in SLICES:
        raise AotError(f"unknown TPU topology {name!r}; one of: {', '.join(SLICES)}")
    return SLICES[name]


def libtpu_available() -> bool:
    return importlib.util.find_spec("libtpu") is not None


# LIBTPU_INIT_ARGS as libtpu saw it when this process first initialised it (read once).
LIBTPU_ARGS_AT_INIT: str | None = None


def topology_devices(tpu: TpuSlice, overlap_flags: bool = True) -> list:
    """Compile-only TPU devices of the slice (no TPU needed; JAX stays on the CPU).

    The first call in a process sets gpt_jax.tpu_flags' overlap flags for the slice's
    generation into LIBTPU_INIT_ARGS (unless `overlap_flags` is False or
    GPT_JAX_XLA_OVERLAP_FLAGS=0): libtpu reads them once, when its topology client starts.
    """
    global LIBTPU_ARGS_AT_INIT
    if not libtpu_available():
        raise AotError("TPU AOT compilation needs libtpu: pip install 'libtpu==0.0.42.*' "
                       "(the version jax 0.10.2 pins; or the gpt_jax[tpu] extra)")
    # Only compiling: skip libtpu's one-process-per-host lock (tests and users run several).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if LIBTPU_ARGS_AT_INIT is None:
        LIBTPU_ARGS_AT_INIT = tpu_flags.apply_to_environ(tpu.name, on=overlap_flags)
    from jax.experimental import topologies  # after the lines above, which libtpu reads

    # The compile-only topology is built of hosts of 2x2 chips; a slice smaller than that (one
    # chip: v5e-1, v6e-1) is one host of its own size.
    grid = [int(d) for d in tpu.topology.split(":")[1].split("x")] + [1]
    host = tuple(min(h, d) for h, d in zip((2, 2, 1), grid))
    desc = topologies.get_topology_desc(topology_name=tpu.topology, platform="tpu",
                                        chip_config_name=tpu.chip_config,
                                        chips_per_host_bounds=host, num_slices=1,
                                        wrap=tpu.wrap)
    return list(desc.devices)


def topology_mesh(mesh_config: MeshConfig, devices: list) -> Mesh:
    """A (data, fsdp, tensor) mesh laid out on the slice's physical torus where possible."""
    shape = mesh_config.shape(len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices).reshape(shape)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


def resolve_preset(name: str) -> Config:
    """The config of a size (124M, …) or of configs/<name>.py; AotError naming the choices."""
    try:
        return typed(load_preset(PRESETS.get(name, name)))
    except ConfigError:
        raise AotError(f"unknown preset {name!r}; one of: {', '.join(PRESETS)} or "
                       f"{', '.join(list_presets())}") from None


def apply_overrides(config, *, batch_size: int | None = None, attention_impl: str | None = None,
                    remat_policy: str | None = None, scan_layers: bool | None = None,
                    dtype: str | None = None, mesh: tuple[int, int, int] | None = None) -> Config:
    """`config` (typed or a ConfigDict) with benchmark options applied (None keeps its value)."""
    changes: dict[str, Any] = {}
    if batch_size is not None:
        changes.update({"train.global_batch_size": batch_size, "train.microbatches": 1})
    for field, value in (("attention_impl", attention_impl), ("remat_policy", remat_policy),
                         ("scan_layers", scan_layers), ("dtype", dtype)):
        if value is not None:
            changes[f"model.{field}"] = value
    if mesh is not None:
        changes.update({f"mesh.{a}": s for a, s in zip(MESH_AXES, mesh)})
    return typed(config).replace(changes)


def _abstract(shape, dtype, sharding_):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding_)


def compile_train_step(config: Config, mesh: Mesh):
    """The Trainer's jitted train step, lowered on abstract (sharded) state and batch."""
    config = typed(config)
    trainer = Trainer.for_config(config, mesh)
    state = trainer.abstract_state()
    B, T = config.train.global_batch_size, config.model.block_size
    tokens = _abstract((B, T), jnp.int32, trainer.batch_sharding)
    with sharding.activate(mesh, trainer.rules):
        t0 = time.perf_counter()
        lowered = trainer.jit_train_step().lower(state, {"inputs": tokens, "targets": tokens})
        compiled = lowered.compile()
    return compiled, time.perf_counter() - t0, state


def compile_decode_step(config: Config, mesh: Mesh, slots: int):
    """The serving engine's decode step (`serve.engine.decode_step`: every slot's next token
    at its own position, sampled with its own settings) for `slots` slots of the full
    context, lowered on abstract params and state sharded as the engine shards them; returns
    (compiled, seconds, abstract params, abstract state)."""
    from gpt_jax.serve import engine  # the serving package imports this module's neighbours

    trainer = Trainer.for_config(typed(config), mesh)
    params = trainer.abstract_state()["params"]
    cfg = trainer.model_cfg
    cache_sh = sharding.named(mesh, trainer.rules, kv_cache_axes(cfg))
    shardings = engine.state_shardings(mesh, cache_sh)
    state = jax.tree.map(  # each sharding applies to every array under it
        lambda sh, x: jax.tree.map(lambda a: _abstract(a.shape, a.dtype, sh), x), shardings,
        jax.eval_shape(lambda: engine.initial_state(cfg, slots)))
    active = _abstract((slots,), jnp.bool_, NamedSharding(mesh, P()))
    with sharding.activate(mesh, trainer.rules):
        t0 = time.perf_counter()
        compiled = engine.decode_step.lower(params, state, active, cfg=cfg,
                                            k_bucket=engine.EngineConfig.k_bucket,
                                            cache_sharding=cache_sh).compile()
    return compiled, time.perf_counter() - t0, params, state


def serving_mesh(config: Config, chips: int) -> tuple[int, int, int]:
    """data x fsdp x tensor for serving on `chips`: heads over the largest `tensor` that
    divides the chips and the (kv) heads, the slots over the rest."""
    m = config.model
    tensor = max(t for t in range(1, chips + 1)
                 if chips % t == 0 and m.n_head % t == 0 and m.kv_heads % t == 0)
    return chips // tensor, 1, tensor


def project_serving(config, slice_name: str, slots: int, *,
                    mesh: tuple[int, int, int] | None = None,
                    overlap_flags: bool = True) -> dict[str, Any]:
    """The serving decode step of `config` with `slots` slots of the full context on the
    slice: memory per chip, XLA's estimated step, decode tokens/s per chip, and the bound
    that reading the weights and the whole cache once per step sets (HBM bytes / bandwidth)."""
    config = typed(config)
    tpu = get_slice(slice_name)
    devices = topology_devices(tpu, overlap_flags)
    shape = mesh or serving_mesh(config, len(devices))
    config = config.replace({f"mesh.{a}": s for a, s in zip(MESH_AXES, shape)})
    jmesh = topology_mesh(config.mesh, devices)
    data, fsdp, tensor = (jmesh.shape[a] for a in MESH_AXES)
    if slots % (data * fsdp):
        raise AotError(f"--serve_slots={slots} must divide over data*fsdp={data * fsdp}")
    try:
        compiled, compile_s, params, state = compile_decode_step(config, jmesh, slots)
    except jax.errors.JaxRuntimeError as e:
        raise _out_of_memory(e, tpu.name) from None
    m, n_dev, peak = config.model, len(devices), peak_flops(devices[0].device_kind)
    if m.scan_layers:
        cost, _ = layer_extrapolated_cost(
            config, lambda c: compile_decode_step(c, jmesh, slots)[0])
    else:
        cost = xla_cost(compiled)
    weights, cache = shard_bytes(params), shard_bytes(state["cache"])
    traffic = dict(hlo_profile.profile(compiled.as_text(), top=0).by_op)
    record: dict[str, Any] = {
        "topology": tpu.name, "chips": n_dev, "device_kind": devices[0].device_kind,
        "mesh": f"{data}x{fsdp}x{tensor}", "params": count_params(m), "slots": slots,
        "context": m.block_size, "dtype": m.dtype, "param_dtype": m.param_dtype,
        "compile_s": compile_s, "params_bytes_per_chip": weights,
        "cache_bytes_per_chip": cache,
        "hlo_bytes_by_op": sorted(traffic.items(), key=lambda kv: -kv[1])[:TOP_OPS],
        "hlo_bytes_total": sum(traffic.values())}
    record.update(memory_report(compiled, tpu.hbm_bytes))
    record.update(cost_report(cost, 2 * count_params(m) * slots / n_dev, peak,
                              tpu.hbm_bytes_per_s, roofline_only=True))
    record["hbm_bound_s"] = (weights + cache) / tpu.hbm_bytes_per_s
    step = record["xla_estimated_step_s"]
    if step:
        record["tokens_per_s_per_chip"] = slots / step / n_dev
        record["step_over_hbm_bound"] = step / record["hbm_bound_s"]
    record["hbm_bound_tokens_per_s_per_chip"] = slots / record["hbm_bound_s"] / n_dev
    return record


def format_serving(r: dict[str, Any]) -> str:
    gib = lambda x: f"{x / GiB:.2f} GiB"  # noqa: E731
    fit = (f"fits ({gib(r['headroom_bytes'])} free)" if r["fits"]
           else f"DOES NOT FIT (over by {gib(-r['headroom_bytes'])})")
    step = r["xla_estimated_step_s"]
    speed = (f"estimated step {1e3 * step:.2f} ms -> {r['tokens_per_s_per_chip']:.0f} tokens/s "
             f"per chip, {r['step_over_hbm_bound']:.2f}x the HBM bound" if step else "n/a")
    return (f"{r['topology']} ({r['chips']} x {r['device_kind']}), mesh data x fsdp x tensor = "
            f"{r['mesh']}; {r['params'] / 1e6:.1f}M params ({r['param_dtype']}), {r['slots']} "
            f"slots x {r['context']} context\n"
            f"  serving decode step: {gib(r['total_bytes'])} per chip of {gib(r['hbm_bytes'])}: "
            f"{fit}; weights {gib(r['params_bytes_per_chip'])}, KV cache "
            f"{gib(r['cache_bytes_per_chip'])}, temps {gib(r['temp_bytes'])}\n"
            f"  {speed} (reading weights + cache once: {1e3 * r['hbm_bound_s']:.2f} ms, "
            f"{r['hbm_bound_tokens_per_s_per_chip']:.0f} tokens/s per chip; "
            f"{r['estimate_source']}); compiled in {r['compile_s']:.1f} s\n"
            f"  top HBM traffic: " + ", ".join(
                f"{label} {100 * b / r['hlo_bytes_total']:.0f}%"
                for label, b in r["hlo_bytes_by_op"][:3]))


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
        total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
    return total


def memory_report(compiled, hbm_bytes: int) -> dict[str, Any]:
    """Per-chip bytes from XLA's buffer assignment, and whether they fit in HBM."""
    m = compiled.memory_analysis()
    live = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
            + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
    return {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
            "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "code_bytes": m.generated_code_size_in_bytes, "total_bytes": live,
            "hbm_bytes": hbm_bytes, "fits": live <= hbm_bytes, "headroom_bytes": hbm_bytes - live}


def xla_cost(compiled) -> dict[str, float]:
    """XLA's flops, bytes accessed and (where given) optimal_seconds for one compiled program."""
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return {k: float(cost[k]) for k in ("flops", "bytes accessed", "optimal_seconds") if k in cost}


def layer_extrapolated_cost(config: Config, compile_fn: Callable) -> tuple[dict[str, float],
                                                                  dict[str, float]]:
    """XLA's cost of a scanned model, and its HBM bytes per op label (`hlo_profile`), from
    unscanned compiles of 1 and 2 of its layers.

    XLA's cost analysis counts a while loop's body once, so a `scan_layers` program reports
    about one layer's work. Its layers are identical, so cost(L) = cost(1) + (L - 1) *
    (cost(2) - cost(1)) is exact up to fusion choices, and two small compiles stay fast.
    """
    costs, traffic = [], []
    for n_layer in (1, 2):
        probe = config.replace({"model.n_layer": n_layer, "model.scan_layers": False})
        compiled = compile_fn(probe)
        costs.append(xla_cost(compiled))
        traffic.append(dict(hlo_profile.profile(compiled.as_text(), top=0,
                                                every_trip=True).by_op))
    L = config.model.n_layer

    def extrapolate(one: dict, two: dict) -> dict:
        return {k: one.get(k, 0.0) + (L - 1) * (two.get(k, 0.0) - one.get(k, 0.0))
                for k in one.keys() | two.keys()}
    cost = {k: v for k, v in extrapolate(*costs).items() if k in costs[0] and k in costs[1]}
    return cost, {k: v for k, v in extrapolate(*traffic).items() if v > 0}


def cost_report(cost: dict[str, float], model_flops_per_chip: float, peak: float | None,
                hbm_bytes_per_s: float, extra_flops: float = 0.0,
                counted_flops: float = 0.0, counted_bytes: float = 0.0,
                roofline_only: bool = False) -> dict[str, Any]:
    """XLA's FLOPs and estimated seconds per chip (from `xla_cost`); MFU if the step ran so.

    The estimate is XLA's `optimal_seconds` where it gives a plausible one (at most 10x the
    roofline) for all the work that runs (the counted FLOPs and bytes below), else the roofline
    FLOPs / peak + XLA bytes accessed / HBM bandwidth, with FLOPs = XLA's count or the model's
    where XLA counted less (its cost analysis misses the matmuls of some fsdp programs);
    `estimate_source` says which. The roofline adds the two terms (no overlap) because XLA's own
    TPU estimate does: on the v5p rows of BENCHMARKS.md `optimal_seconds` is 1.01-1.07x their
    sum. `extra_flops`: work XLA cannot see (Pallas kernels): added to its FLOPs, and to its
    estimate at peak. `counted_flops`: the matmul FLOPs of the compiled program with every loop
    trip counted (`hlo_profile.matmul_flops`), which the compute term also never goes below;
    `counted_bytes`: HBM bytes with every loop trip counted
    (`hlo_profile.profile(every_trip=True)`), which the HBM term never goes below. On TPU both
    matter: XLA's cost analysis counts each fsdp collective-matmul loop (windowed einsum, no
    known trip count) once, 0.67x of the 124M v5e-8 step's FLOPs (#30). `roofline_only`: the
    roofline whatever XLA says (one method for every row of a table).
    """
    flops, bytes_accessed = cost.get("flops", 0.0) + extra_flops, cost.get("bytes accessed", 0.0)
    work = max(flops, model_flops_per_chip, counted_flops + extra_flops)
    compute_s, hbm_s = (work / peak if peak else None,
                        max(bytes_accessed, counted_bytes) / hbm_bytes_per_s)
    roofline = compute_s + hbm_s if peak else None
    seconds, source = cost.get("optimal_seconds"), "xla optimal_seconds"
    if seconds and seconds > 0 and extra_flops and peak:
        seconds += extra_flops / peak
    # XLA's own estimate is of the work it counted: where it missed some (loops counted once,
    # see hlo_profile.matmul_flops), the roofline of the counted work replaces it
    missed = counted_flops + extra_flops > 1.02 * flops or counted_bytes > 1.02 * bytes_accessed
    if (not (seconds and seconds > 0) or (roofline and seconds > 10 * roofline) or missed
            or roofline_only):
        seconds, source = roofline, "roofline"
    seconds = float(seconds) if seconds and seconds > 0 else None
    out = {"xla_flops_per_chip": flops, "xla_bytes_accessed_per_chip": bytes_accessed,
           "flops_added_back_per_chip": extra_flops, "compute_s": compute_s, "hbm_s": hbm_s,
           "xla_flops_below_model": flops < model_flops_per_chip,
           "xla_estimated_step_s": seconds, "estimate_source": source if seconds else None,
           "model_flops_per_chip": model_flops_per_chip}
    out["projected_mfu"] = (model_flops_per_chip / (seconds * peak)
                            if seconds and peak else None)
    return out


def attention_flops(model_cfg: ModelConfig, batch_size: int) -> float:
    """Causal attention's QK^T and AV FLOPs of one train step (fwd + bwd, masked half skipped).

    The backward pass is twice the forward: 3 x 2 matmuls x 2 B T^2 D / 2 per layer.
    """
    T = model_cfg.block_size
    return 6.0 * model_cfg.n_layer * batch_size * T * T * model_cfg.n_embd


def project(config, slice_name: str, *, decode_batch_size: int = 0,
            decode: bool = True, overlap_flags: bool = True) -> dict[str, Any]:
    """Compile train (and decode) for the slice; one flat record of memory, FLOPs and MFU."""
    config = typed(config)
    tpu = get_slice(slice_name)
    devices = topology_devices(tpu, overlap_flags)
    mesh = topology_mesh(config.mesh, devices)
    data, fsdp, tensor = (mesh.shape[a] for a in MESH_AXES)
    B, T = config.train.global_batch_size, config.model.block_size
    model_cfg = config.model
    if B % (data * fsdp) or model_cfg.n_head % tensor or model_cfg.kv_heads % tensor:
        raise AotError(f"batch {B} must divide over data*fsdp={data * fsdp} and n_head "
                       f"{model_cfg.n_head} (n_kv_head {model_cfg.kv_heads}) over "
                       f"tensor={tensor}")
    n_dev, peak = len(devices), peak_flops(devices[0].device_kind)
    try:
        compiled, compile_s, state = compile_train_step(config, mesh)
    except jax.errors.JaxRuntimeError as e:
        raise _out_of_memory(e, tpu.name) from None
    model_flops = flops_per_token(model_cfg, T) * B * T / n_dev
    record: dict[str, Any] = {
        "topology": tpu.name, "libtpu_topology": tpu.topology, "chips": n_dev,
        "device_kind": devices[0].device_kind, "mesh": f"{data}x{fsdp}x{tensor}",
        "params": count_params(model_cfg), "batch_size": B, "seq_len": T,
        "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
        "remat_policy": model_cfg.remat_policy, "scan_layers": model_cfg.scan_layers,
        "attention_impl": model_cfg.attention_impl,
        "attention_impl_resolved": resolve_impl(model_cfg.attention_impl, "tpu",
                                                model_cfg.head_dim, T),
        "loss_chunks": model_cfg.loss_chunks,
        "libtpu_init_args": LIBTPU_ARGS_AT_INIT or "",
        "xla_overlap_flags": bool(LIBTPU_ARGS_AT_INIT) and all(
            f in (LIBTPU_ARGS_AT_INIT or "") for f in tpu_flags.overlap_flags(tpu.name)),
        "peak_tflops_per_chip": peak / 1e12 if peak else None, "train_compile_s": compile_s,
        "params_bytes_per_chip": shard_bytes(state["params"]),
        "opt_state_bytes_per_chip": shard_bytes(state["opt_state"]),
    }
    record.update({f"train_{k}": v for k, v in memory_report(compiled, tpu.hbm_bytes).items()})
    scanned = model_cfg.scan_layers
    hlo = hlo_profile.profile(compiled.as_text(), top=0, every_trip=True)
    try:
        train_cost, traffic = (
            layer_extrapolated_cost(config, lambda c: compile_train_step(c, mesh)[0])
            if scanned else (xla_cost(compiled), dict(hlo.by_op)))
    except jax.errors.JaxRuntimeError as e:
        raise _out_of_memory(e, tpu.name, "the unscanned 1- and 2-layer cost probes of this "
                             "step (the step itself compiled)") from None
    record["train_hlo_bytes_by_op"] = sorted(traffic.items(), key=lambda kv: -kv[1])[:TOP_OPS]
    record["train_hlo_bytes_total"] = sum(traffic.values())
    record["train_hlo_largest_buffers"] = hlo.buffers[:TOP_OPS]
    record["cost_source"] = ("unscanned 1- and 2-layer compiles, extrapolated" if scanned
                             else "this compile")
    # XLA's cost analysis does not count FLOPs inside Pallas kernels (splash attention).
    added = (attention_flops(model_cfg, B) / n_dev
             if record["attention_impl_resolved"] == "splash" else 0.0)
    # XLA's count takes a loop body once; this counts every trip of every loop (see #30)
    counted, unknown_loops = hlo_profile.matmul_flops(compiled.as_text())
    record["train_hlo_matmul_flops_per_chip"] = counted
    record["train_hlo_loops_without_trip_count"] = unknown_loops
    record.update({f"train_{k}": v for k, v in
                   cost_report(train_cost, model_flops, peak, tpu.hbm_bytes_per_s,
                               extra_flops=added, counted_flops=counted,
                               counted_bytes=record["train_hlo_bytes_total"]).items()})
    if record["train_xla_estimated_step_s"]:
        record["projected_tokens_per_s"] = B * T / record["train_xla_estimated_step_s"]
    if record["train_projected_mfu"] is not None:  # the same step, MaxText's numerator
        record["train_projected_mfu_causal_half"] = record["train_projected_mfu"] * (
            flops_per_token(model_cfg, T, causal_half=True) / flops_per_token(model_cfg, T))
    record.update(projection.realistic(record, model_cfg))
    if decode:
        decode_b = decode_batch_size or 8 * data * fsdp
        dec, dec_s, _, _ = compile_decode_step(config, mesh, decode_b)
        record.update({"decode_batch_size": decode_b, "decode_compile_s": dec_s})
        record.update({f"decode_{k}": v for k, v in memory_report(dec, tpu.hbm_bytes).items()})
        dec_flops = 2 * (count_params(model_cfg)) * decode_b / n_dev
        dec_cost = (layer_extrapolated_cost(
            config, lambda c: compile_decode_step(c, mesh, decode_b)[0])[0] if scanned
            else xla_cost(dec))
        record.update({f"decode_{k}": v for k, v in
                       cost_report(dec_cost, dec_flops, peak, tpu.hbm_bytes_per_s).items()})
    return record


def _out_of_memory(error: Exception, slice_name: str, what: str = "this step") -> AotError:
    """XLA's refusal to compile a step over HBM as one line with the overshoot (OutOfMemory),
    over a kernel's on-chip VMEM as one line naming it (AotError), else re-raise."""
    found = re.search(r"required for (.*?) \(([\d.]+)G\) exceeds available HBM \(([\d.]+)G\)",
                      str(error))
    vmem = re.search(r"Ran out of memory in memory space vmem\.[^\n]*", str(error))
    if "RESOURCE_EXHAUSTED" in str(error) and vmem and not found:
        return AotError(f"XLA cannot compile {what} for {slice_name}: {vmem.group(0).strip()}"
                        " (a fusion's on-chip buffers, not HBM); try another --attention_impl "
                        "(splash), --remat_policy or a smaller batch per chip")
    if "RESOURCE_EXHAUSTED" not in str(error) or not found:
        raise error
    what, need, have = found.group(1), float(found.group(2)), float(found.group(3))
    return OutOfMemory(
        f"does not fit on {slice_name}: {what} alone need {need:.2f} GiB per chip, "
        f"{have:.2f} GiB of HBM is available (over by {need - have:.2f} GiB); try "
        f"--remat_policy=full, a smaller --batch_size or a larger fsdp axis in --mesh",
        need * GiB)


def bound(r: dict[str, Any], top: int = 3) -> str:
    """What bounds a projected train step, in one line: the larger roofline term, the ops
    with the most HBM traffic (share of the compiled step's) and the largest buffers."""
    compute, hbm = r.get("train_compute_s"), r.get("train_hbm_s")
    if compute is None or hbm is None:
        return "n/a (record from before the HLO profile)"
    total = r.get("train_hlo_bytes_total") or 0.0
    ops = ", ".join(f"{label} {100 * b / total:.0f}%"
                    for label, b in r["train_hlo_bytes_by_op"][:top]) if total else "n/a"
    shown, seen = [], set()
    for label, shape, b in r["train_hlo_largest_buffers"]:  # largest first; each shape once
        if shape not in seen and len(shown) < top:
            seen.add(shape)
            name = label if label.endswith(shape) else f"{label} {shape}"
            shown.append(f"{name} {b / GiB:.2f} GiB")
    bufs = ", ".join(shown)
    realistic = (f"; the realistic estimate is {r['train_realistic_limit']}-bound"
                 if r.get("train_realistic_limit") else "")
    return (f"{'HBM bytes' if hbm > compute else 'compute'} at peak rates ({1e3 * hbm:.1f} ms "
            f"of HBM traffic vs {1e3 * compute:.1f} ms of FLOPs at peak){realistic}; top "
            f"traffic: {ops}; largest buffers: {bufs}")


def format_report(r: dict[str, Any]) -> str:
    def gib(x):
        return f"{x / GiB:.2f} GiB"

    def verdict(prefix):
        if r[f"{prefix}_fits"]:
            return f"fits ({gib(r[f'{prefix}_headroom_bytes'])} free)"
        return f"DOES NOT FIT (over by {gib(-r[f'{prefix}_headroom_bytes'])})"

    est = r["train_xla_estimated_step_s"]
    mfu = r["train_projected_mfu"]
    lines = [
        f"{r['topology']} ({r['libtpu_topology']}, {r['chips']} x {r['device_kind']}), mesh "
        f"data x fsdp x tensor = {r['mesh']}; {r['params'] / 1e6:.1f}M params, batch "
        f"{r['batch_size']} x {r['seq_len']}, {r['dtype']}, remat={r['remat_policy']}",
        f"  train step: {gib(r['train_total_bytes'])} per chip of {gib(r['train_hbm_bytes'])} "
        f"HBM: {verdict('train')}; params {gib(r['params_bytes_per_chip'])}, optimizer "
        f"{gib(r['opt_state_bytes_per_chip'])}, temps {gib(r['train_temp_bytes'])}",
        f"  XLA: {r['train_xla_flops_per_chip'] / 1e12:.2f} TFLOP per chip (model "
        f"{r['train_model_flops_per_chip'] / 1e12:.2f}; matmuls of the HLO, every loop trip: "
        f"{r.get('train_hlo_matmul_flops_per_chip', 0) / 1e12:.2f}), "
        + ("XLA's estimated step " if str(r["train_estimate_source"]).startswith("xla")
           else "summed roofline step (FLOPs term + HBM term, no overlap) ")
        + (f"{1e3 * est:.1f} ms -> projected MFU {100 * mfu:.1f}% (PaLM's count; causal half: "
           f"{100 * r['train_projected_mfu_causal_half']:.1f}%)" if est and mfu is not None
           else "n/a") + f" ({r['train_estimate_source']}; XLA cost from {r['cost_source']}); "
        f"compiled in "
        f"{r['train_compile_s']:.1f} s",
    ]
    if r.get("train_realistic_step_s"):
        lines.append(
            f"  range: {1e3 * r['train_bound_step_s']:.1f} ms (bound: FLOPs at peak under HBM "
            f"traffic at full bandwidth; MFU {100 * r['train_bound_mfu']:.1f}%) to "
            f"{1e3 * r['train_realistic_step_s']:.1f} ms (realistic, calibrated on published "
            f"runs: MFU {100 * r['train_realistic_mfu']:.1f}%, "
            f"{r['train_realistic_tokens_per_s_per_chip']:,.0f} tokens/s per chip; "
            f"{projection.describe(projection.EFFICIENCY)})")
    if r.get("train_flops_added_back_per_chip"):
        lines.append(f"  attention FLOPs added back: "
                     f"{r['train_flops_added_back_per_chip'] / 1e12:.2f} TFLOP per chip (splash "
                     f"is a Pallas kernel; XLA's cost analysis does not count it)")
    lines.append("  bound by " + bound(r))
    lines.append("  XLA overlap flags: " + ("on" if r.get("xla_overlap_flags") else "off"))
    if "decode_total_bytes" in r:
        dest = r["decode_xla_estimated_step_s"]
        lines.append(f"  decode step (batch {r['decode_batch_size']}, cache "
                     f"{r['seq_len']}): {gib(r['decode_total_bytes'])} per chip: "
                     f"{verdict('decode')}; estimated "
                     + (f"{1e3 * dest:.2f} ms/token" if dest else "n/a"))
    return "\n".join(lines)
