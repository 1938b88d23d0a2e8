"""`gpt-jax bench serve`: an OpenAI-API load test of three ways to serve the same weights.

The same prompts (random text of `--bench_prompt_min`-`--bench_prompt_max` tokens) and lengths
(`--bench_new_tokens` new tokens, greedy; or, with `--bench_new_tokens_min`, each request's
own length drawn from that range) at each concurrency of `--bench_concurrency`, a closed loop
(each of C clients sends its next request when its last one ends):

- serve: `gpt-jax serve` in its own process, `--bench_slots` slots, streamed completions;
- static: the same requests through static `generate` batches (`bench/static_sampler.py`):
  C requests start together and all end when the batch's longest does; its "first token" is
  the batch's end (nothing streams), so it has no inter-token latency;
- hf: `transformers serve --continuous-batching` on the `gpt-jax convert --to=hf` weights,
  from the local folder with the hub offline (skipped without the hf extra).

The model is a random-init `--config` (default GPT-2 124M) with a synthetic byte-level BPE of
the config's vocabulary (so every system tokenizes the same text the same way); the row of
<|endoftext|> is zero, so greedy never picks it and every request makes all its tokens. The
client is a small httpx one (an async task per client, streaming, timestamps per chunk).
After the table: the server's host work per decode step (from /metrics) and its resident
memory over `--bench_memory_requests` short requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
from absl import flags

from gpt_jax.commands.common import define_config_flag, usage_error
from gpt_jax.config import typed

if "config" not in flags.FLAGS:
    define_config_flag("gpt2_124m")
flags.DEFINE_string("bench_concurrency", "1,8,32", "Comma-separated client counts.")
flags.DEFINE_string("bench_systems", "serve,static,hf", "Which of serve, static, hf to run.")
flags.DEFINE_integer("bench_requests", 0, "Requests per concurrency (0: max(4, 2 * C)).")
flags.DEFINE_integer("bench_prompt_min", 64, "Shortest prompt, in tokens.")
flags.DEFINE_integer("bench_prompt_max", 256, "Longest prompt, in tokens.")
flags.DEFINE_integer("bench_new_tokens", 128, "New tokens per request.")
flags.DEFINE_integer("bench_new_tokens_min", 0, "If set: each request's new tokens are drawn "
                     "uniformly from [this, --bench_new_tokens] (mixed lengths, where a static "
                     "batch waits for its longest row).")
flags.DEFINE_integer("bench_slots", 32, "The server's decode slots.")
flags.DEFINE_integer("bench_memory_requests", 1000, "Short requests (16-token prompt, 4 new "
                     "tokens) after the table, the server's memory read every quarter (0: skip).")
flags.DEFINE_string("bench_workdir", "", "Where to write the model (default: a temp dir).")
flags.DEFINE_string("bench_json", "", "Also write the results to this JSON file.")
FLAGS = flags.FLAGS

MODEL = "bench"
START_TIMEOUT_S = 900  # a cold start (compiles) on a loaded 2-core box


# -- the model: random weights, a synthetic GPT-2-sized BPE, a run and its HF export -----------

def write_synthetic_bpe(folder: str, vocab_size: int, seed: int = 0) -> None:
    """vocab.json + merges.txt of `vocab_size` tokens: the 256 bytes, letter runs (with and
    without a leading space) merged one letter at a time, then <|endoftext|>."""
    from gpt_jax.data.gpt2_bpe import END_OF_TEXT, bytes_to_unicode

    chars = bytes_to_unicode()
    vocab = {chars[b]: b for b in range(256)}
    letters = [chars[b] for b in range(ord("a"), ord("z") + 1)]
    space = chars[ord(" ")]
    rng = np.random.default_rng(seed)
    merges, words = [], []
    for letter in letters:
        merges.append((space, letter))
        vocab[space + letter] = len(vocab)
        words.append(space + letter)
    while len(vocab) < vocab_size - 1:
        left = words[rng.integers(len(words))] if rng.random() < 0.9 else letters[
            rng.integers(26)]
        right = letters[rng.integers(26)]
        if left + right not in vocab and len(left) < 12:
            merges.append((left, right))
            vocab[left + right] = len(vocab)
            words.append(left + right)
    vocab[END_OF_TEXT] = len(vocab)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(folder, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def make_model(config, root: str) -> tuple[str, str]:
    """(gpt_jax run directory, Hugging Face folder) holding the same random weights."""
    from gpt_jax.hf.convert import from_hf, save_safetensors, to_hf
    from gpt_jax.hf.mapping import hf_config_from_model, hf_from_params
    from gpt_jax.model import GPT, init_params

    cfg = typed(config).model
    source, run_dir, hf_dir = (os.path.join(root, d) for d in ("source", "run", "hf"))
    write_synthetic_bpe(source, cfg.vocab_size)
    params = jax.tree.map(np.array, jax.device_get(jax.jit(functools.partial(
        init_params, GPT(cfg)))(jax.random.key(0))))  # writable copies
    eos = cfg.vocab_size - 1
    params["wte"]["embedding"][eos] = 0.0  # its logit is 0: greedy never picks <|endoftext|>
    with open(os.path.join(source, "config.json"), "w") as f:
        json.dump(hf_config_from_model(cfg, eos), f)
    save_safetensors(hf_from_params(params, cfg), os.path.join(source, "model.safetensors"))
    from_hf(source, run_dir)
    to_hf(run_dir, hf_dir)
    return run_dir, hf_dir


def make_prompts(bpe_dir: str, n: int, lo: int, hi: int, seed: int = 1) -> list[str]:
    from gpt_jax.data.gpt2_bpe import load_dir

    tok = load_dir(bpe_dir)
    rng = np.random.default_rng(seed)
    first_word, eos = 256 + 26, tok.vocab_size - 1  # merged letter runs only: plain ASCII
    return [tok.decode(rng.integers(first_word, eos, rng.integers(lo, hi + 1)).tolist())
            for _ in range(n)]


# -- the client ---------------------------------------------------------------------------

@dataclasses.dataclass
class Result:
    sent: float
    chunk_times: list[float]
    tokens: int


async def _one(client, url: str, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    sent, times, usage = time.perf_counter(), [], None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"{url}: HTTP {response.status_code}: "
                               f"{(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("text") for c in chunk.get("choices") or ()):
                times.append(time.perf_counter())
    tokens = usage["completion_tokens"] if usage else len(times)
    return Result(sent, times, tokens)


Request = tuple[str, int]  # (prompt, max_tokens)


async def _closed_loop(url: str, model: str, requests: list[Request],
                       concurrency: int) -> tuple[list[Result], float]:
    import httpx

    queue = list(reversed(requests))
    results: list[Result] = []
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(1800.0), limits=limits) as client:
        async def worker():
            while queue:
                results.append(await _one(client, url, model, *queue.pop()))

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return results, time.perf_counter() - start


def load_test(url: str, model: str, requests: list[Request], concurrency: int) -> dict:
    results, wall = asyncio.run(_closed_loop(url, model, requests, concurrency))
    ttft = [r.chunk_times[0] - r.sent for r in results if r.chunk_times]
    itl = [b - a for r in results for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    return _row(len(results), sum(r.tokens for r in results), wall, ttft, itl)


def _row(requests: int, tokens: int, wall: float, ttft: list[float], itl: list[float]) -> dict:
    q = lambda xs, p: float(np.percentile(xs, p)) if xs else float("nan")  # noqa: E731
    return dict(requests=requests, tokens=tokens, seconds=wall, tok_s=tokens / wall,
                req_s=requests / wall, ttft_p50=q(ttft, 50), ttft_p99=q(ttft, 99),
                itl_p50=q(itl, 50), itl_p99=q(itl, 99))


# -- the systems --------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(command: list[str], port: int, log_path: str, env: dict | None = None):
    """A server process on 127.0.0.1:`port`, ready (GET /health is 200) or RuntimeError."""
    import httpx

    with open(log_path, "w") as log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})})
    url, end = f"http://127.0.0.1:{port}", time.monotonic() + START_TIMEOUT_S
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{command[0]} exited {proc.returncode}; see {log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            if time.monotonic() > end:
                raise RuntimeError(f"{command[0]} not ready after {START_TIMEOUT_S} s")
            time.sleep(1)
        yield proc, url
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _metric(url: str, name: str) -> float:
    import httpx

    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise KeyError(name)


def _rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kb / 1024


def bench_serve(run_dir: str, requests_by_c: dict, slots: int, memory_prompts: list[str],
                log_dir: str) -> tuple[dict, dict]:
    port = _free_port()
    command = [sys.executable, "-m", "gpt_jax.cli", "serve", f"--workdir={run_dir}",
               f"--port={port}", f"--slots={slots}", f"--served_model_name={MODEL}",
               f"--max_queue={max(len(r) for r in requests_by_c.values()) + 64}"]
    rows, extra = {}, {}
    with server(command, port, os.path.join(log_dir, "serve.log")) as (proc, url):
        load_test(url, MODEL, [(requests_by_c[min(requests_by_c)][0][0], 4)], 1)  # first one
        for c, requests in requests_by_c.items():
            before = [_metric(url, f"gpt_jax_engine_{k}") for k in ("decode_seconds",
                                                                    "host_seconds", "steps")]
            rows[c] = load_test(url, MODEL, requests, c)
            after = [_metric(url, f"gpt_jax_engine_{k}") for k in ("decode_seconds",
                                                                   "host_seconds", "steps")]
            device, host, steps = (a - b for a, b in zip(after, before))
            rows[c].update(step_ms=1e3 * (device + host) / steps, host_share=host / (device + host))
            print(_line("serve", c, rows[c]), flush=True)
        if memory_prompts:
            extra["memory_mib"] = []
            quarter = len(memory_prompts) // 4
            for i in range(4):
                extra["memory_mib"].append(_rss_mib(proc.pid))
                load_test(url, MODEL, [(p, 4) for p in
                                       memory_prompts[i * quarter:(i + 1) * quarter]], 32)
            extra["memory_mib"].append(_rss_mib(proc.pid))
            extra["compilations"] = _metric(url, "gpt_jax_compilations")
    return rows, extra


def bench_static(run_dir: str, requests_by_c: dict) -> dict:
    from gpt_jax import api
    from gpt_jax.bench.static_sampler import static_generate

    lm = api.load(run_dir)
    rows = {}
    for c, requests in requests_by_c.items():
        ids = [lm.tokenizer.encode(p) for p, _ in requests]
        batches = [(ids[i:i + c], [n for _, n in requests[i:i + c]])
                   for i in range(0, len(ids), c)]
        for batch, _ in batches:  # compile every shape first (one token: the loop stops at once)
            static_generate(lm.model_cfg, lm.params, batch, 1)
        start, ttft, tokens = time.perf_counter(), [], 0
        for batch, lengths in batches:  # the batch runs until its longest row is done
            sent = time.perf_counter()
            out = static_generate(lm.model_cfg, lm.params, batch, max(lengths))
            ttft += [time.perf_counter() - sent] * len(batch)
            tokens += sum(min(len(o), n) for o, n in zip(out, lengths))
        rows[c] = _row(len(ids), tokens, time.perf_counter() - start, ttft, [])
        print(_line("static", c, rows[c]), flush=True)
    return rows


def bench_hf(hf_dir: str, requests_by_c: dict, log_dir: str) -> dict:
    port = _free_port()
    exe = shutil.which("transformers", path=os.path.dirname(sys.executable)) or "transformers"
    command = [exe, "serve", "--continuous-batching", "--device", "cpu", "--host", "127.0.0.1",
               "--port", str(port), hf_dir]
    rows = {}
    with server(command, port, os.path.join(log_dir, "hf.log"),
                env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}) as (_, url):
        load_test(url, hf_dir, [(requests_by_c[min(requests_by_c)][0][0], 4)], 1)  # loads it
        for c, requests in requests_by_c.items():
            rows[c] = load_test(url, hf_dir, requests, c)
            print(_line("hf", c, rows[c]), flush=True)
    return rows


def _line(system: str, c: int, r: dict) -> str:
    ms = lambda x: "-" if x != x else f"{1e3 * x:.0f}"  # noqa: E731 -- nan: not measured
    return (f"| {system} | {c} | {r['requests']} | {r['tokens']} | {r['tok_s']:.1f} | "
            f"{r['req_s']:.3f} | "
            f"{ms(r['ttft_p50'])} / {ms(r['ttft_p99'])} | {ms(r['itl_p50'])} / "
            f"{ms(r['itl_p99'])} |")


def run(argv: list[str]) -> None:
    del argv
    config, systems = FLAGS.config, FLAGS.bench_systems.split(",")
    unknown = set(systems) - {"serve", "static", "hf"}
    if unknown:
        raise usage_error(f"--bench_systems: {sorted(unknown)} unknown; allowed: serve, static, hf")
    if "hf" in systems and shutil.which("transformers",
                                        path=os.path.dirname(sys.executable)) is None:
        print("# hf skipped: no `transformers` command (pip install 'gpt_jax[hf]')")
        systems.remove("hf")
    cs = [int(c) for c in FLAGS.bench_concurrency.split(",") if c.strip()]
    lo, hi = FLAGS.bench_new_tokens_min or FLAGS.bench_new_tokens, FLAGS.bench_new_tokens
    if not 1 <= lo <= hi:
        raise usage_error(f"--bench_new_tokens_min={lo} must be in [1, --bench_new_tokens={hi}]")
    root = FLAGS.bench_workdir or tempfile.mkdtemp(prefix="gpt_jax_bench_serve_")
    m = config.model
    print(f"# serving benchmark: {m.n_layer} layers, width {m.n_embd}, vocab {m.vocab_size}, "
          f"context {m.block_size}, {m.dtype}, random init; prompts {FLAGS.bench_prompt_min}-"
          f"{FLAGS.bench_prompt_max} tokens, {lo if lo == hi else f'{lo}-{hi}'} new, greedy; "
          f"{FLAGS.bench_slots} slots; {jax.devices()[0].device_kind}, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}", flush=True)
    start = time.perf_counter()
    run_dir, hf_dir = make_model(config, root)
    requests_by_c = {}
    for c in cs:
        n = FLAGS.bench_requests or max(4, 2 * c)
        prompts = make_prompts(hf_dir, n, FLAGS.bench_prompt_min, FLAGS.bench_prompt_max, seed=c)
        lengths = np.random.default_rng(1000 + c).integers(lo, hi + 1, n).tolist()
        requests_by_c[c] = list(zip(prompts, lengths))
    memory = make_prompts(hf_dir, FLAGS.bench_memory_requests, 16, 16, seed=99)
    print(f"# model written to {root} in {time.perf_counter() - start:.0f} s")
    print("| system | concurrency | requests | output tokens | output tok/s | req/s | "
          "TTFT p50 / p99 ms | ITL p50 / p99 ms |")
    print("|---|---|---|---|---|---|---|---|")
    results, extra = {}, {}
    runs = {"serve": lambda: bench_serve(run_dir, requests_by_c, FLAGS.bench_slots, memory, root),
            "static": lambda: (bench_static(run_dir, requests_by_c), {}),
            "hf": lambda: (bench_hf(hf_dir, requests_by_c, root), {})}
    for system in systems:  # one system failing (e.g. a missing extra) keeps the others' rows
        try:
            results[system], more = runs[system]()
            extra.update(more)
        except Exception as e:  # noqa: BLE001 -- reported, the benchmark goes on
            print(f"# {system} failed: {type(e).__name__}: {e}", flush=True)
    top = max(cs)
    for other in ("static", "hf"):
        if top in results.get("serve", {}) and top in results.get(other, {}):
            print(f"serve / {other} output tok/s at concurrency {top}: "
                  f"{results['serve'][top]['tok_s'] / results[other][top]['tok_s']:.2f}x")
    if "serve" in results:
        for c, r in results["serve"].items():
            print(f"serve, concurrency {c}: decode step {r['step_ms']:.1f} ms, host work "
                  f"{100 * r['host_share']:.1f}% of it")
    if extra.get("memory_mib"):
        print(f"serve resident memory over {len(memory)} requests (MiB, every quarter): "
              + ", ".join(f"{x:.0f}" for x in extra["memory_mib"])
              + f"; compiled programs {extra['compilations']:.0f}")
    print(f"# whole benchmark: {(time.perf_counter() - start) / 60:.1f} min")
    if FLAGS.bench_json:
        with open(FLAGS.bench_json, "w") as f:
            json.dump({"results": results, **extra}, f, indent=2, default=str)
