"""`gpt-jax aot --search`: find the fastest config that fits a TPU slice before launching.

1. Enumerate candidates: (data, fsdp, tensor) meshes of the slice's chips (tensor a divisor of
   n_head, at most 4), global batches (exactly --tokens_per_step / block_size, else powers of
   two from the chip count up to the config's batch), every remat policy, scan_layers on/off,
   attention (xla; splash where the kernel fits), loss_chunks 0 / 8.
2. Prune with pure-Python estimates: per-chip memory (params + grads + AdamW state over fsdp x
   tensor, activations per token per layer for the remat policy, logits unless chunked)
   against HBM, and a roofline step time FLOPs / peak + bytes / HBM bandwidth, overlapped
   with collectives / ICI bandwidth. Keep the best few per (mesh, batch), in that order.
3. Compile the best ones (`aot.project`, each in its own spawned process, up to --workers at
   once) until --top of them fit, the list ends, or --budget_s is spent; results are cached
   under $GPT_JAX_CACHE/aot (default ~/.cache/gpt_jax/aot), keyed by the resolved config,
   the slice, the libtpu and jax versions and the overlap flags.

The estimates are rough (memory scaled by MEMORY_CALIBRATION, XLA's measured excess);
they only order and prune. The table's memory and fit are the compiler's; its steps are the
compiled step's roofline (the bound) and realistic estimate (`projection.realistic`: per op
class efficiencies calibrated on published runs), and the compiled rows rank by the latter.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import hashlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import sys
import time
from collections.abc import Callable
from typing import Any

from gpt_jax import aot, hardware, projection, tpu_flags
from gpt_jax.attention import resolve_impl
from gpt_jax.config import Config, to_json, typed
from gpt_jax.data.files import cache_root
from gpt_jax.flops import count_params, flops_per_token
from gpt_jax.model import REMAT_POLICIES, ModelConfig
from gpt_jax.processes import die_with_parent

GiB = aot.GiB
CACHE_VERSION = 3  # 2: the summed roofline, records carry the HLO profile; 3: every loop counted
MAX_TENSOR = 4
LOSS_CHUNKS = (0, 8)
# Fraction of a layer's forward matmul FLOPs recomputed in the backward pass.
REMAT_RECOMPUTE = {"none": 0.0, "save_dots": 0.0, "save_dots_no_batch": 0.15,
                   "save_qkv_out_proj": 0.7, "save_qkv_proj": 0.8, "save_out_proj": 0.9,
                   "full": 1.0}
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# XLA's compiled memory over the analytic sum above: 1.28-1.40 on 124M/774M/1558M GPT-2 rows
# (v5e-8, v4-8; BENCHMARKS.md), so the first candidates compiled are the ones likely to fit.
MEMORY_CALIBRATION = 1.35


@dataclasses.dataclass(frozen=True)
class Candidate:
    mesh: tuple[int, int, int]
    batch: int
    remat: str
    scan: bool
    attention: str
    loss_chunks: int

    @property
    def mesh_str(self) -> str:
        return "x".join(map(str, self.mesh))

    def overrides(self) -> dict[str, Any]:
        """`--config.x=v` keys of this candidate."""
        d, f, t = self.mesh
        return {"mesh.data": d, "mesh.fsdp": f, "mesh.tensor": t,
                "train.global_batch_size": self.batch, "train.microbatches": 1,
                "model.remat_policy": self.remat, "model.scan_layers": self.scan,
                "model.attention_impl": self.attention, "model.loss_chunks": self.loss_chunks}

    def apply(self, config) -> Config:
        return typed(config).replace(self.overrides())

    def label(self) -> str:
        return (f"mesh {self.mesh_str} batch {self.batch} remat {self.remat}"
                + (" scan" if self.scan else "") + f" {self.attention}"
                + (f" loss_chunks {self.loss_chunks}" if self.loss_chunks else ""))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def enumerate_candidates(config, tpu: aot.TpuSlice, tokens_per_step: int | None = None,
                         max_tensor: int = MAX_TENSOR) -> list[Candidate]:
    """Every candidate of the search space for `config` on `tpu` (before pruning)."""
    config = typed(config)
    m, chips = config.model, tpu.chips
    T = m.block_size
    meshes = [(d, f, chips // (d * f)) for d in _divisors(chips) for f in _divisors(chips // d)]
    meshes = [ms for ms in meshes if ms[2] <= max_tensor and m.n_head % ms[2] == 0]
    if tokens_per_step:
        if tokens_per_step % T:
            raise aot.AotError(f"--tokens_per_step={tokens_per_step} is not a multiple of "
                               f"block_size {T}")
        batches = [tokens_per_step // T]
    else:
        cap = max(config.train.global_batch_size, chips)
        batches = [2 ** k for k in range(int(math.log2(chips)) if chips > 1 else 0, 31)
                   if chips <= 2 ** k <= cap]
    head_dim = m.n_embd // m.n_head
    attentions = ["xla"] + (["splash"] if resolve_impl("auto", "tpu", head_dim, T) == "splash"
                            else [])
    chunks = [c for c in LOSS_CHUNKS if c <= 1 or T % c == 0]
    return [Candidate(ms, b, r, s, a, c) for ms in meshes for b in batches
            if b % (ms[0] * ms[1]) == 0 for r in REMAT_POLICIES for s in (False, True)
            for a in attentions for c in chunks]


@dataclasses.dataclass
class Estimate:
    memory_bytes: float
    step_s: float
    flops_per_chip: float
    tokens_per_s_per_chip: float
    mfu: float


def _counts(cfg: ModelConfig) -> tuple[int, float]:
    """(params, training FLOPs per token): shape-only tracing of the model, so done once."""
    return count_params(cfg), flops_per_token(cfg, cfg.block_size)


def estimate(config, tpu: aot.TpuSlice, c: Candidate,
             counts: tuple[int, float] | None = None) -> Estimate:
    """Pure-Python per-chip memory and roofline step time of candidate `c` (no compile)."""
    config = typed(config)
    cfg = config.model
    gen = hardware.tpu(tpu.name)
    n_params, per_token = counts or _counts(cfg)
    d, f, t = c.mesh
    chips = d * f * t
    pb = _DTYPE_BYTES[cfg.param_dtype]
    b = _DTYPE_BYTES[cfg.dtype]
    mu = _DTYPE_BYTES.get(config.optim.mu_dtype or cfg.param_dtype, pb)
    D, F, H, L, T = cfg.n_embd, cfg.mlp_dim, cfg.n_head, cfg.n_layer, cfg.block_size
    V = cfg.padded_vocab_size
    state = n_params * (pb + pb + mu + pb) / (f * t)  # params, grads, mu, nu
    gathered = 2 * n_params / L * b / t if f > 1 else 0.0  # a layer's all-gathered weights
    tokens = c.batch * T / (d * f)  # per chip
    # Activations kept per token per layer (bytes): D-wide tensors are whole on each tensor
    # shard, qkv / MLP / heads split; xla attention keeps its [H, T] probabilities.
    probs = H * T * b / t if c.attention == "xla" else H * 4 / t
    every = (7 * D * b + (4 * D + 2 * F) * b / t + probs)  # the whole layer
    saved = {"none": every, "full": D * b,
             "save_dots": D * b + (4 * D + F) * b / t + (H * T * 4 / t if c.attention == "xla"
                                                          else 0),
             "save_dots_no_batch": D * b + (4 * D + F) * b / t,
             "save_qkv_proj": D * b + 3 * D * b / t, "save_out_proj": 2 * D * b,
             "save_qkv_out_proj": D * b + 4 * D * b / t}[c.remat]
    if c.scan and c.remat == "none":
        saved *= 2  # scanned without remat: about twice the temporaries (docs/performance.md)
    working = every if c.remat != "none" else 0.0  # one layer recomputed in the backward
    acts = tokens * (L * saved + working)
    logits = tokens * V * 4 * 1.5 / (c.loss_chunks if c.loss_chunks > 1 else 1)
    memory = MEMORY_CALIBRATION * (state + gathered + acts + logits)
    # Time: FLOPs (with recomputation; splash skips the masked half), HBM traffic, collectives.
    model_flops = per_token * c.batch * T / chips
    flops = model_flops + (6 * n_params * c.batch * T / chips / 3) * REMAT_RECOMPUTE[c.remat]
    if c.loss_chunks > 1:  # the chunked loss recomputes the LM head's forward
        flops += 2 * D * V * c.batch * T / chips
    peak = gen.peak_flops
    # ... and recomputed activations are written and read again in the backward pass.
    recomputed = tokens * L * every * REMAT_RECOMPUTE[c.remat]
    hbm_traffic = 3 * state + 2 * (acts + recomputed + logits) + 3 * n_params * b / t
    comm = projection.collective_bytes(n_params, L, D, c.mesh, tokens, b, pb)
    # FLOPs and HBM traffic add up, as in the roofline (`aot.cost_report`); collectives
    # overlap with them but for a part (`projection.overlapped`).
    local, comm_s = flops / peak + hbm_traffic / tpu.hbm_bytes_per_s, comm / gen.ici_bytes_per_s
    step = projection.overlapped(local, comm_s, projection.EXPOSED)
    return Estimate(memory, step, flops, c.batch * T / step / chips,
                    model_flops / (step * peak))


def prune(config, tpu: aot.TpuSlice, candidates: list[Candidate], per_shape: int = 2,
          margin: float = 0.95) -> tuple[list[tuple[Candidate, Estimate]],
                                           list[tuple[Candidate, Estimate]]]:
    """(kept, rejected): candidates whose estimate fits `margin` x HBM, the best `per_shape`
    per (mesh, batch), ranked by estimated tokens/s/chip; rejected: the rest that do not fit."""
    config = typed(config)
    counts = _counts(config.model)
    scored = [(c, estimate(config, tpu, c, counts)) for c in candidates]
    fitting = [(c, e) for c, e in scored if e.memory_bytes <= margin * tpu.hbm_bytes]
    over = sorted((x for x in scored if x[1].memory_bytes > margin * tpu.hbm_bytes),
                  key=lambda x: x[1].memory_bytes)
    # Ties: scanned first (compiles in ~30 s; an unscanned GPT-2 takes 5-15 minutes).
    fitting.sort(key=lambda x: (-x[1].tokens_per_s_per_chip, not x[0].scan, x[1].memory_bytes))
    seen: dict[tuple, int] = {}
    kept, variants = [], set()
    for c, e in fitting:
        shape, variant = (c.mesh, c.batch), (c.mesh, c.batch, c.remat, c.attention, c.loss_chunks)
        if variant in variants:  # the same but for scan_layers: estimated alike
            continue
        if seen.get(shape, 0) < per_shape:
            variants.add(variant)
            seen[shape] = seen.get(shape, 0) + 1
            kept.append((c, e))
    return kept, over


# ---------------------------------------------------------------------------------- cache

def versions() -> dict[str, str]:
    out = {}
    for pkg in ("jax", "libtpu"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "none"
    return out


def cache_key(config, topology: str, overlap: bool) -> str:
    flags = tpu_flags.merge(topology, os.environ.get(tpu_flags.ENV, ""),
                            on=overlap and tpu_flags.enabled())
    blob = json.dumps({"v": CACHE_VERSION, "config": to_json(config), "topology": topology,
                       "versions": versions(), "libtpu_flags": flags}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_dir() -> str:
    return os.path.join(cache_root(), "aot")


def cache_get(key: str) -> dict | None:
    try:
        with open(os.path.join(cache_dir(), f"{key}.json")) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def cache_put(key: str, record: dict) -> None:
    os.makedirs(cache_dir(), exist_ok=True)
    path = os.path.join(cache_dir(), f"{key}.json")
    with open(path + ".tmp", "w") as fh:
        json.dump(record, fh)
    os.replace(path + ".tmp", path)


# ------------------------------------------------------------------------------- compiles

def compile_record(config_json: str, topology: str, overlap: bool) -> dict:
    """One candidate's `aot.project` record (train step only); an over-HBM compile is a
    record with train_fits False and the overshoot XLA reported. Runs in a fresh process."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    config = Config.from_dict(json.loads(config_json))
    t0 = time.perf_counter()
    try:
        record = aot.project(config, topology, decode=False, overlap_flags=overlap)
    except aot.OutOfMemory as e:
        return {"train_fits": False, "train_total_bytes": e.need_bytes,
                "train_hbm_bytes": aot.get_slice(topology).hbm_bytes, "error": str(e),
                "wall_s": time.perf_counter() - t0}
    except aot.AotError as e:
        return {"error": str(e), "wall_s": time.perf_counter() - t0}
    record["wall_s"] = time.perf_counter() - t0
    return record


def cached_compile(config, topology: str, overlap: bool = True) -> tuple[dict, bool]:
    """(`compile_record` of `config` on `topology`, whether it came from the cache): compiled in
    a fresh process (libtpu takes its flags once per process) and cached as the search's are."""
    key = cache_key(config, topology, overlap)
    hit = cache_get(key)
    if hit is not None:
        return hit, True
    with _spawn_pool(1) as pool:
        record = pool.submit(compile_record, to_json(config), topology, overlap).result()
    _keep(key, record)
    return record, False


def _keep(key: str, record: dict) -> None:
    """Cache a compile or a refusal over HBM; not a crash (the next search tries again)."""
    if "error" not in record or record.get("train_fits") is False:
        cache_put(key, record)


def _spawn_pool(workers: int) -> cf.Executor:
    return cf.ProcessPoolExecutor(max_workers=workers, max_tasks_per_child=1,
                                  mp_context=multiprocessing.get_context("spawn"),
                                  initializer=die_with_parent, initargs=(os.getpid(),))


@dataclasses.dataclass
class Row:
    candidate: Candidate
    estimate: Estimate
    record: dict | None = None
    cached: bool = False

    @property
    def fits(self) -> bool | None:
        return None if self.record is None or "error" in self.record and \
            "train_fits" not in self.record else bool(self.record.get("train_fits"))

    @property
    def tokens_per_s_per_chip(self) -> float | None:
        """The realistic estimate's (`projection.realistic`), which ranks the compiled rows."""
        return (self.record or {}).get("train_realistic_tokens_per_s_per_chip")


def search(config, topology: str, *, tokens_per_step: int | None = None, top: int = 8,
           workers: int = 2, budget_s: float = 1200.0, overlap: bool = True,
           per_shape: int = 2, compile_fn: Callable | None = None,
           log: Callable[[str], None] = lambda s: print(s, file=sys.stderr)) -> list[Row]:
    """Enumerate, prune, compile (cached) the best until `top` fit; rows ranked, compiled
    fitting ones first by tokens/s/chip. AotError naming the smallest overshoot if none fits."""
    config = typed(config)
    tpu = aot.get_slice(topology)
    candidates = enumerate_candidates(config, tpu, tokens_per_step)
    if not candidates:
        raise aot.AotError(f"no candidate mesh/batch for {topology} ({tpu.chips} chips)")
    kept, over = prune(config, tpu, candidates, per_shape)
    log(f"aot search: {len(candidates)} candidates on {topology}, {len(kept)} fit the estimate "
        f"(best {per_shape} per mesh x batch); compiling until {top} fit, {workers} at once, "
        f"budget {budget_s:.0f} s")
    if not kept:
        c, e = over[0]
        raise aot.AotError(_nothing_fits(tpu, c, e.memory_bytes, "estimated"))
    rows = [Row(c, e) for c, e in kept]
    compile_fn = compile_fn or compile_record
    t0 = time.monotonic()
    max_compiles = 2 * top
    pending: dict[cf.Future, tuple[Row, str]] = {}
    todo = list(rows)
    pool = None
    done = 0

    def fitting() -> int:
        return sum(1 for r in rows if r.fits)

    def finish(row: Row, key: str, record: dict, cached: bool) -> None:
        nonlocal done
        row.record, row.cached = record, cached
        if not cached:
            _keep(key, record)
        record.update(projection.realistic(record, config.model))  # today's factors
        if not cached:
            done += 1
        elapsed = time.monotonic() - t0
        mem = record.get("train_total_bytes")
        log(f"  [{done + sum(r.cached for r in rows)}] {row.candidate.label()}: "
            + ("cached" if cached else f"compiled in {record.get('wall_s', 0):.0f} s")
            + (f", {mem / GiB:.2f} GiB" if mem else "")
            + (", fits" if row.fits else ", DOES NOT FIT" if row.fits is False else
               f", error: {record.get('error', '')[:120]}")
            + f"; elapsed {elapsed:.0f} s, budget left {max(0, budget_s - elapsed):.0f} s")

    try:
        while todo or pending:
            # Start what may still be needed: not enough fitting yet counting the running ones.
            while (todo and fitting() + len(pending) < top and done + len(pending) < max_compiles
                   and len(pending) < max(1, workers)):
                row = todo.pop(0)
                config_c = row.candidate.apply(config)
                key = cache_key(config_c, topology, overlap)
                hit = cache_get(key)
                if hit is not None:
                    finish(row, key, hit, True)
                    continue
                if time.monotonic() - t0 > budget_s:
                    todo = []
                    log(f"  budget of {budget_s:.0f} s spent: no more compiles")
                    break
                if compile_fn is not compile_record:  # in-process (tests)
                    finish(row, key, compile_fn(to_json(config_c), topology, overlap), False)
                    continue
                pool = pool or _spawn_pool(max(1, workers))
                pending[pool.submit(compile_fn, to_json(config_c), topology, overlap)] = (row, key)
            if not pending:
                if fitting() >= top or done >= max_compiles or not todo:
                    break
                continue
            finished, _ = cf.wait(pending, return_when=cf.FIRST_COMPLETED)
            for fut in finished:
                row, key = pending.pop(fut)
                try:
                    record = fut.result()
                except Exception as e:  # a crashed compile process (e.g. out of host memory)
                    record = {"error": f"{type(e).__name__}: {e}"}
                    if isinstance(e, cf.process.BrokenProcessPool) and pool is not None:
                        pool.shutdown(wait=False, cancel_futures=True)
                        pool = None  # a fresh pool for the compiles still to start
                finish(row, key, record, False)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    compiled = [r for r in rows if r.record is not None]
    if compiled and not any(r.fits for r in compiled):
        sized = [r for r in compiled if r.record.get("train_total_bytes")]
        untried = len(rows) - len(compiled)
        if sized and untried:
            r = min(sized, key=lambda r: r.record["train_total_bytes"])
            raise aot.AotError(
                f"none of the {len(compiled)} candidates compiled fits {tpu.name} (the smallest, "
                f"{r.candidate.label()}, needs {r.record['train_total_bytes'] / GiB:.1f} GiB of "
                f"{tpu.hbm_bytes / GiB:.0f}); {untried} more were not tried: raise --budget_s "
                f"(now {budget_s:.0f}) or --top (now {top})")
        if sized:
            r = min(sized, key=lambda r: r.record["train_total_bytes"])
            raise aot.AotError(_nothing_fits(tpu, r.candidate, r.record["train_total_bytes"],
                                             "compiled"))
    return rank(rows)


def rank(rows: list[Row]) -> list[Row]:
    def key(r: Row):
        if r.fits:
            return (0, -(r.tokens_per_s_per_chip or 0.0))
        if r.record is None:
            return (1, -r.estimate.tokens_per_s_per_chip)
        return (2, 0.0)
    return sorted(rows, key=key)


def _nothing_fits(tpu: aot.TpuSlice, c: Candidate, need: float, how: str) -> str:
    return (f"nothing fits {tpu.name} ({tpu.hbm_bytes / GiB:.0f} GiB per chip): the smallest, "
            f"{c.label()}, needs {need / GiB:.1f} GiB ({(need - tpu.hbm_bytes) / GiB:.1f} GiB "
            f"over, {how})")


# ---------------------------------------------------------------------------------- output

def table(rows: list[Row], tpu: aot.TpuSlice) -> str:
    head = ("| rank | mesh d x f x t | batch | remat | scan | attention | loss_chunks | "
            "memory / chip | fits? | bound: step, MFU | realistic: step, MFU | tokens/s/chip "
            "(realistic) | source |")
    lines = [head, "|" + "---|" * 13]
    for i, r in enumerate(rows, 1):
        c, e, rec = r.candidate, r.estimate, r.record or {}
        if rec.get("train_total_bytes") is not None:
            mem = f"{rec['train_total_bytes'] / GiB:.2f} of {tpu.hbm_bytes / GiB:.0f} GiB"
        else:
            mem = f"~{e.memory_bytes / GiB:.2f} of {tpu.hbm_bytes / GiB:.0f} GiB (est.)"
        fits = {True: "yes", False: "NO", None: "?"}[r.fits]
        if rec.get("train_realistic_step_s"):
            step = (f"{1e3 * rec['train_bound_step_s']:.1f} ms, "
                    f"{100 * rec['train_bound_mfu']:.1f}%")
            mfu = (f"{1e3 * rec['train_realistic_step_s']:.1f} ms, "
                   f"{100 * rec['train_realistic_mfu']:.1f}%")
            tps = f"{r.tokens_per_s_per_chip:,.0f}"
        else:
            step, mfu = f"~{1e3 * e.step_s:.1f} ms, ~{100 * e.mfu:.1f}% (est.)", "n/a"
            tps = f"~{e.tokens_per_s_per_chip:,.0f} (est.)"
        source = ("cached" if r.cached else "compiled" if r.record and "error" not in rec
                  else "error" if r.record else "estimate")
        lines.append(f"| {i} | {c.mesh_str} | {c.batch} | {c.remat} | {c.scan} | {c.attention}"
                     f" | {c.loss_chunks} | {mem} | {fits} | {step} | {mfu} | {tps} | "
                     f"{source} |")
    return "\n".join(lines)


def commands(winner: Row, config_arg: str, topology: str,
             user_overrides: tuple[str, ...] = ()) -> list[str]:
    """The `gpt-jax train` and `launch/tpu.py train` command lines of the winner: the config,
    the `--config.x=v` the search was given, then the winner's own. The launcher's names are
    shell variables (NAME, PROJECT, ZONE, BUCKET: docs/pretraining.md sets them)."""
    overrides = [*user_overrides,
                 *(f"--config.{k}={v}" for k, v in winner.candidate.overrides().items())]
    acc = topology.replace("v5e-", "v5litepod-")
    train = " ".join(["gpt-jax train", f"--config={config_arg}", *overrides])
    launch = " ".join(["python launch/tpu.py train --name=$NAME --project=$PROJECT --zone=$ZONE",
                       f"--accelerator={acc} --workdir=$BUCKET/runs/$NAME --",
                       f"--config={config_arg}", *overrides])
    return [train, launch]


def ranking_json(rows: list[Row], topology: str, extra: dict | None = None) -> dict:
    return {"topology": topology, **(extra or {}), "versions": versions(), "rows": [
        {"rank": i, **dataclasses.asdict(r.candidate), "estimate": dataclasses.asdict(r.estimate),
         "fits": r.fits, "cached": r.cached, "tokens_per_s_per_chip": r.tokens_per_s_per_chip,
         "record": r.record} for i, r in enumerate(rows, 1)]}
