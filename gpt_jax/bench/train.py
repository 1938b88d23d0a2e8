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
import tempfile
import time
from typing import Any

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from gpt_jax import sharding
from gpt_jax.aot import PRESETS, AotError, apply_overrides, resolve_preset
from gpt_jax.commands.common import define_config_flag, print_record
from gpt_jax.config import Config, typed, validate
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
         "Also time nanoGPT's training iteration in PyTorch, same shape, in turns with the "
         "step; needs torch."),
        (flags.DEFINE_integer, "loop_steps", 0,
         "Also time the real training loop (`gpt-jax train` on the config's data, in a "
         "temporary workdir) for this many steps per round (0: not)."),
        (flags.DEFINE_integer, "rounds", 1,
         "Rounds of (step, torch iteration, loop) measurements taken in turns."),
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


def _loop_step_times(config, steps: int) -> tuple[list[float], float]:
    """(seconds per step of each logged interval, wall seconds) of `gpt_jax.train.train` for
    `steps` steps of `config` in a fresh temporary workdir: what `gpt-jax train` reports."""
    from gpt_jax.metrics import read_metrics
    from gpt_jax.train import train

    loop_config = typed(config).replace({"train.num_steps": steps})
    with tempfile.TemporaryDirectory(prefix="gpt_jax-bench-loop-") as workdir:
        start = time.perf_counter()
        train(loop_config, workdir)
        wall_s = time.perf_counter() - start
        times = [e["step_time_s"] for e in read_metrics(workdir) if "step_time_s" in e]
    return times, wall_s


def bench_train(config, *, steps: int = 20, warmup: int = 3, seq_len: int | None = None,
                name: str = "", rounds: int = 1, torch_baseline: bool = False,
                loop_steps: int = 0) -> dict[str, Any]:
    """Compile, warm up and time the real sharded train step of `config`; returns the record.
    With `torch_baseline` / `loop_steps`, each of `rounds` rounds also times nanoGPT's PyTorch
    iteration and the real training loop, in turns with the step."""
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
    iteration = None
    if torch_baseline:
        from gpt_jax.bench.torch_baseline import time_iterations, torch_iteration

        iteration, torch_version, torch_threads, _ = torch_iteration(
            model_cfg.n_layer, model_cfg.n_head, model_cfg.n_embd, seq_len,
            config.train.global_batch_size, model_cfg.vocab_size, model_cfg.use_bias)
        time_iterations(iteration, warmup)
    times_s, torch_s, loop_s, loop_walls, pipelined = [], [], [], [], []
    for _ in range(rounds):
        for _ in range(steps):  # each step blocked on: the time a training loop sees per step
            t0 = time.perf_counter()
            state, metrics = compiled(state, batch)
            jax.block_until_ready((state, metrics))
            times_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()  # the same steps dispatched back to back (host work overlapped)
        for _ in range(steps):
            state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        pipelined.append((time.perf_counter() - t0) / steps)
        if iteration is not None:
            torch_s += time_iterations(iteration, steps)
        if loop_steps:
            times, wall_s = _loop_step_times(config, loop_steps)
            loop_s += times
            loop_walls.append(wall_s)

    loss = float(metrics["loss"])
    step_s = statistics.median(times_s)
    tokens = config.train.global_batch_size * seq_len
    fpt = flops_per_token(model_cfg, seq_len)
    n_dev = jax.device_count()
    device = jax.devices()[0]
    peak = peak_flops(device.device_kind)
    tflops_dev = tokens * fpt / step_s / n_dev / 1e12
    mem_bytes, mem_source = _peak_memory_bytes(compiled)
    record = {
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
        "rounds": rounds, "step_time_s": step_s, "step_time_min_s": min(times_s),
        "step_time_max_s": max(times_s),
        "step_time_pipelined_s": statistics.median(pipelined), "tokens_per_s": tokens / step_s,
        "flops_per_token": fpt, "tflops_per_device": tflops_dev,
        "peak_tflops_per_device": peak / 1e12 if peak else None,
        "mfu": tflops_dev * 1e12 / peak if peak else None,
        "compile_s": compile_s, "peak_memory_bytes": mem_bytes, "memory_source": mem_source,
        "final_loss": loss,
    }
    torch_step_s = statistics.median(torch_s) if torch_s else None
    if torch_s:
        record.update(torch=torch_version, torch_threads=torch_threads,
                      torch_step_time_s=torch_step_s, torch_step_time_min_s=min(torch_s),
                      jax_over_torch_time=step_s / torch_step_s)
    if loop_s:
        loop_step_s = statistics.median(loop_s)
        record.update(loop_steps=loop_steps, loop_step_time_s=loop_step_s,
                      loop_wall_s=statistics.median(loop_walls),
                      loop_over_step_time=loop_step_s / step_s)
        if torch_s:
            record["loop_over_torch_time"] = loop_step_s / torch_step_s
    return record


def format_record(r: dict[str, Any]) -> str:
    mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak for this device)"
    mem = f"{r['peak_memory_bytes'] / 2**20:.1f} MiB" if r["peak_memory_bytes"] else "n/a"
    return (f"{r['name']}: {r['params'] / 1e6:.2f}M params, batch {r['batch_size']} x "
            f"{r['seq_len']}, {r['dtype']}, attention={r['attention_impl']}, "
            f"remat={r['remat_policy']}, scan={r['scan_layers']} on {r['devices']} x "
            f"{r['device_kind']}\n  step {1e3 * r['step_time_s']:.2f} ms (median of "
            f"{r['steps'] * r['rounds']}; {1e3 * r['step_time_pipelined_s']:.2f} ms back to "
            "back), "
            f"{r['tokens_per_s']:,.0f} tokens/s, {r['tflops_per_device']:.3f} TFLOP/s/device, "
            f"MFU {mfu}, compile {r['compile_s']:.1f} s, peak memory {mem}"
            + (f"\n  PyTorch {r['torch']} ({r['torch_threads']} threads), nanoGPT's iteration: "
               f"{1e3 * r['torch_step_time_s']:.2f} ms (median); step / torch = "
               f"{r['jax_over_torch_time']:.2f}" if "torch_step_time_s" in r else "")
            + (f"\n  training loop ({r['loop_steps']} steps a round, the config's data): "
               f"{1e3 * r['loop_step_time_s']:.2f} ms per step (median of its logged "
               f"intervals), {r['loop_wall_s']:.1f} s wall; loop / step = "
               f"{r['loop_over_step_time']:.2f}" if "loop_step_time_s" in r else "")
            + (f"; loop / torch = {r['loop_over_torch_time']:.2f}"
               if "loop_over_torch_time" in r else ""))


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
    if FLAGS.rounds < 1 or FLAGS.loop_steps < 0:
        raise SystemExit(f"--rounds={FLAGS.rounds} must be >= 1 and --loop_steps="
                         f"{FLAGS.loop_steps} >= 0")
    record = bench_train(config, steps=FLAGS.steps, warmup=FLAGS.warmup, seq_len=FLAGS.seq_len,
                         name=name, rounds=FLAGS.rounds, torch_baseline=FLAGS.torch_baseline,
                         loop_steps=FLAGS.loop_steps)
    record["command"] = "gpt-jax " + " ".join(sys.argv[1:])
    print(format_record(record), file=sys.stderr)
    print_record(record, FLAGS.json_out)


def _config_name() -> str:
    """The --config file's name without .py."""
    path = config_flags.get_config_filename(FLAGS["config"]) or "config"
    return os.path.splitext(os.path.basename(path))[0]
