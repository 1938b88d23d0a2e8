"""Known Cloud TPU accelerator types and the checks run on launcher input before any gcloud call.

Each accelerator type maps to its default runtime (software) version, its chip count and the
number of TPU VMs (hosts, i.e. `--worker=all` targets and JAX processes) in the slice.
Runtime versions follow https://cloud.google.com/tpu/docs/runtimes (checked 2026-11-22):
v6e -> v2-alpha-tpuv6e, v5p -> v2-alpha-tpuv5, v5e -> v2-alpha-tpuv5-lite, v4 -> tpu-ubuntu2204-base.
"""

from __future__ import annotations

import dataclasses
import re

RUNTIME_BY_GENERATION = {
    "v4": "tpu-ubuntu2204-base",
    "v5litepod": "v2-alpha-tpuv5-lite",
    "v5p": "v2-alpha-tpuv5",
    "v6e": "v2-alpha-tpuv6e",
}
# Chips per TPU VM in multi-host slices (single-host slices hold all their chips on one VM).
_CHIPS_PER_HOST = {"v4": 4, "v5litepod": 4, "v5p": 4, "v6e": 4}
# Largest chip count that still fits on one VM.
_SINGLE_HOST_MAX_CHIPS = {"v4": 4, "v5litepod": 8, "v5p": 4, "v6e": 8}
# v4 and v5p names count TensorCores (2 per chip); v5e and v6e names count chips.
_CORES_PER_CHIP = {"v4": 2, "v5litepod": 1, "v5p": 2, "v6e": 1}
_SIZES = {
    "v4": (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
    "v5litepod": (1, 4, 8, 16, 32, 64, 128, 256),
    "v5p": (8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 12288),
    "v6e": (1, 4, 8, 16, 32, 64, 128, 256),
}
# Zones end in a letter (us-west4-a) or, for AI zones, a short name such as ai1a.
ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]([a-z0-9]{0,6}[a-z])?$")
PROJECT_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
GCS_RE = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[^\s'\"]*)?$")
CONFLICTING_TRAIN_FLAGS = ("--coordinator_address", "--process_id")


class LaunchError(ValueError):
    """Bad launcher input; the message names the value and what is allowed."""


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # e.g. v5litepod-8
    generation: str  # v4 | v5litepod | v5p | v6e
    chips: int
    hosts: int
    runtime_version: str

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


def _make(generation: str, size: int) -> Accelerator:
    chips = size // _CORES_PER_CHIP[generation]
    single = chips <= _SINGLE_HOST_MAX_CHIPS[generation]
    hosts = 1 if single else chips // _CHIPS_PER_HOST[generation]
    return Accelerator(f"{generation}-{size}", generation, chips, hosts,
                       RUNTIME_BY_GENERATION[generation])


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a for gen, sizes in _SIZES.items() for a in (_make(gen, s) for s in sizes)}
# v5e is also written v5e-N in many docs; gcloud wants v5litepod-N.
ALIASES = {f"v5e-{s}": f"v5litepod-{s}" for s in _SIZES["v5litepod"]}


def accelerator(name: str) -> Accelerator:
    """The table entry for `name` (v5e-N is accepted for v5litepod-N), or a LaunchError."""
    key = ALIASES.get(name, name)
    if key not in ACCELERATORS:
        gens = ", ".join(f"{g}-{{{','.join(map(str, s))}}}" for g, s in _SIZES.items())
        raise LaunchError(f"unknown accelerator type {name!r}; known types: {gens}")
    return ACCELERATORS[key]


def check_project(project: str | None) -> str:
    if not project:
        raise LaunchError("missing --project (or set CLOUDSDK_CORE_PROJECT): the Google Cloud "
                          "project ID that owns the TPU, e.g. --project=my-project")
    if not PROJECT_RE.match(project):
        raise LaunchError(f"--project={project!r} is not a project ID (6-30 chars: lowercase "
                          "letters, digits, hyphens; starts with a letter)")
    return project


def check_zone(zone: str | None) -> str:
    if not zone:
        raise LaunchError("missing --zone (or set CLOUDSDK_COMPUTE_ZONE): the zone of the TPU, "
                          "e.g. --zone=us-west4-a for v5e or --zone=us-central2-b for v4")
    if not ZONE_RE.match(zone):
        raise LaunchError(f"--zone={zone!r} is not a zone name like us-central2-b "
                          "(or an AI zone like us-central1-ai1a)")
    return zone


def check_name(name: str | None) -> str:
    if not name or not NAME_RE.match(name):
        raise LaunchError(f"--name={name!r} must be 1-63 lowercase letters, digits or hyphens, "
                          "starting with a letter")
    return name


def check_workdir(workdir: str | None) -> str:
    if not workdir:
        raise LaunchError("missing --workdir: a gs://bucket/path every worker can write")
    if not GCS_RE.match(workdir):
        raise LaunchError(f"--workdir={workdir!r} must be a gs://bucket/path: every worker must "
                          "write the same checkpoints, and a preempted VM's disk is lost")
    return workdir.rstrip("/")


def check_train_args(train_args: list[str], acc: Accelerator) -> None:
    """Reject multi-process flags that contradict the slice (TPU VMs discover it themselves)."""
    for arg in train_args:
        flag, _, value = arg.partition("=")
        if flag in CONFLICTING_TRAIN_FLAGS:
            raise LaunchError(f"{flag} is set by the TPU runtime on TPU VMs; remove {arg!r}")
        if flag == "--num_processes" and value != str(acc.hosts):
            raise LaunchError(f"process count mismatch: {arg} but {acc.name} has {acc.hosts} "
                              f"host(s); drop the flag (TPU VMs discover it)")


def check_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise LaunchError(f"--env {pair!r} must look like NAME=value")
        env[key] = value
    return env
