"""`gpt-jax bench train`: the JSON line it prints, and the FLOPs behind its TFLOP/s and MFU."""

import json
import math
import os
import subprocess
import sys

import pytest

from gpt_jax import aot
from gpt_jax.bench import train as bench
from gpt_jax.config import load_preset, typed
from gpt_jax.flops import count_params, flops_per_token

pytestmark = pytest.mark.e2e  # every test here runs a training run or a process


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE = ("step_time_s", "step_time_pipelined_s", "tokens_per_s", "tflops_per_device",
            "flops_per_token", "compile_s", "peak_memory_bytes", "params")


def test_cli_prints_one_json_line_with_positive_numbers(tmp_path):
    out = tmp_path / "bench.jsonl"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "gpt_jax.cli", "bench", "train", "--config=configs/tiny.py",
         "--steps=3", "--warmup=1", "--batch_size=4", f"--json_out={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert json.loads(out.read_text().strip()) == record
    for key in POSITIVE:
        assert math.isfinite(record[key]) and record[key] > 0, (key, record[key])
    assert record["step_time_min_s"] <= record["step_time_s"] <= record["step_time_max_s"]
    assert record["batch_size"] == 4 and record["seq_len"] == 32 and record["steps"] == 3
    assert record["tokens_per_s"] == pytest.approx(4 * 32 / record["step_time_s"])
    # No published peak for a CPU: MFU is n/a, never a made-up number.
    assert record["platform"] == "cpu" and record["mfu"] is None
    assert record["peak_tflops_per_device"] is None
    assert "bench train" in record["command"] and "MFU n/a" in proc.stderr


def test_flops_are_the_models_flops_per_token():
    config = aot.apply_overrides(load_preset("tiny"), batch_size=8, remat_policy="full")
    record = bench.bench_train(config, steps=2, warmup=1, name="tiny")
    cfg = typed(config).model
    assert record["flops_per_token"] == flops_per_token(cfg, 32)
    assert record["devices"] == 8 and record["remat_policy"] == "full"
    expected = 8 * 32 * flops_per_token(cfg, 32) / record["step_time_s"] / 8 / 1e12
    assert record["tflops_per_device"] == pytest.approx(expected)
    assert math.isfinite(record["final_loss"])


def test_overrides_and_presets():
    config = aot.apply_overrides(aot.resolve_preset("124M"), batch_size=16, dtype="bfloat16",
                                 scan_layers=True, attention_impl="splash", mesh=(1, 4, 2))
    assert (config.model.n_layer, config.model.n_embd, config.model.block_size) == (12, 768, 1024)
    assert config.train.global_batch_size == 16 and config.model.dtype == "bfloat16"
    assert config.model.scan_layers and config.model.attention_impl == "splash"
    assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (1, 4, 2)
    assert load_preset("gpt2_124m").model.dtype == "float32"  # the preset itself is untouched
    with pytest.raises(aot.AotError, match=r"unknown preset '999M'; one of: 124M, 350M"):
        aot.resolve_preset("999M")


@pytest.mark.parametrize("use_bias", [True, False])
def test_nanogpts_torch_iteration_has_our_shape_and_trains(use_bias):
    pytest.importorskip("torch")
    from gpt_jax.bench.torch_baseline import torch_iteration

    cfg = typed(load_preset("tiny")).replace({"model.use_bias": use_bias}).model
    iteration, _, threads, n_params = torch_iteration(cfg.n_layer, cfg.n_head, cfg.n_embd,
                                                      cfg.block_size, 8, cfg.vocab_size,
                                                      use_bias)
    assert n_params == count_params(cfg, padding=False) and threads >= 1
    first = iteration()  # uniform random tokens: the loss starts at ln(vocab)
    assert abs(first - math.log(cfg.vocab_size)) < 0.3
    assert all(math.isfinite(iteration()) for _ in range(3))


def test_the_step_the_loop_and_torch_are_timed_in_turns():
    pytest.importorskip("torch")
    config = aot.apply_overrides(load_preset("tiny"), batch_size=8)
    record = bench.bench_train(config, steps=2, warmup=1, name="tiny", rounds=2,
                               torch_baseline=True, loop_steps=10)
    assert record["rounds"] == 2 and record["loop_steps"] == 10
    for key in ("loop_step_time_s", "loop_wall_s", "torch_step_time_s"):
        assert math.isfinite(record[key]) and record[key] > 0, key
    assert record["loop_wall_s"] > 10 * record["loop_step_time_s"]
    assert record["loop_over_step_time"] == pytest.approx(
        record["loop_step_time_s"] / record["step_time_s"])
    assert record["loop_over_torch_time"] == pytest.approx(
        record["loop_step_time_s"] / record["torch_step_time_s"])


def test_bench_sample_and_hugging_face_generate_make_the_same_greedy_tokens():
    pytest.importorskip("transformers")
    import jax

    from gpt_jax.bench import sample as bench_sample
    from gpt_jax.model import GPT, init_params

    cfg = typed(load_preset("tiny")).model
    params = init_params(GPT(cfg), jax.random.key(0))
    prompts = bench_sample._prompts(2, 5, cfg.vocab_size)
    runs = {"cached": bench_sample.cached_run(cfg, params, prompts, 12),
            "hf": bench_sample.hf_run(cfg, params, prompts, 12)}
    seconds, tokens = bench_sample._in_turns(runs, 2)
    assert tokens["cached"] == tokens["hf"]  # Hugging Face is the reference
    assert [len(t) for t in tokens["hf"]] == [12, 12] and len(set(map(tuple, prompts))) == 2
    assert all(s > 0 for s in seconds.values())


def test_bench_serve_mixed_lengths_serve_and_static_make_every_requested_token(tmp_path):
    """`gpt-jax bench serve` end to end on a tiny model: each request asks for its own number
    of tokens (--bench_new_tokens_min); the server and the static batches (which run to their
    longest row) both return exactly those, since the EOS row is zero."""
    import numpy as np

    out = tmp_path / "serve.json"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    proc = subprocess.run(
        [sys.executable, "-m", "gpt_jax.cli", "bench", "serve", "--config=configs/tiny.py",
         "--config.model.vocab_size=320", "--config.model.block_size=64",
         "--bench_concurrency=1,3", "--bench_systems=serve,static",
         "--bench_prompt_min=4", "--bench_prompt_max=12", "--bench_new_tokens=9",
         "--bench_new_tokens_min=2", "--bench_slots=4", "--bench_memory_requests=0",
         f"--bench_workdir={tmp_path / 'work'}", f"--bench_json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    for c in (1, 3):
        n = max(4, 2 * c)
        want = int(np.random.default_rng(1000 + c).integers(2, 10, n).sum())
        for system in ("serve", "static"):
            row = results[system][str(c)]
            assert (row["requests"], row["tokens"]) == (n, want), (system, c, row)
    assert "serve / static output tok/s at concurrency 3:" in proc.stdout
