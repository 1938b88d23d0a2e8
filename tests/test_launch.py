"""launch/: TPU launcher dry runs and validation, the remote scripts, the preemption supervisor,
the local multi-host launcher, the GKE JobSet example, and a 2-host kill-and-resume run."""

from __future__ import annotations

import json
import os
import py_compile
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import pytest

from gpt_jax import tpu_flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from launch import gcloud, local_multihost, tpu, tpu_types  # noqa: E402

PY = sys.executable
WHERE = ["--name=my-tpu", "--project=my-proj", "--zone=us-west4-a"]
WHERE_FLAGS = ["--project=my-proj", "--zone=us-west4-a"]


@pytest.fixture(autouse=True)
def no_real_gcloud(tmp_path_factory, monkeypatch):
    """Every test sees a `gcloud` on PATH that fails loudly: the real one never runs."""
    bindir = tmp_path_factory.mktemp("guard")
    guard = bindir / "gcloud"
    guard.write_text("#!/bin/sh\necho 'real gcloud called in a test' >&2\nexit 99\n")
    guard.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")


class Recorder:
    """A fake runner: records every argv; `respond(argv)` picks the Result."""

    def __init__(self, respond=None):
        self.calls: list[list[str]] = []
        self.respond = respond or (lambda argv: gcloud.Result(0))

    def __call__(self, argv):
        self.calls.append(list(argv))
        return self.respond(argv)


def dry_run(capsys, *argv: str) -> list[list[str]]:
    """Run tpu.main(... --dry-run) and return the printed commands as argv lists."""
    argv = list(argv)
    at = argv.index("--") if "--" in argv else len(argv)
    assert tpu.main(argv[:at] + ["--dry-run"] + argv[at:]) == 0
    out = capsys.readouterr().out
    return [shlex.split(line) for line in out.splitlines() if line and not line.startswith("#")]


def remote_command(argv: list[str]) -> str:
    (cmd,) = [a for a in argv if a.startswith("--command=")]
    return cmd[len("--command="):]


# ---------------------------------------------------------------- accelerator table


@pytest.mark.parametrize("name,chips,hosts,runtime", [
    ("v4-8", 4, 1, "tpu-ubuntu2204-base"), ("v4-32", 16, 4, "tpu-ubuntu2204-base"),
    ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"), ("v5e-32", 32, 8, "v2-alpha-tpuv5-lite"),
    ("v5p-8", 4, 1, "v2-alpha-tpuv5"), ("v6e-8", 8, 1, "v2-alpha-tpuv6e"),
    ("v6e-16", 16, 4, "v2-alpha-tpuv6e")])
def test_accelerator_table(name, chips, hosts, runtime):
    acc = tpu_types.accelerator(name)
    assert (acc.chips, acc.hosts, acc.runtime_version) == (chips, hosts, runtime)


# ---------------------------------------------------------------- dry runs


def test_create_on_demand_dry_run(capsys):
    (cmd,) = dry_run(capsys, "create", *WHERE, "--accelerator=v5litepod-8")
    assert cmd == ["gcloud", "compute", "tpus", "tpu-vm", "create", "my-tpu", *WHERE_FLAGS,
                   "--accelerator-type=v5litepod-8", "--version=v2-alpha-tpuv5-lite"]


def test_create_queued_spot_dry_run(capsys):
    (cmd,) = dry_run(capsys, "create", *WHERE[:2], "--zone=us-central2-b", "--queued", "--spot",
                     "--accelerator=v4-32")
    assert cmd == ["gcloud", "compute", "tpus", "queued-resources", "create", "my-tpu",
                   "--project=my-proj", "--zone=us-central2-b", "--accelerator-type=v4-32",
                   "--runtime-version=tpu-ubuntu2204-base", "--node-id=my-tpu", "--spot"]


@pytest.mark.parametrize("tier", ["--preemptible", "--reserved", "--spot"])
def test_create_tiers_and_version_override(capsys, tier):
    (cmd,) = dry_run(capsys, "create", *WHERE, "--accelerator=v6e-8", tier, "--version=v2-custom",
                     "--gcloud-arg=--network=my-net")
    assert cmd[-3:] == ["--version=v2-custom", tier, "--network=my-net"]


def test_install_dry_run_ships_source_and_installs_a_versioned_release(capsys):
    tar, scp, rm, ssh = dry_run(capsys, "install", *WHERE)
    version = tpu.release_version(tpu.parse(["install", *WHERE]))
    assert tar[:2] == ["tar", "-czf"] and tar[3:5] == ["-C", REPO]
    assert tar[5:] == tpu.shipped_files(REPO)  # what the release hash covers, exactly
    assert {"setup.cfg", "gpt_jax/model.py", "configs/default.py"} <= set(tar[5:])
    assert not any(p.startswith(("runs/", ".venv/", ".git/")) or "__pycache__" in p
                   for p in tar[5:])
    assert os.path.basename(tar[2]) == f"gpt_jax-src-{version}-{os.getpid()}.tar.gz"
    assert scp[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp", tar[2]]
    assert scp[6] == f"my-tpu:gpt_jax-src-{version}.tar.gz" and "--worker=all" in scp
    assert rm == ["rm", "-f", tar[2]]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in ssh and "--zone=us-west4-a" in ssh and "--project=my-proj" in ssh
    assert "--quiet" in ssh and "--quiet" in scp  # no SSH-key or host-key prompt
    script = remote_command(ssh)
    rel = f'"$HOME/gpt_jax_releases/{version}"'
    assert f"--python 3.11 {rel}/venv" in script
    assert (f'pip install -q --python {rel}/venv/bin/python -e "$HOME/gpt_jax_releases/'
            f"{version}/src[tpu]\" 'jax[tpu]=={gcloud.JAX_TPU_VERSION}'") in script
    assert "rm -rf \"$HOME/gpt_jax\"" not in script and f"if [ -f {rel}/.installed ]" in script


def test_release_version_follows_the_source_and_the_pins(tmp_path, capsys):
    src = tmp_path / "src"
    (src / "runs").mkdir(parents=True)
    (src / "setup.cfg").write_text("[metadata]\n")
    version = lambda *extra: tpu.release_version(  # noqa: E731
        tpu.parse(["install", *WHERE, f"--source={src}", *extra]))
    first = version()
    (src / "runs" / "metrics.jsonl").write_text("{}")  # not shipped: no change
    (src / "train.log").write_text("a log growing beside the source")
    assert version() == first
    assert version("--jax=0.4.0") != first and version("--python=3.12") != first
    (src / "setup.cfg").write_text("[metadata]\nname = x\n")
    assert version() != first


def test_train_dry_run(capsys):
    cp, rm, ssh = dry_run(capsys, "train", *WHERE, "--accelerator=v4-32", "--workdir=gs://bkt/runs/a/",
                     "--env=LIBTPU_INIT_ARGS=--xla_tpu_x=1", "--",
                     "--config=configs/gpt2_124m.py", "--config.train.num_steps=5")
    assert cp[:3] == ["gcloud", "storage", "cp"] and cp[-1] == "gs://bkt/runs/a/.gpt_jax_write_probe"
    assert rm == ["gcloud", "storage", "rm", "gs://bkt/runs/a/.gpt_jax_write_probe"]
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in ssh and "--zone=us-west4-a" in ssh
    script = remote_command(ssh)
    inner = shlex.split(script.split("nohup bash -c ", 1)[1])[0]
    ours = " ".join(tpu_flags.overlap_flags("v4"))
    assert (f"env -u JAX_PLATFORMS LIBTPU_INIT_ARGS='{ours} --xla_tpu_x=1' "
            "\"$R/venv/bin/gpt-jax\" train --workdir=gs://bkt/runs/a --config=configs/gpt2_124m.py "
            "--config.train.num_steps=5 &") in inner
    assert script.endswith('>> "$HOME/gpt_jax_logs/train.log" 2>&1 < /dev/null &')


def test_train_overlap_flags_override_and_off(capsys):
    """The workers get the generation's overlap flags; a user's value for one of them wins."""
    def env_of(*extra):
        *_, ssh = dry_run(capsys, "train", *WHERE, "--accelerator=v5litepod-8",
                          "--workdir=gs://bkt/r", "--skip-write-check", *extra, "--",
                          "--config=configs/gpt2_124m.py")
        inner = shlex.split(remote_command(ssh).split("nohup bash -c ", 1)[1])[0]
        words = shlex.split(inner.split("env -u JAX_PLATFORMS ", 1)[1].split(" &")[0])
        return {k: v for k, _, v in (w.partition("=") for w in words if "=" in w
                                      and not w.startswith("--"))}
    got = env_of()["LIBTPU_INIT_ARGS"].split()
    assert got == list(tpu_flags.overlap_flags("v5e"))
    user = "--xla_tpu_enable_async_collective_fusion=false --xla_foo=1"
    got = env_of(f"--env=LIBTPU_INIT_ARGS={user}")["LIBTPU_INIT_ARGS"]
    assert got.endswith(user) and got.count("xla_tpu_enable_async_collective_fusion=") == 1
    assert "LIBTPU_INIT_ARGS" not in env_of("--no-xla-overlap-flags")
    assert env_of("--no-xla-overlap-flags", "--env=LIBTPU_INIT_ARGS=--a=1") == {
        "LIBTPU_INIT_ARGS": "--a=1"}


@pytest.mark.parametrize("queued", [False, True])
def test_logs_stop_status_delete_dry_run(capsys, queued):
    q = ["--queued"] if queued else []
    (logs,) = dry_run(capsys, "logs", *WHERE, *q, "--lines=20")
    assert "--worker=0" in logs
    assert remote_command(logs) == 'tail -n 20 -F "$HOME/gpt_jax_logs/train.log"'
    (stop,) = dry_run(capsys, "stop", *WHERE, *q)
    assert "--worker=all" in stop and "kill -TERM" in remote_command(stop)
    (status,) = dry_run(capsys, "status", *WHERE, *q)
    (delete,) = dry_run(capsys, "delete", *WHERE, *q)
    if queued:
        assert status[3:6] == ["queued-resources", "describe", "my-tpu"]
        assert status[-1] == "--format=value(state.state)"
        assert delete == ["gcloud", "compute", "tpus", "queued-resources", "delete", "my-tpu",
                          *WHERE_FLAGS, "--force", "--quiet"]
    else:
        assert status[-1] == "--format=value(state)"
        assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "my-tpu",
                          *WHERE_FLAGS, "--quiet"]


def test_supervise_dry_run_lists_the_plan(capsys):
    cmds = dry_run(capsys, "supervise", *WHERE, "--queued", "--spot", "--accelerator=v5e-32",
                   "--workdir=gs://bkt/run", "--skip-install", "--", "--config=configs/tiny.py")
    assert [c[:3] for c in cmds[:2]] == [["gcloud", "storage", "cp"], ["gcloud", "storage", "rm"]]
    cmds = cmds[2:]
    verbs = [c[3:5] if c[1] == "compute" else c[1:3] for c in cmds]
    assert verbs == [["queued-resources", "describe"], ["queued-resources", "create"],
                     ["tpu-vm", "ssh"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"], ["storage", "cat"],
                     ["queued-resources", "delete"]]
    assert "pkill" in remote_command(cmds[2]) and "gpt_jax_probe" in remote_command(cmds[4])
    assert cmds[5][-1] == "gs://bkt/run/status.json"
    assert "--accelerator-type=v5litepod-32" in cmds[1] and "--spot" in cmds[1]


def fake_gcloud(tmp_path, rc: int = 0) -> str:
    """A `gcloud` on PATH that appends its argv (JSON) to calls.jsonl and exits with rc."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    script = bindir / "gcloud"
    script.write_text(f"#!{PY}\nimport json, sys\n"
                      f"open({str(tmp_path / 'calls.jsonl')!r}, 'a').write("
                      f"json.dumps(sys.argv[1:]) + '\\n')\nsys.exit({rc})\n")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return f"{bindir}{os.pathsep}{os.environ['PATH']}"


def calls(tmp_path) -> list[list[str]]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.e2e
def test_cli_dry_run_runs_nothing_and_real_run_probes_workdir_first(tmp_path):
    env = dict(os.environ, PATH=fake_gcloud(tmp_path))
    argv = [PY, os.path.join(REPO, "launch", "tpu.py"), "train", *WHERE, "--accelerator=v4-8",
            "--workdir=gs://bkt/run", "--", "--config=configs/tiny.py"]
    dry = argv[:-2] + ["--dry-run"] + argv[-2:]
    out = subprocess.run(dry, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines()[-1].startswith("gcloud compute tpus tpu-vm ssh my-tpu")
    assert calls(tmp_path) == []
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    made = calls(tmp_path)
    assert [c[:2] for c in made] == [["storage", "cp"], ["storage", "rm"], ["compute", "tpus"]]
    assert made[0][-1] == made[1][-1] == "gs://bkt/run/.gpt_jax_write_probe"


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("argv,message", [
    (["create", *WHERE, "--accelerator=v9-8"], "unknown accelerator type 'v9-8'; known types: v4-"),
    (["create", "--name=my-tpu", "--zone=us-west4-a", "--accelerator=v4-8"], "missing --project"),
    (["create", "--name=my-tpu", "--project=my-proj", "--accelerator=v4-8"], "missing --zone"),
    (["create", *WHERE[:2], "--zone=uswest4", "--accelerator=v4-8"], "--zone='uswest4' is not"),
    (["create", *WHERE[:2], "--zone=us-central1-", "--accelerator=v4-8"], "is not a zone name"),
    (["create", *WHERE, "--queued", "--preemptible", "--accelerator=v4-8"], "use --spot"),
    (["create", *WHERE, "--spot", "--reserved", "--accelerator=v4-8"], "not allowed with"),
    (["train", *WHERE, "--accelerator=v4-32", "--workdir=/tmp/run"], "must be a gs://bucket"),
    (["train", *WHERE, "--accelerator=v4-32"], "missing --workdir"),
    (["train", *WHERE, "--accelerator=v4-32", "--workdir=gs://bkt/r", "--", "--num_processes=2"],
     "process count mismatch: --num_processes=2 but v4-32 has 4 host(s)"),
    (["train", *WHERE, "--accelerator=v4-8", "--workdir=gs://bkt/r", "--",
      "--coordinator_address=1.2.3.4:1"], "--coordinator_address is set by the TPU runtime"),
    (["train", *WHERE, "--accelerator=v4-8", "--workdir=gs://bkt/r", "--env=1X=2"], "NAME=value"),
    (["install", *WHERE, "--source=/nonexistent"], "is not a gpt_jax checkout"),
    (["logs", *WHERE, "--bogus"], "unrecognized arguments: --bogus"),
    (["train", *WHERE, "--accelerator=v4-8", "--workdir=gs://bkt/r", "--", "--dry-run"],
     "put --dry-run before --"),
])
def test_bad_input_is_one_line_before_any_gcloud_call(capsys, monkeypatch, argv, message):
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
    monkeypatch.delenv("CLOUDSDK_COMPUTE_ZONE", raising=False)
    runner = Recorder()
    assert tpu.main(argv, run=runner) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("tpu.py: error: ") and message in err, err
    assert runner.calls == []


@pytest.mark.parametrize("zone", ["us-central1-ai1a", "us-west4-a", "europe-west4-b"])
def test_zones_including_ai_zones_are_accepted(zone):
    assert tpu_types.check_zone(zone) == zone


def test_unwritable_workdir_stops_before_anything_is_created(capsys):
    runner = Recorder(lambda argv: gcloud.Result(1 if argv[1] == "storage" else 0))
    argv = ["supervise", *WHERE, "--queued", "--accelerator=v4-8", "--workdir=gs://bkt/ro"]
    assert tpu.main(argv, run=runner, sleep=lambda s: None) == 2
    assert "--workdir=gs://bkt/ro is not writable" in capsys.readouterr().err
    assert [c[:2] for c in runner.calls] == [["gcloud", "storage"]]


# ---------------------------------------------------------------- the remote scripts, for real


def fake_worker_home(tmp_path, name: str = "home") -> dict[str, str]:
    """A HOME with an installed release whose fake gpt-jax logs its argv/env and checkpoints on
    SIGTERM, and ~/gpt_jax_current pointing at it."""
    home = tmp_path / name
    (home / "gpt_jax_releases" / "v1" / "venv" / "bin").mkdir(parents=True)
    (home / "gpt_jax_releases" / "v1" / "src").mkdir()
    os.symlink(home / "gpt_jax_releases" / "v1", home / "gpt_jax_current")
    fake = home / "gpt_jax_releases" / "v1" / "venv" / "bin" / "gpt-jax"
    fake.write_text(f"#!{PY}\nimport os, signal, sys, time\n"
                    "print('argv', sys.argv[1:], 'JAX_PLATFORMS', os.environ.get('JAX_PLATFORMS'),"
                    " 'FOO', os.environ.get('FOO'), flush=True)\n"
                    "signal.signal(signal.SIGTERM, lambda *a: (print('saved', flush=True),"
                    " sys.exit(0)))\ntime.sleep(60)\n")
    fake.chmod(0o755)
    return dict(os.environ, HOME=str(home), JAX_PLATFORMS="cpu")


def read(path) -> str:
    return path.read_text() if path.exists() else ""


def wait_for(predicate, timeout=20.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.e2e
def test_train_and_stop_scripts_run_under_bash(tmp_path):
    env = fake_worker_home(tmp_path)
    logs = tmp_path / "home" / "gpt_jax_logs"
    script = gcloud.train_script("gs://b/r", ["--config=configs/tiny.py", "--x=it's"], {"FOO": "a b"})
    assert subprocess.run(["bash", "-c", script], env=env, timeout=20).returncode == 0
    assert wait_for(lambda: "argv" in read(logs / "train.log"))
    log = (logs / "train.log").read_text()
    assert "['train', '--workdir=gs://b/r', '--config=configs/tiny.py', \"--x=it's\"]" in log
    assert "JAX_PLATFORMS None FOO a b" in log
    again = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert again.returncode == 1 and "already running" in again.stderr
    probe = ["bash", "-c", gcloud.probe_script()]
    assert subprocess.run(probe, env=env, capture_output=True, text=True).stdout == \
        "gpt_jax_probe alive -\n"
    subprocess.run(["bash", "-c", gcloud.stop_script()], env=env, check=True)
    assert wait_for(lambda: read(logs / "train.exit"))
    assert subprocess.run(probe, env=env, capture_output=True, text=True).stdout == \
        "gpt_jax_probe exited:0 -\n"
    assert (logs / "train.exit").read_text() == "0\n" and "saved" in (logs / "train.log").read_text()
    tail = subprocess.run(["bash", "-c", gcloud.logs_script(1, follow=False)], env=env,
                          capture_output=True, text=True)
    assert tail.stdout == "saved\n"


TRAIN_SCRIPT = gcloud.train_script("gs://b/r", ["--config=configs/tiny.py"], {"A": "1"})


@pytest.mark.e2e
@pytest.mark.skipif(shutil.which("shellcheck") is None,
                    reason="shellcheck is not installed (apt-get install shellcheck)")
@pytest.mark.parametrize("script", [
    gcloud.install_script("abc123", None, "3.11"),
    gcloud.install_script("abc123", "gpt_jax[tpu]", "3.11"),
    TRAIN_SCRIPT, shlex.split(TRAIN_SCRIPT.split("nohup bash -c ", 1)[1])[0],
    gcloud.stop_script(), gcloud.logs_script(10, True), gcloud.probe_script(),
    gcloud.cleanup_script()])
def test_remote_scripts_pass_shellcheck(script):
    # SC2016: the script for `bash -c '...'` is single-quoted on purpose (it expands remotely);
    # the inner script is checked on its own (the 4th case).
    out = subprocess.run(["shellcheck", "-s", "bash", "--exclude=SC2016", "-"], input=script,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout


def test_launch_modules_compile():
    names = [n for n in os.listdir(os.path.join(REPO, "launch")) if n.endswith(".py")]
    assert {"tpu.py", "local_multihost.py"} <= set(names)
    for name in names:  # raises py_compile.PyCompileError on a syntax error
        py_compile.compile(os.path.join(REPO, "launch", name), doraise=True)


# ---------------------------------------------------------------- local multi-host launcher

CHILD = """
from absl import app
from gpt_jax.commands import common

common.define_distributed_flags()


def main(_):
    common.init_distributed()
    import jax
    import numpy as np
    from jax.experimental import multihost_utils
    got = multihost_utils.process_allgather(np.array([jax.process_index()]))
    print(f"index={jax.process_index()} count={jax.process_count()} global={jax.device_count()} "
          f"local={jax.local_device_count()} gathered={np.asarray(got).ravel().tolist()}")


app.run(main)
"""


def launch_local(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run local_multihost.py; on timeout SIGTERM it (it forwards) and fail with its output."""
    cmd = [PY, os.path.join(REPO, "launch", "local_multihost.py"), *argv]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        out, err = proc.communicate(timeout=60)
        pytest.fail(f"local_multihost timed out after {timeout}s:\n{out}\n{err}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.multiprocess
@pytest.mark.e2e
def test_local_multihost_runs_jax_distributed_over_127_0_0_1(tmp_path):
    child = tmp_path / "child.py"
    child.write_text(CHILD)
    out = launch_local("--num_processes=2", "--devices_per_process=4", "--", PY, str(child))
    assert out.returncode == 0, out.stdout + out.stderr
    for i in range(2):  # Gloo writes its own lines to stdout in pieces, so one may come first
        assert re.search(rf"^\[p{i}\] .*index={i} count=2 global=8 local=4 gathered=\[0, 1\]",
                         out.stdout, re.M), out.stdout
    assert "Connecting to JAX distributed service on 127.0.0.1:" in out.stderr  # absl's log


@pytest.mark.multiprocess
@pytest.mark.e2e
def test_local_multihost_one_failure_stops_the_others(tmp_path):
    code = ("import os, sys, time\npid = int(os.environ['GPT_JAX_PROCESS_ID'])\n"
            "print('up', flush=True)\nsys.exit(3) if pid == 1 else time.sleep(60)\n")
    start = time.monotonic()
    out = launch_local("--num_processes=3", "--env_only", "--grace_seconds=5", "--",
                       PY, "-c", code)
    assert out.returncode == 3 and time.monotonic() - start < 30
    assert "[p1] up" in out.stdout.splitlines()  # the others may be stopped before printing


@pytest.mark.multiprocess
@pytest.mark.e2e
def test_local_multihost_forwards_sigterm_to_every_process(tmp_path):
    code = ("import os, signal, sys, time\npid = os.environ['GPT_JAX_PROCESS_ID']\n"
            "signal.signal(signal.SIGTERM, lambda *a: (print('got SIGTERM', flush=True),"
            " sys.exit(0)))\nprint('ready', sys.argv[1:], flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([PY, os.path.join(REPO, "launch", "local_multihost.py"),
                             "--num_processes=2", "--", PY, "-c", code],
                            stdout=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline() for _ in range(2)]
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert sorted(lines)[0].startswith("[p0] ready ['--coordinator_address=127.0.0.1:")
    assert "'--num_processes=2', '--process_id=1']" in sorted(lines)[1]
    assert {"[p0] got SIGTERM", "[p1] got SIGTERM"} <= set(rest.splitlines())


@pytest.mark.parametrize("argv,message", [
    (["--num_processes=0", "--", "true"], "--num_processes=0 must be >= 1"),
    (["--devices_per_process=0", "--", "true"], "--devices_per_process=0 must be >= 1"),
    (["--", "gpt-jax", "train", "--process_id=1"], "the command sets '--process_id=1'"),
    (["--num_processes=2", "--", "gpt-jax", "train", "--num_processes=4"],
     "local_multihost sets --num_processes itself (here --num_processes=2)"),
    ([], "no command given"),
])
@pytest.mark.e2e
def test_local_multihost_bad_input(argv, message):
    out = launch_local(*argv, timeout=30)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith("local_multihost.py: error: ") and message in out.stderr


@pytest.mark.e2e
def test_local_multihost_unwritable_workdir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    out = launch_local("--", "gpt-jax", "train", f"--workdir={blocker}/run", timeout=30)
    assert out.returncode == 2 and f"--workdir={blocker}/run is not writable" in out.stderr


def test_child_env_replaces_the_device_count():
    env = local_multihost.child_env({"XLA_FLAGS": "--a=1 --xla_force_host_platform_device_count=8"},
                                    4, "127.0.0.1:1", 2, 1)
    assert env["XLA_FLAGS"] == "--a=1 --xla_force_host_platform_device_count=4"
    assert (env["JAX_PLATFORMS"], env["GPT_JAX_PROCESS_ID"]) == ("cpu", "1")


# ---------------------------------------------------------------- GKE JobSet example


def test_gke_jobset_matches_a_v5e_32_slice():
    yaml = pytest.importorskip("yaml")
    with open(os.path.join(REPO, "launch", "gke", "jobset.yaml")) as f:
        account, doc = yaml.safe_load_all(f)
    assert doc["apiVersion"] == "jobset.x-k8s.io/v1alpha2" and doc["kind"] == "JobSet"
    assert (doc["metadata"]["annotations"]["alpha.jobset.sigs.k8s.io/exclusive-topology"]
            == "cloud.google.com/gke-nodepool")
    (rjob,) = doc["spec"]["replicatedJobs"]
    job = rjob["template"]["spec"]
    pod = job["template"]["spec"]
    selector = pod["nodeSelector"]
    assert selector == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5-lite-podslice",
                        "cloud.google.com/gke-tpu-topology": "4x8"}
    (container,) = pod["containers"]
    chips_per_node = container["resources"]["limits"]["google.com/tpu"]
    a, b = map(int, selector["cloud.google.com/gke-tpu-topology"].split("x"))
    acc = tpu_types.accelerator("v5e-32")
    assert a * b == acc.chips and chips_per_node == 4
    assert job["parallelism"] == job["completions"] == acc.hosts == a * b // chips_per_node
    assert job["backoffLimit"] == 0 and rjob["replicas"] >= 1
    assert container["command"][:2] == ["gpt-jax", "train"]
    workdir = [a for a in container["command"] if a.startswith("--workdir=")]
    assert len(workdir) == 1 and workdir[0].startswith("--workdir=gs://")
    assert not any(a.startswith(("--num_processes", "--process_id")) for a in container["command"])
    # Workload Identity: the pods run as the manifest's Kubernetes service account, and not on
    # the host network (where they would write to GCS as the node's service account).
    assert account["kind"] == "ServiceAccount"
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert not pod.get("hostNetwork") and job["completionMode"] == "Indexed"


def test_gke_one_image_path_a_dockerignore_and_the_same_jax_pin():
    def read(*path):
        with open(os.path.join(REPO, *path)) as f:
            return f.read()

    image = re.compile(r"[a-z0-9-]+-docker\.pkg\.dev/[A-Za-z0-9_/.:-]+")
    text = read("launch", "gke", "jobset.yaml") + read("launch", "gke", "Dockerfile")
    found = set(image.findall(text + read("docs", "tpu.md")))
    assert found == {"us-west4-docker.pkg.dev/PROJECT/gpt-jax/gpt-jax:latest"}, found
    ignored = read(".dockerignore").split()
    assert {".git", ".venv", "runs"} <= set(ignored)
    assert f'"jax[tpu]=={gcloud.JAX_TPU_VERSION}"' in read("launch", "gke", "Dockerfile")


# ---------------------------------------------------------------- 2 hosts: kill and resume

TRAIN_FLAGS = ["--config=" + os.path.join(REPO, "configs", "tiny.py"),
               "--config.train.num_steps=10", "--config.train.log_every=1",
               "--config.train.eval_every=1000", "--config.checkpoint.every=1000"]


def train_two_hosts(workdir, sigterm_at_step: int | None = None) -> tuple[int, str]:
    """`gpt-jax train` as 2 processes x 4 CPU devices; optionally SIGTERM at a logged step."""
    gpt_jax = os.path.join(os.path.dirname(PY), "gpt-jax")
    entry = [gpt_jax] if os.path.exists(gpt_jax) else [PY, "-m", "gpt_jax.cli"]
    cmd = [PY, os.path.join(REPO, "launch", "local_multihost.py"), "--num_processes=2",
           "--devices_per_process=4", "--", *entry, "train", *TRAIN_FLAGS, f"--workdir={workdir}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(300, proc.kill)  # a hung run fails the test instead of hanging it
    watchdog.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if (sigterm_at_step and line.startswith("[p0] ")  # (Gloo may print in front)
                    and f"step {sigterm_at_step}/" in line):
                proc.send_signal(signal.SIGTERM)  # local_multihost forwards it to both hosts
                sigterm_at_step = None
        proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(lines)


def final_params(workdir):
    import jax
    import numpy as np

    from gpt_jax import checkpoint

    _, params = checkpoint.load_params(str(workdir))
    return [np.asarray(x) for x in jax.tree.leaves(params)]


@pytest.mark.slow  # 3 runs of 2 processes: ~80 s of CPU; 150 s wall on a busy 2-core box
@pytest.mark.skipif(not os.path.exists(os.path.join(REPO, "gpt_jax", "commands", "train.py")),
                    reason="gpt-jax train is not there yet")
@pytest.mark.multiprocess
@pytest.mark.e2e
def test_two_hosts_sigterm_then_resume_matches_an_uninterrupted_run(tmp_path):
    import numpy as np

    from gpt_jax.metrics import read_metrics

    def status(run):  # written by process 0 (see gpt_jax/run_status.py)
        with open(tmp_path / run / "status.json") as f:
            return {k: v for k, v in json.load(f).items() if k != "time"}

    rc, out = train_two_hosts(tmp_path / "straight")
    assert rc == 0, out[-3000:]
    assert status("straight") == {"state": "finished", "step": 10, "num_steps": 10}
    rc, out = train_two_hosts(tmp_path / "killed", sigterm_at_step=2)
    assert rc == 0, out[-3000:]  # exit 0 as when finished: only status.json tells them apart
    saved = sorted(int(s) for s in os.listdir(tmp_path / "killed" / "checkpoints") if s.isdigit())
    assert saved and saved[-1] < 10, (saved, out[-2000:])  # it really stopped early
    assert status("killed") == {"state": "stopped", "step": saved[-1], "signal": "SIGTERM",
                                "num_steps": 10}
    rc, out = train_two_hosts(tmp_path / "killed")
    assert rc == 0, out[-3000:]
    assert re.search(r"^\[p0\] .*step 10/10", out, re.M)
    assert not re.search(r"^\[p1\] .*step \d+/", out, re.M)  # only process 0 logs
    assert status("killed") == {"state": "finished", "step": 10, "num_steps": 10}

    def losses(run):
        return {e["step"]: e["loss"] for e in read_metrics(str(tmp_path / run)) if "loss" in e}

    straight, resumed = losses("straight"), losses("killed")
    assert sorted(straight) == sorted(resumed) == list(range(1, 11))
    np.testing.assert_allclose([resumed[s] for s in range(1, 11)],
                               [straight[s] for s in range(1, 11)], rtol=1e-6)
    for a, b in zip(final_params(tmp_path / "straight"), final_params(tmp_path / "killed")):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    # ... and 2 processes x 4 devices == 1 process x 8 devices (this pytest process).
    from gpt_jax import config as config_lib
    from gpt_jax import train

    config = config_lib.load_preset("tiny")
    config.train.update(num_steps=10, log_every=1, eval_every=1000)
    config.checkpoint.update(every=1000)
    train.train(config, str(tmp_path / "one_process"))
    single = losses("one_process")
    np.testing.assert_allclose([straight[s] for s in range(1, 11)],
                               [single[s] for s in range(1, 11)], rtol=1e-5)
    for a, b in zip(final_params(tmp_path / "straight"), final_params(tmp_path / "one_process")):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_run_status_records(tmp_path):
    from gpt_jax import run_status

    def state(**kw):
        run_status.ended(str(tmp_path), 10, **kw)
        record = run_status.read(str(tmp_path))
        return {k: v for k, v in record.items() if k != "time"}

    assert state(signal="SIGTERM", stopped_at=3) == {"state": "stopped", "step": 3,
                                                    "signal": "SIGTERM", "num_steps": 10}
    assert state(signal="SIGTERM", stopped_at=10)["state"] == "finished"  # at the last step
    assert state(signal=None, stopped_at=None) == {"state": "finished", "step": 10,
                                                  "num_steps": 10}
    run_status.failed(str(tmp_path), RuntimeError("bad\n  thing"))
    assert run_status.read(str(tmp_path))["error"] == "bad thing"
    with pytest.raises(ValueError, match="'done' is not one of"):
        run_status.write(str(tmp_path), "done")


@pytest.mark.e2e
def test_failed_train_records_the_one_line_error_in_status_json(tmp_path):
    gpt_jax = os.path.join(os.path.dirname(PY), "gpt-jax")
    entry = [gpt_jax] if os.path.exists(gpt_jax) else [PY, "-m", "gpt_jax.cli"]
    workdir = tmp_path / "run"
    out = subprocess.run([*entry, "train", TRAIN_FLAGS[0], "--config.train.num_steps=0",
                          f"--workdir={workdir}"], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode != 0
    with open(workdir / "status.json") as f:
        record = json.load(f)
    assert record["state"] == "failed" and "num_steps" in record["error"]
    assert record["error"].startswith("gpt-jax train: ") and "\n" not in record["error"]
    assert record["error"] in out.stderr


@pytest.mark.e2e
def test_local_multihost_children_die_with_a_killed_launcher():
    code = "import os, time\nprint('pid', os.getpid(), flush=True)\ntime.sleep(60)\n"
    proc = subprocess.Popen([PY, os.path.join(REPO, "launch", "local_multihost.py"), "--env_only",
                             "--", PY, "-c", code], stdout=subprocess.PIPE, text=True)
    pids = [int(proc.stdout.readline().split()[-1]) for _ in range(2)]
    proc.kill()  # SIGKILL: no chance to forward anything
    proc.wait(timeout=10)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie waiting for init counts as gone
            return f.read().split()[2] == "Z"

    assert wait_for(lambda: all(gone(p) for p in pids), timeout=10)
