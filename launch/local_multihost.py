"""Run N copies of a command on this machine as simulated hosts of one JAX job (127.0.0.1 only).

    python launch/local_multihost.py --num_processes=2 --devices_per_process=4 -- \
        gpt-jax train --config=configs/tiny.py --workdir=runs/mh

Each copy gets `--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=i`
appended (and the same values as GPT_JAX_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID), runs on
the CPU with `devices_per_process` simulated devices, and has its stdout and stderr lines printed
to ours, prefixed `[pI]`. The two streams stay apart, so a log line on stderr never splits a
line the program prints (a library that writes to stdout in pieces, as Gloo does, still can).
SIGTERM / SIGINT are forwarded to every copy. If one copy fails the others are stopped; the
exit code is the first failure's (0 when all succeed).
"""

from __future__ import annotations

import argparse
import functools
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

if __package__ in (None, ""):  # run as a script: the repository root holds gpt_jax
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from gpt_jax.errors import LaunchError  # noqa: E402  (stdlib only)
from gpt_jax.processes import die_with_parent  # noqa: E402  (stdlib only)

DISTRIBUTED_FLAGS = ("--coordinator_address", "--num_processes", "--process_id")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(num_processes: int, devices_per_process: int, command: list[str]) -> None:
    """Validate before starting anything: counts, flags we own, a writable --workdir."""
    if num_processes < 1:
        raise LaunchError(f"--num_processes={num_processes} must be >= 1")
    if devices_per_process < 1:
        raise LaunchError(f"--devices_per_process={devices_per_process} must be >= 1")
    if not command:
        raise LaunchError("no command given; put it after --, e.g. -- gpt-jax train ...")
    for arg in command:
        flag = arg.split("=", 1)[0]
        if flag in DISTRIBUTED_FLAGS:
            raise LaunchError(f"the command sets {arg!r}; local_multihost sets {flag} itself "
                             f"(here --num_processes={num_processes})")
        if flag == "--workdir" and "=" in arg:
            check_writable(arg.split("=", 1)[1])


def check_writable(workdir: str) -> None:
    if "://" in workdir:
        return  # remote paths are checked by the program that writes them
    try:
        os.makedirs(workdir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe"):
            pass
    except OSError as e:
        raise LaunchError(f"--workdir={workdir} is not writable: {e.strerror or e}") from None


def child_env(base: dict[str, str], devices: int, address: str, num: int, pid: int) -> dict:
    """CPU-only JAX with `devices` simulated devices, plus the multi-process settings."""
    flags = [f for f in base.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env = dict(base, JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES=str(devices),
               XLA_FLAGS=" ".join(flags), GPT_JAX_COORDINATOR=address,
               GPT_JAX_NUM_PROCESSES=str(num), GPT_JAX_PROCESS_ID=str(pid),
               PYTHONUNBUFFERED="1")
    return env


def _pump(source, sink, prefix: str, lock: threading.Lock) -> None:
    for line in source:
        with lock:
            sink.write(f"{prefix}{line}" if line.endswith("\n") else f"{prefix}{line}\n")
            sink.flush()


def start(command: list[str], num: int, devices: int, add_flags: bool) -> list[subprocess.Popen]:
    address = f"127.0.0.1:{free_port()}"
    procs = []
    for i in range(num):
        extra = ([f"--coordinator_address={address}", f"--num_processes={num}",
                  f"--process_id={i}"] if add_flags else [])
        procs.append(subprocess.Popen(
            command + extra, env=child_env(dict(os.environ), devices, address, num, i),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
            start_new_session=True,  # signals reach children only through us
            preexec_fn=functools.partial(die_with_parent, os.getpid())))  # none orphaned
    return procs


def _exit_code(rc: int) -> int:
    return 128 - rc if rc < 0 else rc  # killed by signal N -> 128+N, like a shell


def wait_all(procs: list[subprocess.Popen], grace_seconds: float) -> int:
    """Wait for every child; once one fails, SIGTERM the rest (then SIGKILL after the grace)."""
    first_failure, deadline = 0, None
    while [p.poll() for p in procs].count(None):  # poll every child, every time
        for p in procs:
            if p.returncode not in (None, 0) and not first_failure:
                first_failure = _exit_code(p.returncode)
                deadline = time.monotonic() + grace_seconds
                for q in procs:
                    if q.poll() is None:
                        q.send_signal(signal.SIGTERM)
        if deadline and time.monotonic() > deadline:
            for q in procs:
                if q.poll() is None:
                    q.kill()
        time.sleep(0.05)
    codes = [_exit_code(p.returncode) for p in procs]
    return first_failure or next((c for c in codes if c), 0)


def run(command: list[str], num_processes: int = 2, devices_per_process: int = 4,
        add_flags: bool = True, grace_seconds: float = 30.0) -> int:
    """Start, forward SIGTERM/SIGINT, prefix output, return the combined exit code."""
    check(num_processes, devices_per_process, command)
    procs = start(command, num_processes, devices_per_process, add_flags)

    def forward(signum, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    # Forwarding is in place before any child output is shown: whoever reads a child's first
    # line may signal us at once (a handler installed after the pumps start could miss it).
    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    lock = threading.Lock()
    pumps = [threading.Thread(target=_pump, args=(source, sink, f"[p{i}] ", lock), daemon=True)
             for i, p in enumerate(procs)
             for source, sink in ((p.stdout, sys.stdout), (p.stderr, sys.stderr))]
    try:
        for t in pumps:
            t.start()
        code = wait_all(procs, grace_seconds)
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
    for t in pumps:
        t.join(timeout=5)
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="launch/local_multihost.py",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument("--devices_per_process", type=int, default=4)
    parser.add_argument("--env_only", action="store_true",
                        help="pass the settings only as GPT_JAX_* variables, not as flags")
    parser.add_argument("--grace_seconds", type=float, default=30.0,
                        help="after one process fails, how long the others get to stop")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        return run(command, args.num_processes, args.devices_per_process,
                   not args.env_only, args.grace_seconds)
    except LaunchError as e:
        print(f"local_multihost.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
