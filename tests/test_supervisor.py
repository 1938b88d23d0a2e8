"""launch/supervisor.py under failure modes, driven by a scripted fake gcloud: maintenance
stop, a process dying without an exit file, describe errors, a leftover process, many
preemptions, a stuck run, giving up. Each asserts the exact sequence of gcloud calls. The
remote scripts themselves run under bash in fake worker homes (the fake remote shell)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from test_launch import wait_for  # noqa: E402

from launch import gcloud, supervisor  # noqa: E402

PY = sys.executable
T = gcloud.Target("my-tpu", "my-proj", "us-west4-a", queued=True)
DELETE = ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu",
          "--project=my-proj", "--zone=us-west4-a", "--force", "--quiet"]
NOT_FOUND = ("ERROR: (gcloud.compute.tpus.queued-resources.describe) NOT_FOUND: Resource "
             "'projects/my-proj/locations/us-west4-a/queuedResources/my-tpu' was not found")
ERRORS = {  # what gcloud prints for errors that are not "it does not exist"
    "5xx": "ERROR: (gcloud.compute.tpus.queued-resources.describe) UNAVAILABLE: HttpError 503",
    "auth": "ERROR: (gcloud.compute.tpus.queued-resources.describe) There was a problem "
            "refreshing your current auth tokens: Reauthentication failed.",
    "timeout": "timed out after 1800s",
}


def remote_command(argv: list[str]) -> str:
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    return cmd[len("--command="):]


def kind(argv: list[str]) -> str:
    """A short name for each gcloud call the supervisor makes."""
    if argv[:2] == ["gcloud", "storage"]:
        return "status" if argv[2] == "cat" else argv[2]
    assert argv[:3] == ["gcloud", "compute", "tpus"], argv
    if argv[4] != "ssh":
        return argv[4]  # describe | create | delete | scp
    cmd = remote_command(argv)
    for name, mark in [("cleanup", "pkill"), ("probe", gcloud.PROBE_MARK),
                       ("train", "nohup"), ("install", ".installed")]:
        if mark in cmd:
            return name
    raise AssertionError(cmd)


class Cloud:
    """Scripted gcloud. describe answers from `states` (a state, "" for NOT_FOUND, or a key of
    ERRORS); each probe from `probes` (one "STATE STEP" per worker); each status read from
    `statuses` (a dict, or None for no file). Sleeps advance a fake clock."""

    def __init__(self, states, probes=(), statuses=(), fail=()):
        self.states, self.probes, self.statuses = list(states), list(probes), list(statuses)
        self.fail = set(fail)  # kinds whose calls fail
        self.calls: list[list[str]] = []
        self.sleeps: list[float] = []
        self.now = 0.0

    def __call__(self, argv):
        self.calls.append(list(argv))
        k = kind(argv)
        if k in self.fail:
            return gcloud.Result(1, "", "ERROR: failed")
        if k == "describe":
            s = self.states.pop(0)
            if s in ERRORS:
                return gcloud.Result(124 if s == "timeout" else 1, "", ERRORS[s])
            return gcloud.Result(0, s + "\n") if s else gcloud.Result(1, "", NOT_FOUND)
        if k == "probe":
            rows = self.probes.pop(0)
            return gcloud.Result(0, "".join(f"{gcloud.PROBE_MARK} {r}\n" for r in rows))
        if k == "status":
            record = self.statuses.pop(0)
            if record is None:
                return gcloud.Result(1, "", "ERROR: (gcloud.storage.cat) One or more URLs "
                                            "matched no objects.")
            return gcloud.Result(0, json.dumps(record))
        return gcloud.Result(0)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def clock(self) -> float:
        return self.now

    def kinds(self) -> list[str]:
        return [kind(c) for c in self.calls]

    def done(self) -> bool:
        return not (self.states or self.probes or self.statuses)


def plan(**kw) -> supervisor.Plan:
    kw.setdefault("install", [gcloud.scp_cmd(T, "/tmp/src.tar.gz", "src.tar.gz"),
                              gcloud.ssh_cmd(T, "all", gcloud.install_script("v1", None, "3.11"))])
    kw.setdefault("hosts", 2)
    return supervisor.Plan(
        target=T, create=["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu"],
        train=gcloud.ssh_cmd(T, "all", gcloud.train_script("gs://b/r", [], {})),
        workdir="gs://b/r", poll_seconds=5, backoff_seconds=7, stuck_seconds=600, **kw)


def supervise(cloud: Cloud, **kw) -> int:
    """Run the supervisor; every call it made must be the exact argv of its kind, so each
    test's list of kinds is the exact sequence of gcloud calls."""
    p = plan(**kw)
    code = supervisor.supervise(p, cloud, cloud.sleep, cloud.clock)
    exact = {"describe": gcloud.describe_cmd(T), "create": p.create, "delete": DELETE,
             "cleanup": gcloud.ssh_cmd(T, "all", gcloud.cleanup_script()),
             "scp": p.install[0], "install": p.install[1], "train": p.train,
             "probe": gcloud.ssh_cmd(T, "all", gcloud.probe_script()),
             "status": ["gcloud", "storage", "cat", "gs://b/r/status.json"]}
    for call in cloud.calls:
        assert call == exact[kind(call)], call
    return code


FIRST_START = ["describe", "cleanup", "scp", "install", "train"]
FINISHED = {"state": "finished", "step": 40, "num_steps": 40}
ALIVE = ("alive 10", "alive -")
EXITED = ("exited:0 -", "exited:0 -")


def test_maintenance_stop_then_ready_relaunches_instead_of_finishing():
    # The run saves and exits 0 on SIGTERM during a maintenance event; the TPU is READY again.
    cloud = Cloud(["READY", "READY", "REPAIRING", "READY", "READY", "READY", "READY"],
                  probes=[ALIVE, EXITED, ("alive 30", "alive -"), EXITED],
                  statuses=[{"state": "stopped", "step": 20, "signal": "SIGTERM"}, FINISHED])
    assert supervise(cloud, delete_when_done=True) == 0
    assert cloud.kinds() == FIRST_START + [
        "describe", "probe", "describe", "describe", "probe", "status",  # stopped: not done
        "describe", "cleanup", "train",  # relaunched on the same TPU, no reinstall
        "describe", "probe", "describe", "probe", "status", "delete"]  # finished, then delete
    assert cloud.calls[-1] == DELETE and cloud.done()
    assert cloud.sleeps == [5, 5, 5, 7, 5, 5]  # polls, and one backoff before the relaunch


def test_exit_code_zero_without_finished_record_never_ends_supervision():
    cloud = Cloud(["READY"] * 5, probes=[EXITED, ALIVE, EXITED],
                  statuses=[{"state": "running"}, FINISHED])
    assert supervise(cloud) == 0
    assert cloud.kinds() == FIRST_START + ["describe", "probe", "status", "describe", "cleanup",
                                           "train", "describe", "probe", "describe", "probe",
                                           "status"]
    assert cloud.done()


def test_process_death_without_exit_file_is_noticed_and_relaunched():
    # The VM rebooted (or the process was killed): no process, no train.exit, status "running".
    cloud = Cloud(["READY"] * 6, probes=[ALIVE, ("gone -", "gone -"), ("alive 12", "alive -"),
                                         EXITED],
                  statuses=[{"state": "running"}, FINISHED])
    assert supervise(cloud) == 0
    assert cloud.kinds() == FIRST_START + [
        "describe", "probe", "describe", "probe", "status",
        "describe", "cleanup", "train", "describe", "probe", "describe", "probe", "status"]
    assert "delete" not in cloud.kinds() and cloud.done()


@pytest.mark.parametrize("error", ["5xx", "auth", "timeout"])
def test_describe_errors_are_retried_and_never_create_or_reinstall(error):
    cloud = Cloud(["READY", "READY", error, error, "READY", "READY"],
                  probes=[ALIVE, ("alive 20", "alive -"), EXITED], statuses=[FINISHED])
    assert supervise(cloud) == 0
    assert cloud.kinds() == FIRST_START + ["describe", "probe", "describe", "describe",
                                           "describe", "probe", "describe", "probe", "status"]
    assert cloud.sleeps == [5, 5, 7, 14, 5]  # backoff doubles across errors in a row
    assert cloud.done()


def test_describe_error_before_the_tpu_exists_waits_for_a_real_not_found():
    cloud = Cloud(["5xx", "", "READY", "READY"], probes=[EXITED], statuses=[FINISHED])
    assert supervise(cloud) == 0
    assert cloud.kinds() == ["describe", "describe", "create"] + FIRST_START + [
        "describe", "probe", "status"]


def test_leftover_process_on_one_worker_is_cleaned_up_before_the_relaunch():
    # Worker 0 crashed; worker 1's process hangs on. One poll of grace, then clean up all.
    cloud = Cloud(["READY"] * 6,
                  probes=[("exited:1 -", "alive -"), ("exited:1 -", "alive -"), ALIVE, EXITED],
                  statuses=[FINISHED])
    assert supervise(cloud) == 0
    assert cloud.kinds() == FIRST_START + [
        "describe", "probe", "describe", "probe",  # partial twice: restart
        "describe", "cleanup", "train", "describe", "probe", "describe", "probe", "status"]
    assert cloud.done()


def test_seven_preemptions_with_progress_keep_the_short_backoff():
    states, probes = [], []
    for i in range(7):  # up, some steps, preempted, gone, re-created
        states += ["ACTIVE", "ACTIVE", "PREEMPTED", ""]
        probes += [(f"alive {10 * (i + 1)}", "alive -")]
    states += ["ACTIVE", "ACTIVE"]
    probes += [EXITED]
    cloud = Cloud(states, probes=probes, statuses=[FINISHED])
    assert supervise(cloud, max_restarts=3) == 0  # 7 > 3: only restarts without progress count
    cycle = FIRST_START + ["describe", "probe", "describe", "delete", "describe", "create"]
    assert cloud.kinds() == cycle * 7 + FIRST_START + ["describe", "probe", "status"]
    assert [s for s in cloud.sleeps if s != 5] == [7] * 7  # no doubling, no hour-long waits
    assert cloud.done()


def test_preemptions_without_progress_back_off_and_give_up_naming_the_slice(capsys):
    cloud = Cloud(["PREEMPTED"] * 4)
    assert supervise(cloud, max_restarts=3) == 1
    assert cloud.kinds() == ["describe", "delete"] * 3 + ["describe"]
    assert cloud.sleeps == [7, 14, 28]
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "giving up: my-tpu is PREEMPTED" in err and "still exists (PREEMPTED)" in err
    assert err.endswith("delete it with: " + " ".join(DELETE))


def test_crash_loop_gives_up_with_one_line_saying_the_slice_is_running(capsys):
    failed = {"state": "failed", "error": "gpt-jax train: bad config"}
    cloud = Cloud(["READY"] * 8, probes=[EXITED] * 3, statuses=[failed] * 3)
    assert supervise(cloud, max_restarts=2) == 1
    assert cloud.kinds() == FIRST_START + ["describe", "probe", "status",
                                           "describe", "cleanup", "train"] * 1 + [
        "describe", "probe", "status", "describe", "cleanup", "train",
        "describe", "probe", "status"]
    out = capsys.readouterr().err.strip().splitlines()
    (line,) = [x for x in out if "giving up" in x]
    assert "failed: gpt-jax train: bad config" in line
    assert "the queued resource my-tpu still exists (READY and billing)" in line
    assert line.endswith("delete it with: " + " ".join(DELETE))
    assert "delete" not in cloud.kinds()


def test_persistent_describe_errors_give_up_and_leave_the_slice_named(capsys):
    cloud = Cloud(["READY", "READY"] + ["auth"] * 3, probes=[ALIVE])
    assert supervise(cloud, max_restarts=2) == 1
    assert cloud.kinds() == FIRST_START + ["describe", "probe", "describe", "describe",
                                           "describe"]
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "giving up: describe failed" in line and "still exists (READY and billing)" in line


def test_a_stuck_run_is_restarted():
    # Alive everywhere, but worker 0's step stays 10 for longer than stuck_seconds (600 s): the
    # first probe (t=5 s) sees step 10, the 122nd (t=610 s) is the first more than 600 s later.
    stuck = [("alive 10", "alive -")] * 122
    cloud = Cloud(["READY"] * 126, probes=stuck + [("alive 11", "alive -"), EXITED],
                  statuses=[FINISHED])
    assert supervise(cloud) == 0
    assert cloud.kinds() == (FIRST_START + ["describe", "probe"] * 122
                             + ["describe", "cleanup", "train"]
                             + ["describe", "probe"] * 2 + ["status"])
    assert cloud.done()


def test_failed_launch_steps_count_as_restarts():
    cloud = Cloud(["READY", "READY", "READY"], fail={"train"})
    assert supervise(cloud, max_restarts=1) == 1
    assert cloud.kinds() == FIRST_START + ["describe", "cleanup", "train"]


def test_unreachable_workers_count_as_errors_and_end_in_giving_up(capsys):
    cloud = Cloud(["READY"] * 4, fail={"probe"})
    assert supervise(cloud, max_restarts=2) == 1
    assert cloud.kinds() == FIRST_START + ["describe", "probe"] * 3
    assert cloud.sleeps == [5, 7, 14]
    assert "still exists (READY and billing)" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.e2e
def test_runner_keeps_stderr_and_kills_a_call_that_hangs(capsys):
    run = gcloud.make_runner(dry_run=False, timeout_seconds=1.0)
    result = run(["sh", "-c", "echo out; echo NOT_FOUND: gone >&2; exit 3"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "NOT_FOUND: gone\n")
    assert result.missing() and not gcloud.Result(1, "", ERRORS["5xx"]).missing()
    start = time.monotonic()
    hung = run(["sleep", "30"])
    assert hung.returncode == 124 and "timed out after 1s" in hung.stderr
    assert time.monotonic() - start < 10


def test_parse_probe_needs_every_worker():
    line = gcloud.PROBE_MARK
    assert supervisor.parse_probe(f"{line} alive 3\n{line} alive -\n", 2) == supervisor.Probe(
        2, ["alive", "alive"], 3)
    assert supervisor.parse_probe(f"{line} alive 3\nssh: connection refused\n", 2) is None


# ---------------------------------------------------------------- the fake remote shell


def worker_home(tmp_path, name: str, version: str = "v1") -> dict[str, str]:
    """A worker's HOME with an installed release whose fake gpt-jax prints steps and sleeps."""
    home = tmp_path / name
    rel = home / "gpt_jax_releases" / version
    (rel / "venv" / "bin").mkdir(parents=True)
    (rel / "src").mkdir()
    (rel / ".installed").touch()
    fake = rel / "venv" / "bin" / "gpt-jax"
    fake.write_text(f"#!{PY}\nimport time\nprint('step 1/9', flush=True)\ntime.sleep(60)\n")
    fake.chmod(0o755)
    os.symlink(rel, home / "gpt_jax_current")
    return dict(os.environ, HOME=str(home))


def bash(script: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True,
                          timeout=60)


def pid_of(env) -> int | None:
    try:
        return int(open(os.path.join(env["HOME"], "gpt_jax_logs", "train.pid")).read())
    except (OSError, ValueError):  # not written yet
        return None


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] == "Z"


@pytest.mark.e2e
def test_probe_reports_alive_step_and_a_reused_pid_as_gone(tmp_path):
    env = worker_home(tmp_path, "w0")
    assert bash(gcloud.probe_script(), env).stdout == "gpt_jax_probe gone -\n"
    assert bash(gcloud.train_script("gs://b/r", [], {}), env).returncode == 0
    log = os.path.join(env["HOME"], "gpt_jax_logs", "train.log")
    assert wait_for(lambda: "step 1/9" in open(log).read())
    assert bash(gcloud.probe_script(), env).stdout == "gpt_jax_probe alive 1\n"
    pid = pid_of(env)
    os.kill(pid, signal.SIGKILL)  # dies before writing train.exit? the wrapper still writes it
    assert wait_for(lambda: gone(pid))
    assert wait_for(lambda: bash(gcloud.probe_script(), env).stdout.startswith(
        "gpt_jax_probe exited:137"))
    # A stale pid file whose number now belongs to another program: not ours, so "gone".
    other = subprocess.Popen(["sleep", "30"])
    try:
        os.remove(os.path.join(env["HOME"], "gpt_jax_logs", "train.exit"))
        with open(os.path.join(env["HOME"], "gpt_jax_logs", "train.pid"), "w") as f:
            f.write(f"{other.pid}\n")
        assert bash(gcloud.probe_script(), env).stdout == "gpt_jax_probe gone 1\n"
        started = bash(gcloud.train_script("gs://b/r", [], {}), env)  # not "already running"
        assert started.returncode == 0, started.stderr
        assert wait_for(lambda: pid_of(env) not in (None, other.pid))
        assert other.poll() is None  # the unrelated process was left alone
        # A new launch mark: the step of the earlier launch no longer counts.
        assert bash(gcloud.probe_script(), env).stdout in ("gpt_jax_probe alive -\n",
                                                           "gpt_jax_probe alive 1\n")
    finally:
        other.kill()
        bash(gcloud.cleanup_script(grace_seconds=2), env)


@pytest.mark.e2e
def test_cleanup_kills_a_leftover_process_and_removes_stale_files(tmp_path):
    env = worker_home(tmp_path, "w1")
    assert bash(gcloud.train_script("gs://b/r", [], {}), env).returncode == 0
    assert wait_for(lambda: pid_of(env) is not None)
    pid = pid_of(env)
    again = bash(gcloud.train_script("gs://b/r", [], {}), env)
    assert again.returncode == 1 and "already running" in again.stderr
    # A second, orphaned copy whose pid file is gone: found by its command line.
    orphan = subprocess.Popen([os.path.join(env["HOME"], "gpt_jax_releases", "v1", "venv", "bin",
                                            "gpt-jax"), "train"], env=env)
    try:
        assert bash(gcloud.cleanup_script(grace_seconds=2), env).returncode == 0
        assert wait_for(lambda: gone(pid)) and orphan.wait(timeout=10) == -signal.SIGKILL
        logs = os.path.join(env["HOME"], "gpt_jax_logs")
        assert wait_for(lambda: not os.path.exists(os.path.join(logs, "train.pid")))
        assert bash(gcloud.train_script("gs://b/r", [], {}), env).returncode == 0  # starts again
    finally:
        if orphan.poll() is None:
            orphan.kill()
        bash(gcloud.cleanup_script(grace_seconds=2), env)


def fake_uv(home) -> None:
    """$HOME/.local/bin/uv: `venv DIR` makes DIR/bin/python; `pip install` logs its args."""
    (home / ".local" / "bin").mkdir(parents=True)
    uv = home / ".local" / "bin" / "uv"
    uv.write_text("#!/bin/bash\nset -e\nif [ \"$1\" = venv ]; then d=\"${@: -1}\"; "
                  "mkdir -p \"$d/bin\"; printf '#!/bin/sh\\necho jax 0\\n' > \"$d/bin/python\"; "
                  "chmod +x \"$d/bin/python\"; else echo \"$@\" >> \"$HOME/uv.log\"; fi\n")
    uv.chmod(0o755)


@pytest.mark.e2e
def test_install_goes_to_a_new_release_and_never_touches_a_live_one(tmp_path):
    home = tmp_path / "w"
    home.mkdir()
    fake_uv(home)
    env = dict(os.environ, HOME=str(home))
    src = tmp_path / "src"
    src.mkdir()
    (src / "setup.cfg").write_text("[metadata]\n")

    def install(version: str) -> subprocess.CompletedProcess:
        with tarfile.open(home / gcloud.tarball_name(version), "w:gz") as tar:
            tar.add(src / "setup.cfg", arcname="setup.cfg")
        out = bash(gcloud.install_script(version, None, "3.11"), env)
        assert out.returncode == 0, out.stderr
        return out

    install("v1")
    releases = home / "gpt_jax_releases"
    assert os.readlink(home / "gpt_jax_current") == str(releases / "v1")
    assert (releases / "v1" / "src" / "setup.cfg").exists()
    assert "'jax[tpu]==" not in open(home / "uv.log").read()  # the quotes are the shell's
    assert f"jax[tpu]=={gcloud.JAX_TPU_VERSION}" in open(home / "uv.log").read()
    # A process runs from v1 (its path on its command line), like a live training run.
    live = subprocess.Popen([PY, "-c", "import time; time.sleep(60)",
                             str(releases / "v1") + "/venv/bin/x"])
    try:
        assert "is installed" in install("v1").stdout  # same version: nothing reinstalled
        assert open(home / "uv.log").read().count("pip install") == 1
        for v in ("v2", "v3", "v4", "v5"):
            time.sleep(0.02)  # distinct modification times
            install(v)
        assert os.readlink(home / "gpt_jax_current") == str(releases / "v5")
        # The 3 newest stay, v1 stays because a process runs from it, v2 is pruned.
        assert sorted(os.listdir(releases)) == ["v1", "v3", "v4", "v5"]
        assert not any(n.endswith(".tar.gz") for n in os.listdir(home))
    finally:
        live.kill()
