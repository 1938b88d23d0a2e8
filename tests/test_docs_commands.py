"""Every command of the runbooks (docs/pretraining.md, docs/tpu.md) is one the CLI accepts.

Each ```bash block is read as a small shell script: `NAME=value` lines set variables, `$NAME`
is expanded, `\\` joins lines, `#` starts a comment. A `gpt-jax <command>` line is parsed by
that command's flags and its `--config` (file and overrides) resolved through the schema; a
`python launch/tpu.py ...` line by the launcher, and what follows its `--` as `gpt-jax train`'s
flags. Nothing runs: no process, no download, no TPU.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import sys

import pytest
from absl import flags

from gpt_jax import cli
from gpt_jax.config import typed
from test_cli import fresh_commands

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from launch import tpu  # noqa: E402

RUNBOOKS = ("docs/pretraining.md", "docs/tpu.md")
PLACEHOLDERS = {"PROJECT": "my-project", "ZONE": "us-west4-a", "BUCKET": "gs://my-bucket"}


def bash_lines(path: str) -> list[str]:
    """The logical lines of the file's ```bash blocks (continuations joined)."""
    with open(os.path.join(ROOT, path)) as f:
        blocks = re.findall(r"^```bash\n(.*?)^```", f.read(), re.M | re.S)
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()
            if line.strip()]


ASSIGNMENT = re.compile(r"([A-Za-z_]\w*)=(.*)")


def commands(path: str) -> list[list[str]]:
    """The argv of each line that is not only variable assignments, variables expanded.
    docs/tpu.md uses the names docs/pretraining.md sets, so that file is read first."""
    env, out = dict(PLACEHOLDERS), []
    for source in dict.fromkeys([RUNBOOKS[0], path]):
        out = []
        for line in bash_lines(source):
            expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)),
                              line)
            argv = shlex.split(expanded, comments=True)
            if argv and all(ASSIGNMENT.fullmatch(word) for word in argv):
                env.update(ASSIGNMENT.fullmatch(word).groups() for word in argv)
                continue
            while argv and ASSIGNMENT.fullmatch(argv[0]):  # NAME=value command ...
                argv = argv[1:]
            if argv:
                out.append(argv)
    return out


def check_gpt_jax(args: list[str]) -> None:
    """Parse `gpt-jax <args>` as the CLI would, then resolve its config; raises if either fails."""
    name, rest = args[0], args[1:]
    saved = sys.argv
    sys.argv = ["gpt-jax", name] + rest  # ml_collections reads the overrides from here
    try:
        with fresh_commands():
            cli._load_command(name, rest)
            cli._parse_flags([f"gpt-jax {name}"] + rest)
            cli._check_config_loaded()
            if "config" in flags.FLAGS:
                typed(flags.FLAGS.config)
    finally:
        sys.argv = saved


def runbook_commands() -> list[tuple[str, list[str]]]:
    """(file, argv) of each gpt-jax or launcher command, also one inside --command="gpt-jax ..."
    (xpk's)."""
    out = []
    for path in RUNBOOKS:
        for argv in commands(path):
            out += [(path, shlex.split(arg.split("=", 1)[1])) for arg in argv
                    if arg.startswith("--command=gpt-jax ")]
            if argv[0] == "gpt-jax" or argv[:2] == ["python", "launch/tpu.py"]:
                out.append((path, argv))
    return out


@pytest.mark.parametrize("path,argv", runbook_commands(),
                         ids=lambda x: x if isinstance(x, str) else " ".join(x[:3]))
def test_runbook_command_is_accepted(path, argv, monkeypatch):
    monkeypatch.delenv("CLOUDSDK_CORE_PROJECT", raising=False)
    monkeypatch.delenv("CLOUDSDK_COMPUTE_ZONE", raising=False)
    monkeypatch.chdir(ROOT)  # configs/ paths are relative to the checkout, as in the docs
    if argv[0] == "gpt-jax":
        check_gpt_jax(argv[1:])
        return
    args = tpu.parse(argv[2:])
    if getattr(args, "train_args", None):
        check_gpt_jax(["train", f"--workdir={args.workdir}", *args.train_args])


def test_the_runbooks_have_their_commands():
    """The reader above finds what the runbooks hold (it could silently find nothing)."""
    found = {path: [argv[:2] for p, argv in runbook_commands() if p == path] for path in RUNBOOKS}
    pretraining = found["docs/pretraining.md"]
    for command in (["gpt-jax", "prepare"], ["gpt-jax", "aot"], ["gpt-jax", "convert"],
                    ["gpt-jax", "sample"], ["python", "launch/tpu.py"]):
        assert command in pretraining, command
    assert len(found["docs/tpu.md"]) >= 13


def test_a_bad_runbook_command_fails_the_check():
    with pytest.raises(Exception, match="trian"):
        check_gpt_jax(["train", "--workdir=w", "--config=configs/tiny.py",
                       "--config.trian.num_steps=3"])
    with pytest.raises(Exception, match="remat_policy"):
        check_gpt_jax(["train", "--workdir=w", "--config=configs/tiny.py",
                       "--config.model.remat_policy=some"])
    with pytest.raises(Exception, match="bogus"):
        check_gpt_jax(["prepare", "--store=s", "--bogus=1"])


def test_the_download_commands_are_those_the_hf_extra_installs():
    """The runbook downloads with `hf` (huggingface_hub's CLI, which transformers brings);
    `huggingface-cli` is gone from current releases."""
    used = {argv[0] for path in RUNBOOKS for argv in commands(path)}
    assert "huggingface-cli" not in used and "hf" in used
    scripts = {e.name for e in importlib.metadata.entry_points(group="console_scripts")
               if e.dist is not None and e.dist.name.replace("_", "-") == "huggingface-hub"}
    if not scripts:
        pytest.skip("huggingface_hub is not installed (the hf extra)")
    assert "hf" in scripts
