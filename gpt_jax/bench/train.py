"""`gpt-jax bench train`: how fast is one training step of a config on this machine?

Reports the median step time over `--steps` timed steps (after `--warmup` untimed ones), tokens/s,
model TFLOP/s per device and MFU (6N + 12 L D T FLOPs per token, PaLM appendix B, against the
device's dense bf16 peak from `gpt_jax.hardware`; n/a where the peak is unknown, e.g.
CPUs), the compile time and the peak device memory. One human-readable line and one JSON line
per run (also appended to `--json_out`). The batch is synthetic (uniform random tokens): this
measures the step, not the data loader (`gpt-jax bench data` does that).

    gpt-jax bench train --preset=124M --batch_size=8 --dtype=bfloat16 --remat_policy=save_dots
    gpt-jax bench train --config=configs/shakespeare_char.py --steps=50
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from typing import Any

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from gpt_jax import sharding
from gpt_jax.aot import PRESETS, AotError, apply_overrides, resolve_preset
from gpt_jax.commands.common import define_config_flag, print_record
from gpt_jax.config import Config, validate
from gpt_jax.flops import count_params, flops_per_token
from gpt_jax.hardware import peak_flops
from gpt_jax.model import ATTENTION_IMPLS, DTYPES, REMAT_POLICIES
from gpt_jax.step import Trainer

FLAGS = flags.FLAGS


def _define_flags() -> None:
    """Defined at import (absl parses before `run`); skipped where another module defined them."""
    if "config" not in FLAGS:
        define_config_flag("default")
    defs = [
        (flags.DEFINE_string, "preset", None,
         f"A preset instead of --config: {', '.join(PRESETS)} or a configs/ file name."),
        (flags.DEFINE_integer, "batch_size", None, "Global batch size (default: the config's)."),
        (flags.DEFINE_integer, "seq_len", None, "Context length (default: model.block_size)."),
        (flags.DEFINE_enum, "attention_impl", None, "Attention implementation.", ATTENTION_IMPLS),
        (flags.DEFINE_enum, "remat_policy", None, "Rematerialisation policy.", REMAT_POLICIES),
        (flags.DEFINE_bool, "scan_layers", None, "Scan over layers (default: the config's)."),
        (flags.DEFINE_enum, "dtype", None, "Compute dtype (params stay model.param_dtype).",
         DTYPES),
        (flags.DEFINE_integer, "steps", 20, "Timed steps (the median is reported)."),
        (flags.DEFINE_integer, "warmup", 3, "Untimed steps after compilation."),
        (flags.DEFINE_string, "json_out", "", "Also append the JSON line to this file."),
        (flags.DEFINE_bool, "torch_baseline", False,
         "Also time a PyTorch GPT of the same shape (nanoGPT-style) in this run; needs torch."),
    ]
    for define, name, default, help_text, *enum in defs:
        if name not in FLAGS:
            if enum:
                define(name, default, enum[0], help_text)
            else:
                define(name, default, help_text)


_define_flags()


def synthetic_batch(config: Config, seq_len: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Uniform random tokens: inputs and targets, [global_batch, seq_len] int32."""
    rng = np.random.default_rng(seed)
    shape = (config.train.global_batch_size, seq_len + 1)
    tokens_BT1 = rng.integers(0, config.model.vocab_size, shape, dtype=np.int32)
    return {"inputs": tokens_BT1[:, :-1], "targets": tokens_BT1[:, 1:]}


def _peak_memory_bytes(compiled) -> tuple[int | None, str]:
    """The allocator's peak where the backend reports one (GPU/TPU), else XLA's plan for the step."""
    stats = jax.local_devices()[0].memory_stats()
    if stats and "peak_bytes_in_use" in stats:
        return int(stats["peak_bytes_in_use"]), "allocator peak_bytes_in_use"
    mem = compiled.memory_analysis()
    if mem is None:
        return None, "unavailable"
    planned = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
               + mem.temp_size_in_bytes)
    return int(planned), "compiled.memory_analysis (args + outputs - aliased + temps)"


def bench_train(config, *, steps: int = 20, warmup: int = 3, seq_len: int | None = None,
                name: str = "") -> dict[str, Any]:
    """Compile, warm up and time the real sharded train step of `config`; returns the record."""
    config = validate(config, jax.device_count())
    seq_len = seq_len or config.model.block_size
    mesh = config.mesh.make()
    trainer = Trainer.for_config(config, mesh)
    model_cfg = config.model
    with sharding.activate(mesh, trainer.rules):
        state = trainer.init_state(config.train.seed)
        batch = jax.device_put(synthetic_batch(config, seq_len), trainer.batch_sharding)
        t0 = time.perf_counter()
        compiled = trainer.jit_train_step().lower(state, batch).compile()
        compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        state, metrics = compiled(state, batch)
    jax.block_until_ready(state)
    times_s = []
    for _ in range(steps):  # each step blocked on: the time a training loop sees per step
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times_s.append(time.perf_counter() - t0)
    t0 = time.perf_counter()  # the same steps dispatched back to back (host work overlapped)
    for _ in range(steps):
        state, metrics = compiled(state, batch)
    jax.block_until_ready((state, metrics))
    pipelined_s = (time.perf_counter() - t0) / steps

    loss = float(metrics["loss"])
    step_s = statistics.median(times_s)
    tokens = config.train.global_batch_size * seq_len
    fpt = flops_per_token(model_cfg, seq_len)
    n_dev = jax.device_count()
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind)
    tflops_dev = tokens * fpt / step_s / n_dev / 1e12
    mem_bytes, mem_source = _peak_memory_bytes(compiled)
    return {
        "bench": "train", "name": name, "date": datetime.date.today().isoformat(),
        "platform": device.platform, "device_kind": device.device_kind, "devices": n_dev,
        "host": platform.node(), "cpu_count": os.cpu_count(),
        "load_avg_1m": os.getloadavg()[0], "jax": jax.__version__,
        "params": count_params(model_cfg, padding=False),
        "params_padded": count_params(model_cfg), "n_layer": model_cfg.n_layer,
        "n_embd": model_cfg.n_embd, "n_head": model_cfg.n_head,
        "batch_size": config.train.global_batch_size, "seq_len": seq_len,
        "dtype": model_cfg.dtype, "param_dtype": model_cfg.param_dtype,
        "attention_impl": model_cfg.attention_impl, "remat_policy": model_cfg.remat_policy,
        "scan_layers": model_cfg.scan_layers, "steps": steps, "warmup": warmup,
        "step_time_s": step_s, "step_time_min_s": min(times_s), "step_time_max_s": max(times_s),
        "step_time_pipelined_s": pipelined_s, "tokens_per_s": tokens / step_s,
        "flops_per_token": fpt, "tflops_per_device": tflops_dev,
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "mfu": tflops_dev * 1e12 / peak if peak else None,
        "compile_s": compile_s, "peak_memory_bytes": mem_bytes, "memory_source": mem_source,
        "final_loss": loss,
    }


def format_record(r: dict[str, Any]) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak for this device)"
    mem = f"{r['peak_memory_bytes'] / 2**20:.1f} MiB" if r["peak_memory_bytes"] else "n/a"
    return (f"{r['name']}: {r['params'] / 1e6:.2f}M params, batch {r['batch_size']} x "
            f"{r['seq_len']}, {r['dtype']}, attention={r['attention_impl']}, "
            f"remat={r['remat_policy']}, scan={r['scan_layers']} on {r['devices']} x "
            f"{r['device_kind']}\n  step {1e3 * r['step_time_s']:.2f} ms (median of "
            f"{r['steps']}; {1e3 * r['step_time_pipelined_s']:.2f} ms back to back), "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops_per_device']:.3f} TFLOP/s/device, "
            f"MFU {mfu}, compile {r['compile_s']:.1f} s, peak memory {mem}")


def run(argv: list[str]) -> None:
    """Entry point of `gpt-jax bench train` (flags already parsed by absl)."""
    del argv
    if FLAGS.preset:
        try:
            config, name = resolve_preset(FLAGS.preset), FLAGS.preset
        except AotError as e:
            raise SystemExit(f"gpt-jax bench train: {e}") from None
    else:
        config, name = FLAGS.config, _config_name()
    config = apply_overrides(config, batch_size=FLAGS.batch_size,
                             attention_impl=FLAGS.attention_impl,
                             remat_policy=FLAGS.remat_policy, scan_layers=FLAGS.scan_layers,
                             dtype=FLAGS.dtype)
    if FLAGS.steps < 1 or FLAGS.warmup < 0:
        raise SystemExit(f"--steps={FLAGS.steps} must be >= 1 and --warmup={FLAGS.warmup} >= 0")
    record = bench_train(config, steps=FLAGS.steps, warmup=FLAGS.warmup, seq_len=FLAGS.seq_len,
                         name=name)
    record["command"] = "gpt-jax " + " ".join(sys.argv[1:])
    print(format_record(record), file=sys.stderr)
    if FLAGS.torch_baseline:
        from gpt_jax.bench.torch_baseline import time_torch_step  # optional: needs torch

        record.update(time_torch_step(record["n_layer"], record["n_head"], record["n_embd"],
                                      record["seq_len"], record["batch_size"],
                                      config.model.vocab_size, steps=FLAGS.steps,
                                      warmup=FLAGS.warmup))
        record["jax_over_torch_time"] = record["step_time_s"] / record["torch_step_time_s"]
        print(f"  PyTorch {record['torch']} ({record['torch_threads']} threads), same shape: "
              f"step {1e3 * record['torch_step_time_s']:.2f} ms (median); gpt_jax / torch "
              f"step time = {record['jax_over_torch_time']:.2f}", file=sys.stderr)
    print_record(record, FLAGS.json_out)


def _config_name() -> str:
    """The --config file's name without .py."""
    path = config_flags.get_config_filename(FLAGS["config"]) or "config"
    return os.path.splitext(os.path.basename(path))[0]
