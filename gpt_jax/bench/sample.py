"""`gpt-jax bench sample`: tokens/s of the KV-cached sampler against a no-cache baseline.

Both run greedy on random-init params of the config (default: the GPT-2 124M preset) with
random prompt ids, all compiled before timing (medians of `--bench_repeats` runs):

- cached: `gpt_jax.sample.generate` end to end on a serving engine with one slot per row
  (prefill, insert and one compiled decode step per token, host work included);
  tokens/s = batch * new tokens / seconds.
- no-cache: a compiled `fori_loop` that runs the full forward pass over a fixed window of
  prompt + new tokens for every new token (the static-shape way to sample without a cache).
  Every step costs the same, so on CPU it is timed over `--bench_baseline_steps` steps (2) in
  `--bench_baseline_repeats` runs (1), and tokens/s = batch * steps / seconds.

Rows: each of `--bench_batch_sizes` at prompt + new tokens, and batch 1 at
`--bench_long_total` total tokens (prompt = total - new).

`--bench_hf_baseline` (needs the hf extra's torch and transformers) adds Hugging Face's
`GPT2LMHeadModel.generate` on the same weights (`gpt_jax.hf.mapping`), greedy, the same prompts
and new tokens, timed in turns with the cached runs (one of ours, one of theirs, `--bench_repeats`
times, after one untimed run of each), and the share of generated tokens both agree on.
"""

from __future__ import annotations

import functools
import json
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from gpt_jax import sample
from gpt_jax.commands.common import define_config_flag
from gpt_jax.config import typed
from gpt_jax.model import GPT, init_params
from gpt_jax.serve.engine import Engine, EngineConfig

if "config" not in flags.FLAGS:
    define_config_flag("gpt2_124m")
flags.DEFINE_string("bench_batch_sizes", "", "Comma-separated batch sizes ('': 1,8 on CPU, "
                    "1,8,64 on an accelerator).")
flags.DEFINE_integer("bench_prompt_len", 16, "Prompt tokens per row.")
flags.DEFINE_integer("bench_new_tokens", 128, "New tokens per row.")
flags.DEFINE_integer("bench_repeats", 3, "Timed runs per measurement (the median is reported).")
flags.DEFINE_integer("bench_baseline_steps", 0, "No-cache steps timed per run (0: 2 on CPU, "
                     "all new tokens on an accelerator).")
flags.DEFINE_integer("bench_baseline_repeats", 0, "Timed no-cache runs (0: 1 on CPU, else "
                     "--bench_repeats).")
flags.DEFINE_integer("bench_long_total", 512, "Also compare at batch 1 with this many total "
                     "tokens (0: skip).")
flags.DEFINE_bool("bench_hf_baseline", False, "Also time Hugging Face `generate` on the same "
                  "weights, in turns with the cached runs (needs torch and transformers).")
flags.DEFINE_string("bench_json", "", "Also write the results to this JSON file.")

FLAGS = flags.FLAGS


def _median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _prompts(batch: int, prompt_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, vocab_size, (batch, prompt_len)).tolist()


def cached_run(cfg, params, prompts: list[list[int]], new_tokens: int):
    """A function that generates `new_tokens` greedy tokens per prompt on a fresh engine with
    one slot per row (compiled on its first call), returning the tokens."""
    engine = Engine(cfg, params, config=EngineConfig(slots=len(prompts)))
    return lambda: sample.generate(engine, prompts, max_new_tokens=new_tokens,
                                   temperature=0.0, stop_at_eos=False).tokens


def hf_run(cfg, params, prompts: list[list[int]], new_tokens: int):
    """The same as `cached_run` with Hugging Face `generate` on the same weights."""
    try:  # optional: the hf extra
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
    except ImportError as e:
        raise SystemExit(f"--bench_hf_baseline needs torch and transformers "
                         f"(pip install 'gpt_jax[hf]'): {e}") from None
    from gpt_jax.hf.mapping import hf_config_from_model, hf_from_params

    model = GPT2LMHeadModel(GPT2Config(**hf_config_from_model(cfg, None))).eval()
    loaded = model.load_state_dict({k: torch.from_numpy(v) for k, v in
                                    hf_from_params(jax.device_get(params), cfg).items()},
                                   strict=False)  # the tied head is the embedding: not saved
    if loaded.unexpected_keys or set(loaded.missing_keys) - {"lm_head.weight"}:
        raise SystemExit(f"--bench_hf_baseline: the weights do not fit GPT2LMHeadModel: {loaded}")
    ids = torch.tensor(prompts)

    def run():
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 pad_token_id=0)
        return out[:, ids.shape[1]:].tolist()

    return run


def _in_turns(runs: dict, repeats: int) -> tuple[dict, dict]:
    """({name: median seconds}, {name: tokens}): each run once untimed, then `repeats` rounds
    of one timed call of each in turn (so a busy moment of the machine hits all of them)."""
    tokens = {name: run() for name, run in runs.items()}
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, tokens


@functools.partial(jax.jit, static_argnames=("cfg", "steps"))
def _no_cache_greedy(params, tokens_BT, prompt_len, *, cfg, steps: int):
    """`steps` greedy tokens, each from a full forward pass over the whole window."""
    def step(t, tokens_BT):
        logits_BTV = GPT(cfg).apply({"params": params}, tokens_BT)
        pos = prompt_len + t - 1
        next_B = jnp.argmax(jax.lax.dynamic_index_in_dim(logits_BTV, pos, 1, False), -1)
        return jax.lax.dynamic_update_index_in_dim(tokens_BT, next_B.astype(tokens_BT.dtype),
                                                   pos + 1, 1)

    return jax.lax.fori_loop(0, steps, step, tokens_BT)


def no_cache_tokens_per_s(cfg, params, batch: int, prompt_len: int, new_tokens: int,
                          steps: int, repeats: int) -> float:
    tokens_BT = np.zeros((batch, prompt_len + new_tokens), np.int32)
    tokens_BT[:, :prompt_len] = _prompts(batch, prompt_len, cfg.vocab_size)
    compiled = _no_cache_greedy.lower(params, tokens_BT, np.int32(prompt_len), cfg=cfg,
                                      steps=steps).compile()
    seconds = _median_seconds(
        lambda: jax.block_until_ready(compiled(params, tokens_BT, np.int32(prompt_len))), repeats)
    return batch * steps / seconds


def measure(config, batch_sizes: list[int], prompt_len: int, new_tokens: int, repeats: int,
            baseline_steps: int, baseline_repeats: int, long_total: int,
            hf_baseline: bool = False) -> list[dict]:
    cfg = typed(config).model
    params = jax.jit(functools.partial(init_params, GPT(cfg)))(jax.random.key(0))
    cases = [(b, prompt_len) for b in batch_sizes]
    if long_total:
        cases.append((1, long_total - new_tokens))
    rows = []
    for batch, plen in cases:
        steps = min(baseline_steps, new_tokens) if baseline_steps else new_tokens
        prompts = _prompts(batch, plen, cfg.vocab_size)
        runs = {"cached": cached_run(cfg, params, prompts, new_tokens)}
        if hf_baseline:
            runs["hf"] = hf_run(cfg, params, prompts, new_tokens)
        seconds, tokens = _in_turns(runs, repeats)
        assert [len(t) for t in tokens["cached"]] == [new_tokens] * batch
        baseline = no_cache_tokens_per_s(cfg, params, batch, plen, new_tokens, steps,
                                         baseline_repeats)
        cached = batch * new_tokens / seconds["cached"]
        row = dict(batch=batch, prompt=plen, new=new_tokens, total=plen + new_tokens,
                   cached_tok_s=cached, no_cache_tok_s=baseline,
                   speedup=cached / baseline, baseline_steps=steps)
        if hf_baseline:
            same = np.mean(np.array(tokens["cached"]) == np.array(tokens["hf"]))
            row.update(hf_tok_s=batch * new_tokens / seconds["hf"], same_tokens=float(same))
            row["over_hf"] = cached / row["hf_tok_s"]
        rows.append(row)
        print(_row(rows[-1]), flush=True)
    return rows


def _row(r: dict) -> str:
    hf = (f" {r['hf_tok_s']:.1f} | {r['over_hf']:.2f}x | {100 * r['same_tokens']:.0f}% |"
          if "hf_tok_s" in r else "")
    return (f"| {r['batch']} | {r['prompt']} + {r['new']} = {r['total']} | "
            f"{r['cached_tok_s']:.1f} | {r['no_cache_tok_s']:.2f} "
            f"(over {r['baseline_steps']} steps) | {r['speedup']:.1f}x |{hf}")


def run(argv: list[str]) -> None:
    del argv
    on_cpu = jax.devices()[0].platform == "cpu"
    sizes = FLAGS.bench_batch_sizes or ("1,8" if on_cpu else "1,8,64")
    batch_sizes = [int(s) for s in sizes.split(",") if s.strip()]
    baseline_steps = FLAGS.bench_baseline_steps or (2 if on_cpu else 0)
    baseline_repeats = FLAGS.bench_baseline_repeats or (1 if on_cpu else FLAGS.bench_repeats)
    config = FLAGS.config
    print(f"# sampler benchmark: {config.model.n_layer} layers, width {config.model.n_embd}, "
          f"vocab {config.model.vocab_size}, {config.model.dtype}; {jax.devices()[0].device_kind}"
          f" x{jax.device_count()}, {platform.processor() or platform.machine()}")
    hf = (" HF generate tok/s | cached / HF | same tokens |", "---|---|---|")
    hf = hf if FLAGS.bench_hf_baseline else ("", "")
    print("| batch | prompt + new = total | cached tok/s | no-cache tok/s | cached / no-cache |"
          + hf[0])
    print("|---|---|---|---|---|" + hf[1])
    rows = measure(config, batch_sizes, FLAGS.bench_prompt_len, FLAGS.bench_new_tokens,
                   FLAGS.bench_repeats, baseline_steps, baseline_repeats,
                   FLAGS.bench_long_total, FLAGS.bench_hf_baseline)
    by_batch = {r["batch"]: r for r in rows if r["prompt"] == FLAGS.bench_prompt_len}
    if 1 in by_batch and 8 in by_batch:
        print(f"batch 8 / batch 1 (cached): "
              f"{by_batch[8]['cached_tok_s'] / by_batch[1]['cached_tok_s']:.1f}x")
    if FLAGS.bench_json:
        with open(FLAGS.bench_json, "w") as f:
            json.dump(rows, f, indent=2)
