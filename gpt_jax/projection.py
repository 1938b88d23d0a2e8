"""A TPU train step's range: the roofline bound and a realistic estimate calibrated on
published measured runs.

From a compiled step's counted work (`aot.project`: matmul FLOPs with every loop trip, splash
attention's FLOPs, HBM bytes) and the collectives its mesh implies:

    compute = (matmul FLOPs + splash FLOPs / min(1, head_dim / MXU side)) / (peak x matmul)
    memory  = HBM bytes / (HBM bandwidth x hbm)
    local   = max(compute, memory) + overlap x min(compute, memory)
    step    = max(local, ici) + exposed x min(local, ici),  ici = collective bytes / ICI bandwidth

The bound is the step with every factor 1, splash at full fill and nothing exposed: FLOPs at
peak, HBM traffic at full bandwidth and the collectives, each hidden under the longest. The
realistic estimate uses `EFFICIENCY`. Its matmul, hbm and overlap factors are fitted (least
squares on log tokens/s) to the published runs of `configs/published/` by `gpt-jax aot
--published`, which compiles each and prints the projection beside the measurement
(BENCHMARKS.md has the table). `exposed` is a prior: the published runs here spend at most
about 3% of a step on collectives (Llama-3.1-8B: 105 ms of 3.44 s), too little to fit it. An
hbm factor above 1 would say the counted bytes overstate what a measured program moves.

Plain Python on an `aot.project` record and the model config, so a cached record gets the same
estimate as a fresh one.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from typing import Any, NamedTuple

import numpy as np

from gpt_jax import hardware

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# The `aot.project` record fields `terms` reads.
TERM_FIELDS = ("train_compute_s", "train_hbm_s", "peak_tflops_per_chip",
               "train_flops_added_back_per_chip", "device_kind", "mesh", "batch_size", "seq_len",
               "params", "dtype", "param_dtype", "chips")
# The published measured runs (configs/published/<name>.py: the config, its source, what it
# states and assumes, and MEASURED_TOKENS_PER_S_PER_CHIP per slice).
PUBLISHED = ("tpu_50usd_163m", "modded_nanogpt_jax", "maxtext_llama3_8b")


@dataclasses.dataclass(frozen=True)
class Efficiency:
    matmul: float  # fraction of bf16 peak the MXU reaches (matmuls, and splash at full fill)
    hbm: float  # counted HBM bytes per second, as a fraction of the HBM bandwidth
    overlap: float  # fraction of the shorter of compute and HBM traffic that is not hidden
    exposed: float  # fraction of the shorter of local work and collectives not hidden


EXPOSED = 0.25  # the prior `aot_search.estimate` also uses
# The fit of `gpt-jax aot --published` (2026-12-03; its runs and terms are in
# docs/aot_search/published.json, which tests/test_projection.py refits)
EFFICIENCY = Efficiency(matmul=0.63, hbm=0.96, overlap=0.0, exposed=EXPOSED)


def collective_bytes(n_params: int, n_layer: int, n_embd: int, mesh: tuple[int, int, int],
                     tokens_per_chip: float, compute_bytes: int, param_bytes: int) -> float:
    """Bytes one chip sends over ICI in a train step: fsdp all-gathers each layer's weights in
    the forward and backward passes and reduce-scatters the gradients; data all-reduces the
    gradients; tensor all-reduces two [tokens, D] activations per layer each way."""
    d, f, t = mesh
    sent = 0.0
    if f > 1:
        sent += 3 * n_params * compute_bytes / t * (f - 1) / f
    if d > 1:
        sent += 2 * n_params * param_bytes / (f * t) * (d - 1) / d
    if t > 1:
        sent += 4 * n_layer * tokens_per_chip * n_embd * compute_bytes * 2 * (t - 1) / t
    return sent


def overlapped(a_s, b_s, exposed):
    """Two kinds of work run at once: the longer, plus `exposed` of the shorter (neither hides
    the other completely). Floats or numpy arrays (the fit evaluates a grid at once)."""
    return np.maximum(a_s, b_s) + exposed * np.minimum(a_s, b_s)


def terms(record: dict[str, Any], model_cfg) -> dict[str, float] | None:
    """Seconds per op class at full efficiency from a compiled train step's `aot.project`
    record: matmul, splash (at full MXU fill, and at the fill its head_dim gives), hbm and ici;
    None without the roofline's terms (not compiled, or no peak)."""
    compute_s, hbm_s = record.get("train_compute_s"), record.get("train_hbm_s")
    peak = (record.get("peak_tflops_per_chip") or 0.0) * 1e12
    if compute_s is None or hbm_s is None or not peak:
        return None
    gen = hardware.tpu(record["device_kind"])
    splash_s = (record.get("train_flops_added_back_per_chip") or 0.0) / peak
    fill = min(1.0, model_cfg.head_dim / gen.mxu_dim)
    mesh = tuple(int(x) for x in record["mesh"].split("x"))
    tokens = record["batch_size"] * record["seq_len"]
    sent = collective_bytes(record["params"], model_cfg.n_layer, model_cfg.n_embd, mesh,
                            tokens / (mesh[0] * mesh[1]), _DTYPE_BYTES[record["dtype"]],
                            _DTYPE_BYTES[record["param_dtype"]])
    return {"matmul": compute_s - splash_s, "splash_full": splash_s, "splash": splash_s / fill,
            "hbm": hbm_s, "ici": sent / gen.ici_bytes_per_s}


def step_seconds(t: dict[str, float], eff: Efficiency) -> float:
    """The realistic step of `terms` at `eff` (its fields may be numpy arrays)."""
    local = overlapped((t["matmul"] + t["splash"]) / eff.matmul, t["hbm"] / eff.hbm,
                       eff.overlap)
    step = overlapped(local, t["ici"], eff.exposed)
    return float(step) if np.ndim(step) == 0 else step


def bound_seconds(t: dict[str, float]) -> float:
    """The bound of `terms`: FLOPs at peak (splash at full fill), HBM traffic at full bandwidth
    and the collectives, each hidden under the longest."""
    return max(t["matmul"] + t["splash_full"], t["hbm"], t["ici"])


def realistic(record: dict[str, Any], model_cfg,
              eff: Efficiency = EFFICIENCY) -> dict[str, float]:
    """`train_bound_*` and `train_realistic_*` fields for a compiled train step's record: each
    step, MFU (PaLM's count, as `train_projected_mfu`) and tokens/s per chip; {} without the
    roofline's terms."""
    t = terms(record, model_cfg)
    if t is None:
        return {}
    tokens = record["batch_size"] * record["seq_len"] / record["chips"]
    peak = record["peak_tflops_per_chip"] * 1e12
    out = {}
    for name, step in (("bound", bound_seconds(t)), ("realistic", step_seconds(t, eff))):
        out.update({f"train_{name}_step_s": step,
                    f"train_{name}_mfu": record["train_model_flops_per_chip"] / (step * peak),
                    f"train_{name}_tokens_per_s_per_chip": tokens / step})
    limits = {"compute": (t["matmul"] + t["splash"]) / eff.matmul, "HBM": t["hbm"] / eff.hbm,
              "ICI": t["ici"]}
    out["train_realistic_limit"] = max(limits, key=limits.get)
    return out


# ------------------------------------------------------------------------------ calibration

class PublishedRun(NamedTuple):
    run: str  # configs/published/<name>.py, as the docs name it
    file: str  # that file where it is installed
    topology: str
    measured: float  # tokens/s per chip


def published_runs() -> list[PublishedRun]:
    """Every published run, one per measured slice."""
    runs = []
    for name in PUBLISHED:
        module = importlib.import_module(f"configs.published.{name}")
        runs += [PublishedRun(f"configs/published/{name}.py", module.__file__, topology, measured)
                 for topology, measured in module.MEASURED_TOKENS_PER_S_PER_CHIP.items()]
    return runs


def fit(points: list[tuple[dict[str, float], float, float]],
        exposed: float = EXPOSED) -> Efficiency:
    """The matmul (0.30-1.00), hbm (0.50-2.00) and overlap (0-1) factors, on a 0.01 grid, that
    minimise the squared log error of the estimated tokens/s per chip over `points`: (terms,
    tokens per step per chip, measured tokens/s per chip)."""
    m, h, o = np.meshgrid(np.round(np.arange(0.30, 1.0001, 0.01), 2),
                          np.round(np.arange(0.50, 2.0001, 0.01), 2),
                          np.round(np.arange(0.0, 1.0001, 0.01), 2), indexing="ij")
    grid = Efficiency(m, h, o, exposed)
    err = sum(np.log(tokens / step_seconds(t, grid) / measured) ** 2
              for t, tokens, measured in points)
    i = np.unravel_index(np.argmin(err), err.shape)
    return Efficiency(float(m[i]), float(h[i]), float(o[i]), exposed)


@dataclasses.dataclass
class Calibration:
    """One published run against its compiled projection."""
    run: str  # configs/published/<name>.py
    topology: str
    measured: float  # tokens/s per chip
    terms: dict[str, float]
    tokens: float  # per step per chip
    record: dict[str, Any] = dataclasses.field(default_factory=dict)  # what `terms` read

    def estimate(self, eff: Efficiency) -> float:
        return self.tokens / step_seconds(self.terms, eff)

    def bound(self) -> float:
        return self.tokens / bound_seconds(self.terms)


def calibrate(runs: list[Calibration]) -> tuple[Efficiency, list[float]]:
    """The fit over every run, and each run's estimate by the fit over the others (leave one
    out: how far a run the factors never saw lands)."""
    def points(rs):
        return [(r.terms, r.tokens, r.measured) for r in rs]
    held_out = [runs[i].estimate(fit(points(runs[:i] + runs[i + 1:])))
                for i in range(len(runs))] if len(runs) > 1 else []
    return fit(points(runs)), held_out


def describe(eff: Efficiency) -> str:
    return (f"matmul {eff.matmul:.2f}, hbm {eff.hbm:.2f}, overlap {eff.overlap:.2f}, exposed "
            f"{eff.exposed:.2f}")


def calibration_table(runs: list[Calibration], fitted: Efficiency,
                      held_out: list[float]) -> str:
    """Markdown: each run's measured tokens/s per chip beside the bound, the estimate at
    EFFICIENCY and at the fit without that run; then the fit, and whether EFFICIENCY is it."""
    lines = ["| run | slice | measured tokens/s/chip | bound | bound / measured | estimate | "
             "estimate / measured | fit without it / measured |", "|---" * 8 + "|"]
    for r, out in zip(runs, held_out or [math.nan] * len(runs)):
        bound, est = r.bound(), r.estimate(EFFICIENCY)
        lines.append(f"| {r.run} | {r.topology} | {r.measured:,.0f} | {bound:,.0f} | "
                     f"{bound / r.measured:.2f} | {est:,.0f} | {est / r.measured:.2f} | "
                     f"{out / r.measured:.2f} |")
    rms = math.sqrt(sum(math.log(r.estimate(fitted) / r.measured) ** 2 for r in runs)
                    / len(runs))
    lines += ["", f"fit: {describe(fitted)} (exposed is a prior); RMS log error {100 * rms:.1f}%",
              f"EFFICIENCY (gpt_jax/projection.py): {describe(EFFICIENCY)}"
              + ("" if fitted == EFFICIENCY else " -- not the fit: update it")]
    return "\n".join(lines)
