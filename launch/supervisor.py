"""Keep one training run alive on a preemptible TPU: poll, re-create, re-install, re-run.

The training command is the same every time; `gpt-jax train` resumes from the last checkpoint
in its gs:// workdir, so a re-run after preemption continues where the last save left off.
All gcloud calls go through a runner (see gcloud.make_runner), so tests can script the states.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Callable

from launch import gcloud

Sleep = Callable[[float], None]


@dataclasses.dataclass(frozen=True)
class Plan:
    target: gcloud.Target
    create: list[str]
    install: list[list[str]]
    train: list[str]
    max_restarts: int = 20
    poll_seconds: float = 60.0
    backoff_seconds: float = 60.0
    delete_when_done: bool = False


def log(msg: str) -> None:
    print(f"[supervise {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def state(t: gcloud.Target, run: gcloud.Runner) -> str:
    """The TPU's state, e.g. ACTIVE / READY / SUSPENDED / PREEMPTED; "" if it does not exist."""
    result = run(gcloud.describe_cmd(t))
    return result.stdout.strip().upper() if result.returncode == 0 else ""


def wait_healthy(t: gcloud.Target, run: gcloud.Runner, sleep: Sleep, dry_run: bool = False,
                 poll_seconds: float = 30.0, timeout_seconds: float = 6 * 3600) -> bool:
    """Poll until ACTIVE/READY (True) or a dead state / timeout (False)."""
    waited = 0.0
    while waited <= timeout_seconds:
        s = state(t, run)
        if s in gcloud.HEALTHY or dry_run:
            return True
        if s in gcloud.DEAD:
            log(f"{t.name} is {s}")
            return False
        log(f"{t.name} is {s or 'not found'}; waiting")
        sleep(poll_seconds)
        waited += poll_seconds
    return False


def exit_status(plan: Plan, run: gcloud.Runner) -> str:
    """Worker 0's train exit code as text, 'running', or '' when the worker cannot be reached."""
    result = run(gcloud.ssh_cmd(plan.target, "0", gcloud.exit_status_script()))
    lines = result.stdout.strip().splitlines() if result.returncode == 0 else []
    return lines[-1].strip() if lines else ""


def start(plan: Plan, run: gcloud.Runner) -> bool:
    """Install (if planned) and launch training on every worker; False if a step failed."""
    for cmd in plan.install + [plan.train]:
        if run(cmd).returncode != 0:
            return False
    return True


def supervise(plan: Plan, run: gcloud.Runner, sleep: Sleep) -> int:
    """Loop until training exits 0 on a healthy TPU (0) or restarts run out (1)."""
    restarts, launched, finished = 0, False, False

    def restart(reason: str, recreate: bool) -> bool:
        nonlocal restarts, launched, finished
        restarts += 1
        launched = finished = False
        if restarts > plan.max_restarts:
            log(f"{reason}; giving up after {plan.max_restarts} restarts")
            return False
        delay = min(plan.backoff_seconds * 2 ** (restarts - 1), 3600.0)
        log(f"{reason}; restart {restarts}/{plan.max_restarts} in {delay:.0f}s")
        if recreate:
            run(gcloud.delete_cmd(plan.target))
        sleep(delay)
        return True

    while True:
        s = state(plan.target, run)
        if s == "":
            log(f"{plan.target.name} not found; creating it")
            if run(plan.create).returncode != 0:
                if not restart("create failed", False):
                    return 1
                continue
        if s in gcloud.DEAD:
            if not restart(f"{plan.target.name} is {s}", True):
                return 1
            continue
        if s in gcloud.HEALTHY:
            if not launched:
                launched = start(plan, run)
                if not launched and not restart("install/train launch failed", False):
                    return 1
            else:
                code = exit_status(plan, run)
                if code == "0" and finished:  # still healthy one poll later: really done
                    log("training finished")
                    if plan.delete_when_done:
                        run(gcloud.delete_cmd(plan.target))
                    return 0
                finished = code == "0"
                if code not in ("", "0", "running") and not restart(
                        f"gpt-jax train exited with {code}", False):
                    return 1
        sleep(plan.poll_seconds)


def print_plan(plan: Plan, run: gcloud.Runner) -> None:
    """--dry-run: the commands of a first start and of one preemption recovery."""
    print("# poll the state; if missing, create:")
    for cmd in [gcloud.describe_cmd(plan.target), plan.create]:
        run(cmd)
    print("# when ACTIVE/READY, install and start training on all workers:")
    for cmd in plan.install + [plan.train]:
        run(cmd)
    print("# every poll: worker 0's exit status (0 twice in a row on a healthy TPU = done):")
    run(gcloud.ssh_cmd(plan.target, "0", gcloud.exit_status_script()))
    print("# on PREEMPTED/SUSPENDED/FAILED...: delete, back off, then create/install/train again:")
    run(gcloud.delete_cmd(plan.target))
