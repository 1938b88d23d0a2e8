"""The gcloud commands the TPU launcher runs, built as argv lists, and a runner that runs or prints them.

Nothing here talks to the network by itself: `make_runner(dry_run=True)` prints each command
instead of running it, and tests pass their own runner.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
import subprocess
import sys
import threading
from typing import Callable, TextIO

# jax[tpu] is pinned on the workers (--jax overrides): a recovery installs the same stack.
JAX_TPU_VERSION = "0.10.2"


def home(path: str) -> str:
    """A remote path under $HOME, double-quoted so that the remote shell expands $HOME."""
    return f'"$HOME/{path}"'


# On each worker: ~/gpt_jax_releases/<version>/{src,venv,.installed}, one per installed
# version (never changed once installed), and ~/gpt_jax_current -> the one `train` starts.
LOGS, RELEASES, CURRENT = "gpt_jax_logs", "gpt_jax_releases", "gpt_jax_current"
UV = home(".local/bin/uv")
LAUNCH_MARK = "=== gpt_jax launch"  # written to train.log before each start
PROBE_MARK = "gpt_jax_probe"

# Queued-resource states (state.state) and TPU VM states (state), from the Cloud TPU API.
HEALTHY = frozenset({"ACTIVE", "READY"})
DEAD = frozenset({"FAILED", "SUSPENDING", "SUSPENDED", "PREEMPTED", "TERMINATED", "STOPPED",
                  "STOPPING", "HIDDEN"})
# gcloud's words for "this resource / object does not exist" (anything else is an error).
_MISSING = re.compile(r"NOT_FOUND|\b404\b|was not found|matched no objects|No URLs matched")


@dataclasses.dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str = ""
    stderr: str = ""

    def missing(self) -> bool:
        """A failed call whose error says the resource or object does not exist."""
        return self.returncode != 0 and bool(_MISSING.search(self.stderr))


Runner = Callable[[list[str]], Result]


def _tee(stream, sink: TextIO, kept: list[str]) -> None:
    for line in stream:
        print(line, end="", file=sink, flush=True)
        kept.append(line)


def make_runner(dry_run: bool, out: TextIO | None = None,
                timeout_seconds: float | None = None) -> Runner:
    """Runs argv lists (stdout and stderr streamed and kept), or with dry_run prints them.

    A command still running after timeout_seconds is killed and returns 124, its stderr saying so.
    """

    def run(argv: list[str]) -> Result:
        if dry_run:
            print(shlex.join(argv), file=out or sys.stdout, flush=True)
            return Result(0)
        print(f"+ {shlex.join(argv)}", file=sys.stderr, flush=True)
        lines, errors, expired = [], [], []
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) as proc:

            def expire() -> None:
                expired.append(True)
                proc.kill()

            timer = threading.Timer(timeout_seconds, expire) if timeout_seconds else None
            if timer:
                timer.start()
            pump = threading.Thread(target=_tee, args=(proc.stderr, sys.stderr, errors))
            pump.start()
            _tee(proc.stdout, sys.stdout, lines)  # streamed: `logs` follows the file live
            pump.join()
            proc.wait()
            if timer:
                timer.cancel()
        code = proc.returncode
        if expired:
            errors.append(f"timed out after {timeout_seconds:.0f}s\n")
            code = 124
        return Result(code, "".join(lines), "".join(errors))

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
    """--quiet: no prompts, so an unattended first run creates its SSH key without a passphrase."""
    return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", t.name] + t.where()
            + [f"--worker={worker}", f"--command={command}", "--quiet"])


def scp_cmd(t: Target, local: str, remote: str) -> list[str]:
    return (["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{t.name}:{remote}"]
            + t.where() + ["--worker=all", "--quiet"])


def write_probe_cmds(workdir: str, local_file: str) -> list[list[str]]:
    """Copy a small file into the workdir and remove it again: fails if it is not writable."""
    probe = f"{workdir}/.gpt_jax_write_probe"
    return [["gcloud", "storage", "cp", local_file, probe], ["gcloud", "storage", "rm", probe]]


def read_status_cmd(workdir: str) -> list[str]:
    """The run's status.json (written by `gpt-jax train`, see gpt_jax/run_status.py)."""
    return ["gcloud", "storage", "cat", f"{workdir}/status.json"]


def tarball_name(version: str) -> str:
    return f"gpt_jax-src-{version}.tar.gz"


def install_script(version: str, pip_spec: str | None, python: str,
                   jax_version: str = JAX_TPU_VERSION) -> str:
    """Remote shell: install into ~/gpt_jax_releases/<version> unless it is there, then point
    ~/gpt_jax_current at it. An installed release is never modified or removed while a process
    runs from it, so a reinstall under a live run is harmless. Keeps the 3 newest releases.
    """
    rel = home(f"{RELEASES}/{version}")
    target = shlex.quote(pip_spec) if pip_spec else f"-e {home(f'{RELEASES}/{version}/src[tpu]')}"
    unpack = ([] if pip_spec else [f"mkdir -p {rel}/src",
                                   f"tar -xzf {home(tarball_name(version))} -C {rel}/src"])
    fresh = "; ".join([f"rm -rf {rel}"] + unpack + [  # a half-done install of this version
        f"{{ [ -x {UV} ] || python3 -m pip install -q --user uv || "
        "curl -LsSf https://astral.sh/uv/install.sh | sh; }",
        f"{UV} venv -q --python {shlex.quote(python)} {rel}/venv",
        f"{UV} pip install -q --python {rel}/venv/bin/python {target} "
        f"{shlex.quote(f'jax[tpu]=={jax_version}')}",
        f"touch {rel}/.installed"])
    current, tmp_link = home(CURRENT), home(CURRENT + ".new")
    prune = (f"find {home(RELEASES)} -mindepth 1 -maxdepth 1 -type d -printf '%T@ %p\\n' | "
             "sort -rn | tail -n +4 | cut -d' ' -f2- | while read -r d; do "
             f"[ \"$(readlink -f \"$d\")\" = \"$(readlink -f {current})\" ] || "
             # [/]: the pattern must not match grep's own command line
             "grep -qsa \"[/]${d#/}/\" /proc/[0-9]*/cmdline || rm -rf \"$d\"; done")
    return (f"set -e; if [ -f {rel}/.installed ]; then echo 'gpt_jax {version} is installed'; "
            f"else {fresh}; fi; "
            f"{rel}/venv/bin/python -c 'import jax, gpt_jax; print(\"jax\", jax.__version__)'; "
            f"ln -sfn {rel} {tmp_link} && mv -Tf {tmp_link} {current}; "
            f"rm -f {home(tarball_name(version))}; {prune}")


def _alive(pid: str) -> str:
    """Shell test: the pid file names a live gpt-jax process (a reused pid number does not)."""
    return (f"{{ p=$(cat {pid} 2>/dev/null) && [ -n \"$p\" ] && kill -0 \"$p\" 2>/dev/null && "
            f"grep -qa gpt-jax \"/proc/$p/cmdline\" 2>/dev/null; }}")


def train_script(workdir: str, train_args: list[str], env: dict[str, str]) -> str:
    """Remote shell: start `gpt-jax train` in the background, log to a file, record pid + exit.

    JAX_PLATFORMS is unset so that JAX finds the TPU; each worker appends to its own
    ~/gpt_jax_logs/train.log (a launch mark first); the exit status lands in train.exit.
    The release is resolved once, so a later install does not change a running process.
    """
    pid, log, status = home(f"{LOGS}/train.pid"), home(f"{LOGS}/train.log"), home(f"{LOGS}/train.exit")
    sets = "".join(f"{k}={shlex.quote(v)} " for k, v in env.items())
    argv = " ".join(shlex.quote(a) for a in [f"--workdir={workdir}", *train_args])
    inner = (f"R=$(readlink -f {home(CURRENT)}); "
             "cd \"$R/src\" 2>/dev/null || cd \"$HOME\" || exit 1; "
             f"env -u JAX_PLATFORMS {sets}\"$R/venv/bin/gpt-jax\" train {argv} & "
             f"echo $! > {pid}; wait $!; echo $? > {status}")
    return (f"mkdir -p {home(LOGS)} && "
            f"if {_alive(pid)}; then echo 'gpt-jax train is already running' >&2; exit 1; fi; "
            f"rm -f {status} {pid}; echo \"{LAUNCH_MARK} $(date -u +%FT%TZ)\" >> {log}; "
            f"nohup bash -c {shlex.quote(inner)} >> {log} 2>&1 < /dev/null &")


def probe_script() -> str:
    """Remote shell, one line per worker: `gpt_jax_probe alive|exited:CODE|gone STEP|-`.

    STEP is the last `step N/M` line logged since the last launch (only worker 0 logs steps).
    """
    pid, log = home(f"{LOGS}/train.pid"), home(f"{LOGS}/train.log")
    status = home(f"{LOGS}/train.exit")
    step = (f"awk '/^{LAUNCH_MARK}/{{s=\"\"}} /^step [0-9]+\\//{{split($2, a, \"/\"); s=a[1]}} "
            f"END{{print (s == \"\" ? \"-\" : s)}}' {log} 2>/dev/null")
    return (f"if {_alive(pid)}; then s=alive; elif [ -f {status} ]; then "
            f"s=\"exited:$(cat {status})\"; else s=gone; fi; "
            f"echo \"{PROBE_MARK} $s $({step} || echo -)\"")


def cleanup_script(grace_seconds: int = 30) -> str:
    """Remote shell: end any gpt-jax train of ours (TERM, then KILL after the grace) and remove
    the pid and exit files, so that the next `train` starts clean on this worker."""
    pid, status = home(f"{LOGS}/train.pid"), home(f"{LOGS}/train.exit")
    ours = f"\"$HOME/{RELEASES}/[^ ]*/bin/gpt-jax train\""
    return (f"if {_alive(pid)}; then kill -TERM \"$p\"; "
            f"for _ in $(seq {int(grace_seconds)}); do kill -0 \"$p\" 2>/dev/null || break; "
            f"sleep 1; done; kill -KILL \"$p\" 2>/dev/null || true; fi; "
            f"pkill -KILL -u \"$(id -u)\" -f {ours} || true; rm -f {pid} {status}")


def stop_script() -> str:
    """SIGTERM to gpt-jax train on a worker: it saves a checkpoint and exits."""
    pid = home(f"{LOGS}/train.pid")
    return f"if {_alive(pid)}; then kill -TERM \"$p\"; fi"


def logs_script(lines: int, follow: bool) -> str:
    return f"tail -n {int(lines)}{' -F' if follow else ''} {home(LOGS + '/train.log')}"
