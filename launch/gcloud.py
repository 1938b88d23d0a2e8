"""The gcloud commands the TPU launcher runs, built as argv lists, and a runner that runs or prints them.

Nothing here talks to the network by itself: `make_runner(dry_run=True)` prints each command
instead of running it, and tests pass their own runner.
"""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from typing import Callable, TextIO

TARBALL = "gpt_jax-src.tar.gz"


def home(path: str) -> str:
    """A remote path under $HOME, double-quoted so that the remote shell expands $HOME."""
    return f'"$HOME/{path}"'


LOGS, SRC, VENV = "gpt_jax_logs", "gpt_jax", "gpt_jax_venv"
UV = home(".local/bin/uv")

# Queued-resource states (state.state) and TPU VM states (state), from the Cloud TPU API.
HEALTHY = frozenset({"ACTIVE", "READY"})
DEAD = frozenset({"FAILED", "SUSPENDING", "SUSPENDED", "PREEMPTED", "TERMINATED", "STOPPED",
                  "STOPPING", "HIDDEN"})


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""


Runner = Callable[[list[str]], Result]


def make_runner(dry_run: bool, out: TextIO | None = None) -> Runner:
    """Runs argv lists (stdout streamed and kept), or with dry_run prints them as shell lines."""

    def run(argv: list[str]) -> Result:
        if dry_run:
            print(shlex.join(argv), file=out or sys.stdout, flush=True)
            return Result(0)
        print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
        lines = []
        with subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:  # type: ignore[union-attr]
                print(line, end="", flush=True)  # streamed: `logs` follows the file live
                lines.append(line)
        return Result(proc.returncode, "".join(lines))

    return run


@dataclasses.dataclass(frozen=True)
class Target:
    """Which TPU: a TPU VM (node) or a queued resource whose single node has the same name."""

    name: str
    project: str
    zone: str
    queued: bool = False

    def where(self) -> list[str]:
        return [f"--project={self.project}", f"--zone={self.zone}"]


def create_cmd(t: Target, accelerator: str, runtime: str, tier: str,
               extra: list[str]) -> list[str]:
    """tier: on-demand | spot | preemptible | reserved."""
    tier_flags = [] if tier == "on-demand" else [f"--{tier}"]
    if t.queued:
        return (["gcloud", "compute", "tpus", "queued-resources", "create", t.name]
                + t.where() + [f"--accelerator-type={accelerator}",
                               f"--runtime-version={runtime}", f"--node-id={t.name}"]
                + tier_flags + extra)
    return (["gcloud", "compute", "tpus", "tpu-vm", "create", t.name] + t.where()
            + [f"--accelerator-type={accelerator}", f"--version={runtime}"] + tier_flags + extra)


def delete_cmd(t: Target) -> list[str]:
    if t.queued:  # --force also deletes the node the queued resource holds
        return (["gcloud", "compute", "tpus", "queued-resources", "delete", t.name] + t.where()
                + ["--force", "--quiet"])
    return ["gcloud", "compute", "tpus", "tpu-vm", "delete", t.name] + t.where() + ["--quiet"]


def describe_cmd(t: Target) -> list[str]:
    kind, field = ("queued-resources", "state.state") if t.queued else ("tpu-vm", "state")
    return (["gcloud", "compute", "tpus", kind, "describe", t.name] + t.where()
            + [f"--format=value({field})"])


def ssh_cmd(t: Target, worker: str, command: str) -> list[str]:
    return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", t.name] + t.where()
            + [f"--worker={worker}", f"--command={command}"])


def scp_cmd(t: Target, local: str, remote: str) -> list[str]:
    return (["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{t.name}:{remote}"]
            + t.where() + ["--worker=all"])


def write_probe_cmds(workdir: str, local_file: str) -> list[list[str]]:
    """Copy a small file into the workdir and remove it again: fails if it is not writable."""
    probe = f"{workdir}/.gpt_jax_write_probe"
    return [["gcloud", "storage", "cp", local_file, probe], ["gcloud", "storage", "rm", probe]]


def install_script(pip_spec: str | None, python: str) -> str:
    """Remote shell: unpack the shipped source (or use pip_spec) into a Python `python` venv."""
    target = shlex.quote(pip_spec) if pip_spec else f"-e {home(SRC + '[tpu]')}"
    steps = []
    if not pip_spec:
        steps += [f"rm -rf {home(SRC)}", f"mkdir -p {home(SRC)}",
                  f"tar -xzf {home(TARBALL)} -C {home(SRC)}"]
    steps += [
        "(python3 -m pip install -q --user uv || curl -LsSf https://astral.sh/uv/install.sh | sh)",
        f"{UV} venv -q --allow-existing --python {shlex.quote(python)} {home(VENV)}",
        f"{UV} pip install -q --python {home(VENV + '/bin/python')} {target}",
        f"{home(VENV + '/bin/python')} -c 'import jax, gpt_jax; print(\"jax\", jax.__version__)'",
    ]
    return "set -e; " + " && ".join(steps)


def train_script(workdir: str, train_args: list[str], env: dict[str, str]) -> str:
    """Remote shell: start `gpt-jax train` in the background, log to a file, record pid + exit.

    JAX_PLATFORMS is unset so that JAX finds the TPU; each worker appends to its own
    ~/gpt_jax_logs/train.log; the exit status lands in train.exit when the run ends.
    """
    pid, log, status = home(f"{LOGS}/train.pid"), home(f"{LOGS}/train.log"), home(f"{LOGS}/train.exit")
    sets = "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())
    argv = " ".join(shlex.quote(a) for a in [f"--workdir={workdir}", *train_args])
    inner = (f"cd {home(SRC)} 2>/dev/null || cd \"$HOME\" || exit 1; "
             f"env -u JAX_PLATFORMS {sets}{home(VENV + '/bin/gpt-jax')} train {argv} & "
             f"echo $! > {pid}; wait $!; echo $? > {status}")
    return (f"mkdir -p {home(LOGS)} && "
            f"if [ -f {pid} ] && kill -0 \"$(cat {pid})\" 2>/dev/null; then "
            f"echo 'gpt-jax train is already running' >&2; exit 1; fi; "
            f"rm -f {status}; nohup bash -c {shlex.quote(inner)} >> {log} 2>&1 < /dev/null &")


def stop_script() -> str:
    """SIGTERM to gpt-jax train on a worker: it saves a checkpoint and exits."""
    pid = home(f"{LOGS}/train.pid")
    return f"if [ -f {pid} ]; then kill -TERM \"$(cat {pid})\" 2>/dev/null || true; fi"


def logs_script(lines: int, follow: bool) -> str:
    return f"tail -n {int(lines)}{' -F' if follow else ''} {home(LOGS + '/train.log')}"


def exit_status_script() -> str:
    return f"cat {home(LOGS + '/train.exit')} 2>/dev/null || echo running"
