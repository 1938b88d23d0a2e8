"""`gpt-jax bench prepare`: tokenization throughput of `prepare` on a synthetic English-like corpus.

For each tokenizer (gpt2_bpe, sentencepiece, byte), corpus size (JSONL) and worker count, a
fresh process prepares a store (each worker encodes with one thread), --bench_repeats times,
interleaved; the run of median wall time gives MB/s per wall-second and per CPU-second,
tokens/s, the read / encode / write split and peak memory (PSS of the process and its
workers). From 1 vs 2 workers on the largest size come the speed-up S, the serial fraction
f = 2/S - 1 (Amdahl; at least 1/96) and the projected time for 40 GB on a 96-vCPU host:
40,000 MB x (1-worker seconds per MB) / min(96, 1/f). A verified copy of a remote store
(memory:// standing in for gs://) is timed, and one large file (the largest corpus repeated)
shows that memory stays bounded.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time

import fsspec
from absl import flags

from gpt_jax.bench import synthetic
from gpt_jax.data import store as store_lib
from gpt_jax.data import tokenizers as tok_lib
from gpt_jax.data.config import DataConfig
from gpt_jax.data.prepare import prepare

flags.DEFINE_string("bench_sizes_mb", "16,64", "Synthetic JSONL corpus sizes in MB.")
flags.DEFINE_string("bench_tokenizers", "gpt2_bpe,sentencepiece,byte", "Tokenizers to time.")
flags.DEFINE_string("bench_workers", "1,2", "Worker counts to time.")
flags.DEFINE_string("bench_bpe_dir", "", "GPT-2's vocab.json + merges.txt ('': a 50,257-token "
                    "byte-level BPE trained here on the corpus with Hugging Face tokenizers).")
flags.DEFINE_integer("bench_spm_vocab", 32000, "SentencePiece vocabulary trained here.")
flags.DEFINE_integer("bench_big_mb", 1024, "One file of this size for the memory check (0: off).")
flags.DEFINE_integer("bench_repeats", 3, "Runs per measurement; the median is reported.")
flags.DEFINE_string("bench_dir", "", "Where corpora and tokenizers are kept ('': a temp dir).")
FLAGS = flags.FLAGS
PROJECT_MB, PROJECT_CPUS = 40_000, 96


def _config(corpus: str) -> DataConfig:
    return DataConfig(source="jsonl", paths=corpus, shard_mb=4.0)


def _train_bpe(corpus: str, out: str) -> str:
    """A GPT-2-sized byte-level BPE (vocab.json + merges.txt) trained on `corpus`."""
    # Hugging Face tokenizers: only this optional step needs it (bench_bpe_dir skips it).
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=50257, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator((json.loads(line)["text"] for line in open(corpus)), trainer)
    os.makedirs(out, exist_ok=True)
    tok.model.save(out)
    return out


def _tokenizer(kind: str, corpus: str, work: str):
    if kind == "byte":
        return tok_lib.ByteTokenizer()
    if kind == "sentencepiece":
        texts = (json.loads(line)["text"] for line in open(corpus))
        return tok_lib.train_sentencepiece(texts, FLAGS.bench_spm_vocab)
    bpe_dir = FLAGS.bench_bpe_dir or _train_bpe(corpus, os.path.join(work, "bpe"))
    return tok_lib.load_dir(os.path.expanduser(bpe_dir))


def _pss_mb(pid: int) -> float:
    """Proportional set size: resident memory with pages shared after a fork split fairly."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration):
        return 0.0


def _tree_pss_mb(root: int) -> float:
    """Memory of `root` and its direct children (the prepare workers), in MB."""
    total = _pss_mb(root)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            if ppid == root:
                total += _pss_mb(int(entry))
    return total


class PeakMemory:
    """Samples the summed PSS of this process and its children every 0.2 s (Linux /proc):
    getrusage's maxrss would count what a forked or exec'd process inherited, and summed RSS
    would count pages a fork shares once per process."""

    def __init__(self):
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.peak = max(self.peak, _tree_pss_mb(os.getpid()))
            if self._stop.wait(0.2):
                return

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def child(spec: dict) -> dict:
    """One measurement, in a fresh process."""
    tok = tok_lib.load_tokenizer(spec["store"])
    before = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    start = time.perf_counter()
    with PeakMemory() as memory:
        stats = prepare(_config(spec["corpus"]), spec["store"], tok, spec["workers"], threads=1)
    wall = time.perf_counter() - start
    after = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
    mb = stats["num_bytes"] / 1e6
    split = sum(stats["seconds"].values())
    return {**{k: spec[k] for k in ("tokenizer", "size_mb", "workers")}, "wall_s": wall,
            "cpu_s": cpu, "mb_per_s": mb / wall, "mb_per_cpu_s": mb / cpu,
            "tokens_per_s": stats["num_tokens"] / wall,
            **{f"{k}_pct": 100 * v / split for k, v in stats["seconds"].items()},
            "peak_memory_mb": memory.peak}


def _measure(spec: dict, tok) -> dict:
    spec = dict(spec, store=tempfile.mkdtemp(prefix="store-", dir=spec["work"]))
    tok.save(tok_lib.tokenizer_dir(spec["store"]))
    out = subprocess.run([sys.executable, "-c", "import json, sys; from gpt_jax.bench.prepare "
                          "import child; print(json.dumps(child(json.loads(sys.argv[1]))))",
                          json.dumps(spec)], capture_output=True, text=True, check=True)
    subprocess.run(["rm", "-rf", spec["store"]], check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def copy_speed(corpus: str, work: str) -> dict:
    """MB/s of the verified copy a host makes of a remote store (memory:// stands in for gs://)."""
    tok, remote = tok_lib.ByteTokenizer(), "memory://bench/store"
    tok.save(tok_lib.tokenizer_dir(remote))
    prepare(_config(corpus), remote, tok, num_workers=1)
    os.environ["GPT_JAX_CACHE"] = tempfile.mkdtemp(prefix="cache-", dir=work)
    start = time.perf_counter()
    tokens = store_lib.open_store(remote, tok).tokens("train")
    seconds = time.perf_counter() - start
    fsspec.filesystem("memory").rm("/bench", recursive=True)
    megabytes = len(tokens) * tokens.dtype.itemsize / 1e6
    return {"store_mb": megabytes, "copy_s": seconds, "copy_mb_per_s": megabytes / seconds}


def _median(runs: list[dict]) -> dict:
    """The run of median wall time (its other numbers belong to that same run)."""
    return sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]


def _row(r: dict) -> str:
    return (f"| {r['tokenizer']} | {r['size_mb']:.0f} | {r['workers']} | {r['mb_per_s']:.2f} | "
            f"{r['mb_per_cpu_s']:.2f} | {r['tokens_per_s'] / 1e6:.2f} | "
            f"{r['read_pct']:.0f} / {r['encode_pct']:.0f} / {r['write_pct']:.0f} | "
            f"{r['peak_memory_mb']:.0f} |")


def run(argv: list[str]) -> None:
    del argv
    work = FLAGS.bench_dir or tempfile.mkdtemp(prefix="gpt_jax_bench_prepare_")
    os.makedirs(work, exist_ok=True)
    sizes = [float(s) for s in FLAGS.bench_sizes_mb.split(",")]
    corpora = {}
    for size in sizes:
        corpora[size] = os.path.join(work, f"synthetic-{size:g}mb.jsonl")
        if not os.path.exists(corpora[size]):
            synthetic.write_jsonl(corpora[size], size)
    print("| tokenizer | MB | workers | MB/s | MB per CPU-s | M tokens/s | read / encode / "
          "write % | peak memory (PSS) MB |\n|---|---|---|---|---|---|---|---|", flush=True)
    medians = []
    for kind in FLAGS.bench_tokenizers.split(","):
        tok = _tokenizer(kind, corpora[sizes[0]], work)
        specs = [{"tokenizer": kind, "size_mb": size, "workers": int(w), "corpus": corpora[size],
                  "work": work} for size in sizes for w in FLAGS.bench_workers.split(",")]
        runs = [[] for _ in specs]
        for _ in range(FLAGS.bench_repeats):  # interleaved, so drifting load hits all alike
            for spec, out in zip(specs, runs):
                out.append(_measure(spec, tok))
        for out in runs:
            medians.append(_median(out))
            print(_row(medians[-1]), flush=True)
    for kind in FLAGS.bench_tokenizers.split(","):
        by = {r["workers"]: r for r in medians
              if r["tokenizer"] == kind and r["size_mb"] == sizes[-1]}
        if 1 in by and 2 in by:
            speedup = by[1]["wall_s"] / by[2]["wall_s"]
            serial = min(1.0, max(2 / speedup - 1, 1 / PROJECT_CPUS))
            minutes = PROJECT_MB * (by[1]["wall_s"] / sizes[-1]) / min(PROJECT_CPUS,
                                                                       1 / serial) / 60
            print(f"{kind}: 2 workers {speedup:.2f}x one; serial fraction {serial:.3f}; 40 GB "
                  f"on {PROJECT_CPUS} vCPUs: {minutes:.1f} min (projected)")
    c = copy_speed(corpora[sizes[-1]], work)
    print(f"verified copy of a remote store to local disk: {c['store_mb']:.0f} MB in "
          f"{c['copy_s']:.2f} s ({c['copy_mb_per_s']:.0f} MB/s, sha256 included)", flush=True)
    if FLAGS.bench_big_mb:
        big = os.path.join(work, f"one-{FLAGS.bench_big_mb}mb.jsonl")
        if not os.path.exists(big):
            with open(big, "wb") as out, open(corpora[sizes[-1]], "rb") as src:
                data = src.read()
                for _ in range(max(1, round(FLAGS.bench_big_mb / sizes[-1]))):
                    out.write(data)
        r = _measure({"tokenizer": "byte", "size_mb": os.path.getsize(big) / 1e6, "workers": 2,
                      "corpus": big, "work": work}, tok_lib.ByteTokenizer())
        print("one large file:\n" + _row(r))
