"""Cloud TPU VM launcher for gpt_jax, on top of the `gcloud` CLI.

    python launch/tpu.py create  --name=NAME --project=P --zone=Z --accelerator=v5litepod-8 [--spot]
    python launch/tpu.py install --name=NAME --project=P --zone=Z
    python launch/tpu.py train   --name=NAME --project=P --zone=Z --accelerator=v5litepod-8 \
        --workdir=gs://BUCKET/runs/x -- --config=configs/gpt2_124m.py
    python launch/tpu.py logs | stop | status | delete --name=NAME --project=P --zone=Z
    python launch/tpu.py supervise ... (create, install, train; re-create after preemption)

Every sub-command takes --dry-run (print the commands instead of running them) and --queued
(the TPU is a queued resource of the same name). Input is checked before any gcloud call.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time

if __package__ in (None, ""):  # run as `python launch/tpu.py`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gpt_jax import tpu_flags  # noqa: E402  (stdlib only)
from launch import gcloud, supervisor  # noqa: E402
from launch.tpu_types import (  # noqa: E402
    LaunchError,
    accelerator,
    check_env,
    check_name,
    check_project,
    check_train_args,
    check_workdir,
    check_zone,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIERS = ("on-demand", "spot", "preemptible", "reserved")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one LaunchError line (printed by main)."""

    def error(self, message: str):  # type: ignore[override]
        raise LaunchError(message)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    p.add_argument("--project", default=os.environ.get("CLOUDSDK_CORE_PROJECT"))
    p.add_argument("--zone", default=os.environ.get("CLOUDSDK_COMPUTE_ZONE"))
    p.add_argument("--queued", action="store_true", help="the TPU is a queued resource")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")


def _create_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--accelerator", required=True, help="e.g. v5litepod-8, v4-32, v6e-8")
    p.add_argument("--version", help="runtime version (default: the one for the accelerator)")
    tier = p.add_mutually_exclusive_group()
    for t in TIERS[1:]:
        tier.add_argument(f"--{t}", dest="tier", action="store_const", const=t,
                          help=f"{t} capacity (default: on-demand)")
    p.add_argument("--gcloud-arg", action="append", default=[],
                   help="extra flag for the create command, e.g. --gcloud-arg=--network=my-net")


def _train_flags(p: argparse.ArgumentParser, with_accelerator: bool = True) -> None:
    if with_accelerator:
        p.add_argument("--accelerator", required=True, help="e.g. v5litepod-8, v4-32")
    p.add_argument("--workdir", help="gs://bucket/path: checkpoints, metrics, TensorBoard")
    p.add_argument("--env", action="append", default=[], help="NAME=value for gpt-jax train")
    p.add_argument("--no-xla-overlap-flags", dest="xla_overlap_flags", action="store_false",
                   help="do not put gpt_jax/tpu_flags.py's collective-overlap flags into the "
                        "workers' LIBTPU_INIT_ARGS (by default they are; --env="
                        "LIBTPU_INIT_ARGS=... is appended after them and wins)")
    p.add_argument("--skip-write-check", action="store_true",
                   help="do not probe that --workdir is writable before starting")
    p.add_argument("train_args", nargs="*", help="after --: flags for `gpt-jax train`")


def _install_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default=REPO, help="local gpt_jax checkout to ship (default: this)")
    p.add_argument("--pip", dest="pip_spec", help="install this requirement instead of --source, "
                   "e.g. 'gpt_jax[tpu] @ git+https://github.com/ORG/gpt_jax'")
    p.add_argument("--python", default="3.11", help="Python version of the venv on the workers")
    p.add_argument("--jax", default=gcloud.JAX_TPU_VERSION,
                   help="jax[tpu] version installed on the workers (pinned)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="launch/tpu.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in [("create", "create the TPU VM or queued resource"),
                        ("install", "install gpt_jax[tpu] on every worker"),
                        ("train", "start gpt-jax train on every worker (--worker=all)"),
                        ("logs", "tail a worker's train log"),
                        ("stop", "SIGTERM gpt-jax train on every worker (it checkpoints)"),
                        ("status", "print the TPU state"),
                        ("delete", "delete the TPU VM or queued resource"),
                        ("supervise", "create+install+train, re-create after preemption")]:
        p = sub.add_parser(name, help=help_)
        _common(p)
        if name in ("create", "supervise"):
            _create_flags(p)
        if name == "create":
            p.add_argument("--wait", action="store_true", help="wait until the TPU is ready")
        if name in ("install", "supervise"):
            _install_flags(p)
        if name in ("train", "supervise"):
            _train_flags(p, with_accelerator=name == "train")
        if name == "logs":
            p.add_argument("--worker", default="0")
            p.add_argument("--lines", type=int, default=100)
            p.add_argument("--no-follow", dest="follow", action="store_false")
        if name == "supervise":
            p.add_argument("--max-restarts", type=int, default=20,
                           help="give up after this many restarts in a row without progress")
            p.add_argument("--poll-seconds", type=float, default=60.0)
            p.add_argument("--backoff-seconds", type=float, default=60.0,
                           help="first wait before a restart; doubles per restart without "
                                "progress, at most an hour")
            p.add_argument("--stuck-seconds", type=float, default=3600.0,
                           help="restart when worker 0 logs no new step for this long (0: never)")
            p.add_argument("--skip-install", action="store_true")
            p.add_argument("--delete-when-done", action="store_true")
    return parser


def parse(argv: list[str]) -> argparse.Namespace:
    """Parse and validate; raises LaunchError (before any gcloud call) on bad input."""
    args = build_parser().parse_args(argv)
    check_name(args.name)
    check_project(args.project)
    check_zone(args.zone)
    if getattr(args, "tier", None) == "preemptible" and args.queued:
        raise LaunchError("--preemptible is not available for queued resources; use --spot")
    if hasattr(args, "accelerator"):
        args.acc = accelerator(args.accelerator)
        if getattr(args, "version", None) is None:
            args.version = args.acc.runtime_version
    if hasattr(args, "train_args"):
        if "--dry-run" in args.train_args:
            raise LaunchError("--dry-run after -- would go to gpt-jax train; put --dry-run before --")
        args.workdir = check_workdir(args.workdir)
        args.env_vars = check_env(args.env)
        merged = tpu_flags.merge(args.acc.generation, args.env_vars.get(tpu_flags.ENV, ""),
                                 on=args.xla_overlap_flags)
        if merged:
            args.env_vars[tpu_flags.ENV] = merged
        check_train_args(args.train_args, args.acc)
    if getattr(args, "pip_spec", None) is None and hasattr(args, "source"):
        if not os.path.isfile(os.path.join(args.source, "setup.cfg")):
            raise LaunchError(f"--source={args.source!r} is not a gpt_jax checkout (no setup.cfg)")
    return args


def target(args: argparse.Namespace) -> gcloud.Target:
    return gcloud.Target(args.name, args.project, args.zone, args.queued)


def create_commands(args: argparse.Namespace) -> list[list[str]]:
    tier = args.tier or "on-demand"
    return [gcloud.create_cmd(target(args), args.acc.name, args.version, tier, args.gcloud_arg)]


# What a release ships: the installable tree, nothing else a checkout may hold (runs, logs,
# virtual environments). The tarball and the release hash are made from the same list.
SHIPPED = ("setup.cfg", "pyproject.toml", "README.md", "requirements", "gpt_jax", "configs",
           "launch")


def shipped_files(source: str) -> list[str]:
    """The files of SHIPPED under `source` (relative, sorted; caches and hidden files left out)."""
    found = []
    for entry in SHIPPED:
        path = os.path.join(source, entry)
        if os.path.isfile(path):
            found.append(entry)
        for root, dirs, files in os.walk(path):
            dirs[:] = [d for d in dirs if d != "__pycache__" and not d.startswith(".")]
            found += [os.path.relpath(os.path.join(root, f), source) for f in files
                      if not f.startswith(".") and not f.endswith(".pyc")]
    return sorted(found)


def release_version(args: argparse.Namespace) -> str:
    """A short hash of what gets installed (the shipped files, or the pip spec) and the pins:
    the same source installs once per TPU, a changed one installs beside it."""
    h = hashlib.sha256(f"{args.pip_spec}|{args.python}|{args.jax}".encode())
    if not args.pip_spec:
        for rel in shipped_files(args.source):
            h.update(rel.encode() + b"\0")
            with open(os.path.join(args.source, rel), "rb") as f:
                h.update(hashlib.sha256(f.read()).digest())
    return h.hexdigest()[:12]


def install_commands(args: argparse.Namespace) -> list[list[str]]:
    t, cmds = target(args), []
    version = release_version(args)
    if not args.pip_spec:  # a name per version and launcher: two launchers never share a file
        tarball = os.path.join(tempfile.gettempdir(),
                               f"gpt_jax-src-{version}-{os.getpid()}.tar.gz")
        cmds += [["tar", "-czf", tarball, "-C", args.source, *shipped_files(args.source)],
                 gcloud.scp_cmd(t, tarball, gcloud.tarball_name(version)), ["rm", "-f", tarball]]
    script = gcloud.install_script(version, args.pip_spec, args.python, args.jax)
    return cmds + [gcloud.ssh_cmd(t, "all", script)]


def train_command(args: argparse.Namespace) -> list[str]:
    script = gcloud.train_script(args.workdir, args.train_args, args.env_vars)
    return gcloud.ssh_cmd(target(args), "all", script)


def check_writable(args: argparse.Namespace, run: gcloud.Runner) -> None:
    """Write and remove a probe file in the gs:// workdir, before anything is created."""
    if args.skip_write_check:
        return
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write("gpt_jax write probe\n")
    try:
        for cmd in gcloud.write_probe_cmds(args.workdir, f.name):
            if run(cmd).returncode != 0:
                raise LaunchError(f"--workdir={args.workdir} is not writable with your "
                                  f"credentials ({cmd[2]} failed); check the bucket and its IAM")
    finally:
        os.unlink(f.name)


def run_all(cmds: list[list[str]], run: gcloud.Runner) -> int:
    for cmd in cmds:
        rc = run(cmd).returncode
        if rc != 0:
            print(f"tpu.py: command failed with exit code {rc}", file=sys.stderr)
            return rc
    return 0


def dispatch(args: argparse.Namespace, run: gcloud.Runner, sleep=time.sleep) -> int:
    t = target(args)
    c = args.command
    if c == "create":
        rc = run_all(create_commands(args), run)
        if rc == 0 and args.wait and not args.dry_run:
            rc = 0 if supervisor.wait_healthy(t, run, sleep, args.dry_run) else 1
        return rc
    if c == "install":
        return run_all(install_commands(args), run)
    if c == "train":
        check_writable(args, run)  # with --dry-run: prints the probe commands
        return run_all([train_command(args)], run)
    if c == "logs":
        return run_all([gcloud.ssh_cmd(t, args.worker, gcloud.logs_script(args.lines,
                                                                         args.follow))], run)
    if c == "stop":
        return run_all([gcloud.ssh_cmd(t, "all", gcloud.stop_script())], run)
    if c == "status":
        return run_all([gcloud.describe_cmd(t)], run)
    if c == "delete":
        return run_all([gcloud.delete_cmd(t)], run)
    if c == "supervise":
        return supervise(args, run, sleep)
    raise AssertionError(c)


def supervise(args: argparse.Namespace, run: gcloud.Runner, sleep) -> int:
    plan = supervisor.Plan(
        target=target(args), create=create_commands(args)[0],
        install=[] if args.skip_install else install_commands(args),
        train=train_command(args), workdir=args.workdir, hosts=args.acc.hosts,
        max_restarts=args.max_restarts, poll_seconds=args.poll_seconds,
        backoff_seconds=args.backoff_seconds, stuck_seconds=args.stuck_seconds,
        delete_when_done=args.delete_when_done)
    check_writable(args, run)
    if args.dry_run:
        supervisor.print_plan(plan, run)
        return 0
    return supervisor.supervise(plan, run, sleep)


def main(argv: list[str] | None = None, run: gcloud.Runner | None = None, sleep=time.sleep) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = parse(argv)
        # supervise must not hang on one call (a stuck ssh); install may take minutes
        limit = 1800.0 if args.command == "supervise" else None
        return dispatch(args, run or gcloud.make_runner(args.dry_run, timeout_seconds=limit),
                        sleep)
    except LaunchError as e:
        print(f"tpu.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
