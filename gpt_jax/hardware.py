"""One table of accelerator facts: per TPU generation its names, chips, memory, bandwidths,
peak FLOP/s, runtime and libtpu flags; the GPUs' peaks for MFU. Plain Python (no JAX).

Every other module reads these facts from here: MFU logging (`metrics`), `gpt-jax aot` and its
search (slices, HBM, ICI), the launch kit (gcloud names, hosts, runtime versions) and the
libtpu overlap flags (`tpu_flags`). Figures are the vendors' published ones (dense bf16 peak
per chip; HBM and ICI bandwidth per chip, one direction), as of the dates in the comments.
"""

from __future__ import annotations

import dataclasses

GiB = 2**30

# The libtpu / XLA flags MaxText's dense-model recipes set for collective-compute overlap
# (async collective fusion: fsdp's all-gathers and reduce-scatters under the matmuls; the
# data-parallel all-reduce optimisation; async all-gather / collective-permute). Each name was
# checked against libtpu 0.0.42.1 (libtpu aborts on an unknown flag).
_OVERLAP = (
    "--xla_tpu_enable_data_parallel_all_reduce_opt=true",
    "--xla_tpu_data_parallel_opt_different_sized_ops=true",
    "--xla_tpu_enable_async_collective_fusion=true",
    "--xla_tpu_enable_async_collective_fusion_fuse_all_gather=true",
    "--xla_tpu_enable_async_collective_fusion_multiple_steps=true",
    "--xla_tpu_overlap_compute_collective_tc=true",
    "--xla_enable_async_all_gather=true",
    "--xla_enable_async_collective_permute=true",
)


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    name: str  # ours, and the prefix of our slice names: v5e (v5e-8)
    gcloud: str  # the accelerator-type prefix gcloud takes: v5litepod (v5litepod-8)
    aliases: tuple[str, ...]  # other names users write for it
    device_kinds: tuple[str, ...]  # what jax.devices()[0].device_kind reports
    libtpu: str  # libtpu's topology prefix: "v5e" in "v5e:2x4"
    cores_per_chip: int  # what the number in a slice name counts (v4, v5p: TensorCores)
    chip_config: str  # "megacore": one JAX device per chip; "default": one per core
    peak_flops: float  # dense bf16 FLOP/s per chip
    hbm_bytes: int  # per chip
    hbm_bytes_per_s: float  # per chip
    ici_bytes_per_s: float  # per chip, all links, one direction
    mxu_dim: int  # the systolic array's side: a matmul contracting fewer fills it partly
    sizes: tuple[int, ...]  # the slice sizes gcloud offers (in the name's unit)
    chips_per_host: int  # chips per TPU VM in a multi-host slice
    single_host_max_chips: int  # the largest slice on one VM
    runtime_version: str  # https://cloud.google.com/tpu/docs/runtimes (checked 2026-11-22)
    aot_shapes: tuple[str, ...]  # chip grids `gpt-jax aot` compiles for (libtpu topologies)
    overlap_flags: tuple[str, ...]

    def slice_name(self, chips: int) -> str:
        return f"{self.name}-{chips * self.cores_per_chip}"


TPUS: dict[str, TpuGeneration] = {t.name: t for t in (
    TpuGeneration("v4", "v4", (), ("TPU v4",), "v4", 2, "megacore", 275e12, 32 * GiB, 1228e9,
                  270e9, 128, (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096), 4, 4,
                  "tpu-ubuntu2204-base", ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4"),
                  _OVERLAP),
    TpuGeneration("v5e", "v5litepod", ("v5litepod", "v5lite"), ("TPU v5 lite", "TPU v5e"),
                  "v5e", 1, "default", 197e12, 16 * GiB, 819e9, 200e9, 128,
                  (1, 4, 8, 16, 32, 64, 128, 256), 4, 8, "v2-alpha-tpuv5-lite",
                  ("1x1", "2x2", "2x4", "4x4", "4x8", "8x8", "8x16", "16x16"), _OVERLAP),
    TpuGeneration("v5p", "v5p", ("v5",), ("TPU v5p", "TPU v5"), "v5", 2, "megacore", 459e12,
                  95 * GiB, 2765e9, 600e9, 128,
                  (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 12288), 4, 4,
                  "v2-alpha-tpuv5", ("2x2x1", "2x2x2", "2x2x4", "2x4x4", "4x4x4"), _OVERLAP),
    # v6e (Trillium): MaxText's dense-model scoped VMEM limit (96 MiB) as well.
    TpuGeneration("v6e", "v6e", ("v6", "trillium"), ("TPU v6 lite", "TPU v6e"), "v6e", 1,
                  "default", 918e12, 32 * GiB, 1640e9, 400e9, 256, (1, 4, 8, 16, 32, 64, 128, 256),
                  4, 8, "v2-alpha-tpuv6e", ("1x1", "2x2", "2x4", "4x4", "8x8", "16x16"),
                  _OVERLAP + ("--xla_tpu_scoped_vmem_limit_kib=98304",)),
)}

# Dense bf16 peak FLOP/s per GPU, from the vendors' spec sheets (SXM parts, no sparsity).
GPU_PEAK_FLOPS = {"NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12}


def tpu(name: str) -> TpuGeneration:
    """The generation of 'v5e', 'v5litepod-8', 'v5e:2x4', 'v5p-8', 'v4-32', 'TPU v5 lite', ...;
    ValueError naming the known ones."""
    base = name.strip()
    for t in TPUS.values():
        if base in t.device_kinds:
            return t
    base = base.split("-")[0].split(":")[0].lower()
    for t in TPUS.values():
        if base in (t.name, t.gcloud, t.libtpu) + t.aliases:
            return t
    raise ValueError(f"unknown TPU generation {name!r}; one of: {', '.join(TPUS)}")


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this kind (a TPU chip, a GPU); None where
    unknown (CPUs: MFU is n/a). The longest matching name wins ("TPU v5 lite" over "TPU v5")."""
    peaks = {kind: t.peak_flops for t in TPUS.values() for kind in t.device_kinds}
    peaks.update(GPU_PEAK_FLOPS)
    for prefix in sorted(peaks, key=len, reverse=True):
        if device_kind.startswith(prefix):
            return peaks[prefix]
    return None
