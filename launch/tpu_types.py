"""Known Cloud TPU accelerator types and the checks run on launcher input before any gcloud call.

Each accelerator type maps to its default runtime (software) version, its chip count and the
number of TPU VMs (hosts, i.e. `--worker=all` targets and JAX processes) in the slice, all from
the hardware table (`gpt_jax.hardware`).
"""

from __future__ import annotations

import dataclasses
import re

from gpt_jax.errors import LaunchError
from gpt_jax.hardware import TPUS, TpuGeneration

# Zones end in a letter (us-west4-a) or, for AI zones, a short name such as ai1a.
ZONE_RE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]([a-z0-9]{0,6}[a-z])?$")
PROJECT_RE = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
GCS_RE = re.compile(r"^gs://[a-z0-9][a-z0-9._-]{1,220}[a-z0-9](/[^\s'\"]*)?$")
CONFLICTING_TRAIN_FLAGS = ("--coordinator_address", "--process_id")


@dataclasses.dataclass(frozen=True)
class Accelerator:
    name: str  # gcloud's accelerator type, e.g. v5litepod-8
    generation: str  # gcloud's prefix: v4 | v5litepod | v5p | v6e
    chips: int
    hosts: int
    runtime_version: str

    @property
    def multi_host(self) -> bool:
        return self.hosts > 1


def _make(t: TpuGeneration, size: int) -> Accelerator:
    chips = size // t.cores_per_chip
    hosts = 1 if chips <= t.single_host_max_chips else chips // t.chips_per_host
    return Accelerator(f"{t.gcloud}-{size}", t.gcloud, chips, hosts, t.runtime_version)


ACCELERATORS: dict[str, Accelerator] = {
    a.name: a for t in TPUS.values() for a in (_make(t, s) for s in t.sizes)}
# Our slice names (v5e-8, as `gpt-jax aot` writes them) for gcloud's (v5litepod-8).
ALIASES = {f"{t.name}-{s}": f"{t.gcloud}-{s}" for t in TPUS.values() if t.name != t.gcloud
           for s in t.sizes}


def accelerator(name: str) -> Accelerator:
    """The table entry for `name` (v5e-N is accepted for v5litepod-N), or a LaunchError."""
    key = ALIASES.get(name, name)
    if key not in ACCELERATORS:
        gens = ", ".join(f"{t.gcloud}-{{{','.join(map(str, t.sizes))}}}" for t in TPUS.values())
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
