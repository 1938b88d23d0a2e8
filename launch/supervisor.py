"""Keep one training run alive on a preemptible TPU: poll, re-create, re-install, re-run.

The training command is the same every time; `gpt-jax train` resumes from the last checkpoint
in its gs:// workdir, so a re-run continues where the last save left off. What happens is
decided from three things, never from an exit code alone:

- the TPU's state (`describe`): a NOT_FOUND error means "create it"; any other error (expired
  credentials, an API 5xx, a timeout) is retried with backoff and never leads to create/install;
- the workers (one `ssh --worker=all` probe): is gpt-jax train alive on each, and the last
  step worker 0 logged since the launch;
- `<workdir>/status.json`, written by `gpt-jax train` (gpt_jax/run_status.py): only
  `finished` ends supervision. `stopped` (SIGTERM, e.g. a maintenance event), `failed`, or a
  process that died without a record means: clean up every worker and start again.

All gcloud calls go through a runner (see gcloud.make_runner), so tests can script the states.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
import time
from typing import Callable

from launch import gcloud

Sleep = Callable[[float], None]
Clock = Callable[[], float]
MAX_DELAY = 3600.0


@dataclasses.dataclass(frozen=True)
class Plan:
    target: gcloud.Target
    create: list[str]
    install: list[list[str]]
    train: list[str]
    workdir: str = ""  # gs:// path holding status.json
    hosts: int = 1  # TPU VMs in the slice: one probe line each
    max_restarts: int = 20  # consecutive restarts without progress (and consecutive errors)
    poll_seconds: float = 60.0
    backoff_seconds: float = 60.0
    stuck_seconds: float = 3600.0  # no new step for this long = stuck (0: never)
    delete_when_done: bool = False


def log(msg: str) -> None:
    print(f"[supervise {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def first_line(text: str) -> str:
    lines = [x.strip() for x in text.strip().splitlines() if x.strip()]
    return lines[-1] if lines else "no output"


def describe(t: gcloud.Target, run: gcloud.Runner) -> tuple[str, str]:
    """("state", STATE) | ("missing", "") | ("error", message)."""
    result = run(gcloud.describe_cmd(t))
    if result.returncode == 0 and result.stdout.strip():
        return "state", result.stdout.strip().splitlines()[-1].strip().upper()
    if result.missing():
        return "missing", ""
    return "error", f"describe failed ({first_line(result.stderr or result.stdout)})"


def state(t: gcloud.Target, run: gcloud.Runner) -> str:
    """The TPU's state, e.g. ACTIVE / READY / SUSPENDED / PREEMPTED; "" if not found or unknown."""
    kind, value = describe(t, run)
    return value if kind == "state" else ""


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


@dataclasses.dataclass
class Probe:
    alive: int  # workers whose gpt-jax train runs
    states: list[str]  # one per worker: alive | exited:CODE | gone
    step: int | None  # the last step logged since the launch


def parse_probe(stdout: str, hosts: int) -> Probe | None:
    """The probe lines of all workers, or None if some worker did not answer."""
    rows = [line.split()[1:3] for line in stdout.splitlines()
            if line.startswith(gcloud.PROBE_MARK + " ") and len(line.split()) >= 3]
    if len(rows) != hosts:
        return None
    steps = [int(s) for _, s in rows if s.isdigit()]
    return Probe(sum(s == "alive" for s, _ in rows), [s for s, _ in rows],
                 max(steps) if steps else None)


class Supervisor:
    def __init__(self, plan: Plan, run: gcloud.Runner, sleep: Sleep, clock: Clock):
        self.plan, self.run, self.sleep, self.clock = plan, run, sleep, clock
        self.launched = self.installed = False
        self.no_progress = 0  # restarts in a row that made no progress
        self.errors = 0  # transient errors in a row
        self.best: int | None = None  # highest step any earlier launch reached
        self.reached: int | None = None  # highest step this launch reached
        self.last_step: int | None = None
        self.last_change = 0.0  # when this launch started or its step last changed
        self.partial = False  # last probe: some workers alive, some not
        self.tpu_state = ""

    # ---------------------------------------------------------------- helpers

    def give_up(self, why: str) -> int:
        t = self.plan.target
        kind = "queued resource" if t.queued else "TPU VM"
        if self.tpu_state:
            billing = " and billing" if self.tpu_state in gcloud.HEALTHY else ""
            tail = (f"the {kind} {t.name} still exists ({self.tpu_state}{billing}); "
                    f"delete it with: {shlex.join(gcloud.delete_cmd(t))}")
        else:
            tail = f"the {kind} {t.name} was not found, so nothing of it is billing"
        log(f"giving up: {why}; {tail}")
        return 1

    def backoff(self, n: int) -> float:
        return min(self.plan.backoff_seconds * 2 ** (n - 1), MAX_DELAY)

    def transient(self, why: str) -> bool:
        """A call failed in a way that may pass: wait and try again (never create/install)."""
        self.errors += 1
        if self.errors > self.plan.max_restarts:
            return False
        delay = self.backoff(self.errors)
        log(f"{why}; retrying in {delay:.0f}s ({self.errors}/{self.plan.max_restarts})")
        self.sleep(delay)
        return True

    def saw_step(self, step: int | None) -> None:
        if step is None:
            return
        if step != self.last_step:
            self.last_step, self.last_change = step, self.clock()
        self.reached = step if self.reached is None else max(self.reached, step)

    def restart(self, why: str, recreate: bool) -> bool:
        """Count the restart (a launch that passed the best step so far resets the count), back
        off, and arrange the next launch (delete first if the TPU must be re-created)."""
        if self.reached is not None and (self.best is None or self.reached > self.best):
            self.best, self.no_progress = self.reached, 0
            why += f" (progress: reached step {self.reached})"
        self.reached, self.last_step, self.launched, self.partial = None, None, False, False
        self.errors = 0
        self.no_progress += 1
        if self.no_progress > self.plan.max_restarts:
            self.give_up(f"{why}; {self.plan.max_restarts} restarts in a row made no progress")
            return False
        delay = self.backoff(self.no_progress)
        log(f"{why}; restart {self.no_progress}/{self.plan.max_restarts} in {delay:.0f}s")
        if recreate:
            self.run(gcloud.delete_cmd(self.plan.target))
            self.installed = False
        self.sleep(delay)
        return True

    # ---------------------------------------------------------------- steps

    def launch(self) -> str:
        """Clean every worker, install (once per TPU), start training: '' or why it failed."""
        t = self.plan.target
        if self.run(gcloud.ssh_cmd(t, "all", gcloud.cleanup_script())).returncode != 0:
            return "clean-up on the workers failed"
        if not self.installed:
            for cmd in self.plan.install:
                if self.run(cmd).returncode != 0:
                    return "install failed"
            self.installed = True
        if self.run(self.plan.train).returncode != 0:
            return "starting gpt-jax train failed"
        self.launched, self.partial = True, False
        self.last_step, self.reached, self.last_change = None, None, self.clock()
        return ""

    def read_status(self) -> tuple[bool, dict | None]:
        """(ok, status.json or None when there is none); ok is False on a read error."""
        result = self.run(gcloud.read_status_cmd(self.plan.workdir))
        if result.returncode != 0:
            return result.missing(), None
        try:
            record = json.loads(result.stdout)
        except ValueError:
            return True, None  # a torn or foreign file: no record
        return True, record if isinstance(record, dict) else None

    def check(self) -> str:
        """One poll of a launched run: 'running', 'finished', 'error: ...' or 'restart: ...'."""
        result = self.run(gcloud.ssh_cmd(self.plan.target, "all", gcloud.probe_script()))
        probe = parse_probe(result.stdout, self.plan.hosts) if result.returncode == 0 else None
        if probe is None:
            return f"error: probing the workers failed ({first_line(result.stderr)})"
        self.saw_step(probe.step)
        if probe.alive == self.plan.hosts:
            idle = self.clock() - self.last_change
            if self.plan.stuck_seconds and idle > self.plan.stuck_seconds:
                return f"restart: no new step for {idle:.0f}s (stuck)"
            self.partial = False
            return "running"
        if probe.alive:
            dead = [i for i, s in enumerate(probe.states) if s != "alive"]
            if not self.partial:  # the others may be exiting too: look again next poll
                self.partial = True
                return "running"
            return f"restart: gpt-jax train is not running on worker(s) {dead}"
        ok, status = self.read_status()
        if not ok:
            return "error: reading status.json failed"
        s = (status or {}).get("state")
        if s == "finished":
            return "finished"
        if s == "stopped":
            self.saw_step(status.get("step") if isinstance(status.get("step"), int) else None)
            return f"restart: stopped by {status.get('signal')} at step {status.get('step')}"
        if s == "failed":
            return f"restart: failed: {status.get('error')}"
        return f"restart: gpt-jax train exited ({probe.states[0]}) without a final status"

    def supervise(self) -> int:
        p, t = self.plan, self.plan.target
        while True:
            kind, value = describe(t, self.run)
            if kind == "error":
                if not self.transient(value):
                    return self.give_up(f"{value}; {self.errors - 1} retries failed")
                continue
            self.tpu_state = value
            if kind == "missing":
                log(f"{t.name} not found; creating it")
                self.launched = self.installed = False
                if self.run(p.create).returncode != 0 and not self.restart("create failed", False):
                    return 1
            elif value in gcloud.DEAD:
                if not self.restart(f"{t.name} is {value}", True):
                    return 1
                continue
            elif value in gcloud.HEALTHY:
                if not self.launched:
                    why = self.launch()
                    if why and not self.restart(why, False):
                        return 1
                else:
                    outcome, _, detail = self.check().partition(": ")
                    if outcome == "finished":
                        log("training finished (status.json: finished)")
                        if p.delete_when_done:
                            self.run(gcloud.delete_cmd(t))
                        return 0
                    if outcome == "error":
                        if not self.transient(detail):
                            return self.give_up(f"{detail}; {self.errors - 1} retries failed")
                        continue
                    if outcome == "restart":
                        if not self.restart(detail, False):
                            return 1
                        continue
            else:
                log(f"{t.name} is {value}; waiting")
            self.errors = 0  # a whole poll went through
            self.sleep(p.poll_seconds)


def supervise(plan: Plan, run: gcloud.Runner, sleep: Sleep,
              clock: Clock = time.monotonic) -> int:
    """Loop until status.json says finished on a healthy TPU (0) or restarts run out (1)."""
    return Supervisor(plan, run, sleep, clock).supervise()


def print_plan(plan: Plan, run: gcloud.Runner) -> None:
    """--dry-run: the commands of a first start, one poll, and one preemption recovery."""
    t = plan.target
    print("# poll the state (NOT_FOUND: create; other errors: retry with backoff):")
    for cmd in [gcloud.describe_cmd(t), plan.create]:
        run(cmd)
    print("# when ACTIVE/READY: clean every worker, install (once per TPU), start training:")
    for cmd in [gcloud.ssh_cmd(t, "all", gcloud.cleanup_script())] + plan.install + [plan.train]:
        run(cmd)
    print("# every poll: is gpt-jax train alive on each worker, and worker 0's last step;")
    print("# when none runs, status.json says how it ended (only 'finished' ends supervision):")
    run(gcloud.ssh_cmd(t, "all", gcloud.probe_script()))
    run(gcloud.read_status_cmd(plan.workdir))
    print("# on PREEMPTED/SUSPENDED/FAILED...: delete, back off, then create/install/train again:")
    run(gcloud.delete_cmd(t))
