"""The command line as a user meets it: per-command --help, one-line errors, resume checks.

Most cases run `cli.run` in this process, each with the command modules imported afresh (absl
flags are process-global); two end-to-end runs are subprocesses, as `make train` runs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
from absl import flags
from absl import logging as absl_logging

from conftest import write_corpus
from gpt_jax import cli
from gpt_jax import train as train_lib
from gpt_jax.config import ConfigError

pytestmark = pytest.mark.e2e  # every test here runs a training run or a process


ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = flags.FLAGS
DISTRIBUTED = {"coordinator_address", "num_processes", "process_id"}

# command -> the flags its --help must list (and no others of ours)
OWN_FLAGS = {
    "prepare": {"config", "store", "num_workers", "wait_s"} | DISTRIBUTED,
    "train": {"config", "workdir"} | DISTRIBUTED,
    "eval": {"workdir", "eval_batches", "tasks", "task_examples", "batch_rows",
             "output"} | DISTRIBUTED,
    "sample": {"workdir", "prompt", "prompt_file", "max_new_tokens", "temperature", "top_k",
               "top_p", "num_samples", "seed", "truncate_prompt", "shard", "logprobs"},
    "aot": {"config", "topology", "preset", "mesh", "batch_size", "dtype", "remat_policy",
            "attention_impl", "scan_layers", "decode", "decode_batch_size", "serve_slots", "json_out",
            "xla_overlap_flags", "search", "tokens_per_step", "budget_s", "workers", "top",
            "published"},
    "sweep": {"config", "workdir", "only", "set", "list"} | DISTRIBUTED,
    "compare": {"out", "baseline", "smoothing", "target_loss"},
    "convert": {"from", "to", "hf_dir", "workdir", "vocab_multiple"},
    "bench": set(),
    "bench train": {"config", "preset", "batch_size", "seq_len", "attention_impl",
                    "remat_policy", "scan_layers", "dtype", "steps", "warmup", "json_out",
                    "torch_baseline", "loop_steps", "rounds"},
}


def _is_command_module(name: str) -> bool:
    return (name.startswith(("gpt_jax.commands.", "gpt_jax.bench."))
            and name != "gpt_jax.commands.common")


def _drop_our_flags() -> None:
    names = {flag.name for module, defined in FLAGS.flags_by_module_dict().items()
             for flag in defined
             if module.startswith("gpt_jax.") or flag.name.startswith("config.")}
    for name in names:
        if name in FLAGS:
            delattr(FLAGS, name)


@contextlib.contextmanager
def fresh_commands():
    """Import command modules afresh (their flags with them); put everything back after."""
    saved_flags = {m: list(fs) for m, fs in FLAGS.flags_by_module_dict().items()
                   if m.startswith("gpt_jax.")}
    saved_modules = {k: v for k, v in sys.modules.items() if _is_command_module(k)}
    verbosity = absl_logging.get_verbosity()
    absl_level = logging.getLogger("absl").level  # set_verbosity(-1) would leave WARNING
    _drop_our_flags()
    for name in saved_modules:
        del sys.modules[name]
    try:
        yield
    finally:
        _drop_our_flags()
        for name in [k for k in sys.modules if _is_command_module(k)]:
            parent, _, child = name.rpartition(".")
            if getattr(sys.modules.get(parent), child, None) is sys.modules[name]:
                delattr(sys.modules[parent], child)  # else `from pkg import it` finds it
            del sys.modules[name]
        sys.modules.update(saved_modules)
        for name, module in saved_modules.items():
            parent, _, child = name.rpartition(".")
            setattr(sys.modules[parent], child, module)
        for module, defined in saved_flags.items():
            for flag in defined:
                FLAGS[flag.name] = flag
                FLAGS.register_flag_by_module(module, flag)
        FLAGS.unparse_flags()
        absl_logging.set_verbosity(verbosity)
        logging.getLogger("absl").setLevel(absl_level)


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str


@pytest.fixture
def gpt_jax(capfd, monkeypatch):
    def run(*args: str, **env: str) -> Result:
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        capfd.readouterr()
        with fresh_commands():
            try:
                cli.run(["gpt-jax", *args])
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capfd.readouterr()
        return Result(code, out, err)
    monkeypatch.setenv("GPT_JAX_DEBUG", "")
    return run


def listed_flags(help_text: str) -> set[str]:
    return set(re.findall(r"^  --(\w+)  \(", help_text, flags=re.MULTILINE)) - {"verbose"}


@pytest.mark.parametrize("command", list(OWN_FLAGS))
def test_help_lists_the_commands_own_flags(gpt_jax, command):
    words = command.split()
    result = gpt_jax(*words, "--help")
    assert result.code == 0 and result.err == ""
    assert result.out.startswith(f"usage: gpt-jax {words[0]}")
    assert listed_flags(result.out) == OWN_FLAGS[command]
    assert cli.COMMANDS[words[0]][1] in result.out
    if command in ("train", "eval", "sweep"):
        assert "--workdir  (required)" in result.out
    assert gpt_jax("help", command.split()[0]).out == gpt_jax(words[0], "--help").out


def test_train_help_explains_config_overrides(gpt_jax):
    out = gpt_jax("train", "-h").out
    assert "--config  (default: " in out and "configs/default.py)" in out
    assert "--config.<section>.<field>=<value>" in out and "gpt_jax/config.py" in out


def test_top_level_help_and_unknown_command(gpt_jax):
    top = gpt_jax("--help")
    assert top.code == 0 and "usage: gpt-jax <command>" in top.out and "--verbose" in top.out
    bad = gpt_jax("trian")
    assert bad.code == 2 and bad.err == (f"gpt-jax: unknown command 'trian'; one of: "
                                         f"{', '.join(cli.available())}\n")


# (command line, exit status, what the one stderr line must name)
BAD_INPUTS = [
    # unknown flag
    ("train --workdir=W --bogus=1", 2, "--bogus"),
    ("eval --workdir=W --bogus=1", 2, "--bogus"),
    ("sample --workdir=W --nope", 2, "--nope"),
    ("aot --topology=v5e-8 --bogus=1", 2, "--bogus"),
    ("sweep --config=X --workdir=W --bogus=1", 2, "--bogus"),
    ("compare W --bogus=1", 2, "--bogus"),
    ("convert --from=hf --bogus=1", 2, "--bogus"),
    ("bench train --bogus=1", 2, "--bogus"),
    # unknown config key
    ("train --workdir=W --config.train.stepz=3", 2, "train.stepz"),
    ("aot --topology=v5e-8 --config.model.nembd=8", 2, "model.nembd"),
    ("bench train --config.trian.steps=1", 2, "trian.steps"),
    # missing files
    ("train --workdir=W --config=configs/nope.py", 2, "configs/nope.py"),
    ("train --workdir=W --config=configs/tiny.py --config.data.source=text_files "
     "--config.data.paths=MISSING/a.txt", 1, "MISSING/a.txt"),
    ("sweep --config=MISSING/s.py --workdir=W", 1, "MISSING/s.py"),
    ("convert --from=hf --hf_dir=MISSING --workdir=W", 1, "MISSING"),
    # missing or wrong workdir
    ("train", 2, "--workdir"),
    ("eval", 2, "--workdir"),
    ("sample", 2, "--workdir"),
    ("eval --workdir=MISSING", 1, "MISSING"),
    ("sample --workdir=MISSING", 1, "MISSING"),
    ("compare MISSING", 1, "MISSING"),
    ("sweep --config=configs/ablations/position.py", 2, "--workdir"),
    # out of range / not allowed
    ("train --workdir=W --config.train.num_steps=-3", 2, "-3"),
    ("train --workdir=W --config.model.n_head=5", 2, "n_head=5"),
    ("eval --workdir=W --eval_batches=0", 2, "--eval_batches=0"),
    ("compare W --smoothing=1.5", 2, "1.5"),
    ("compare W --target_loss=-1", 2, "--target_loss=-1.0"),
    ("compare W --target_loss=inf", 2, "--target_loss=inf"),
    ("aot --topology=v9-1", 1, "v9-1"),
    ("aot --topology=v5e-8 --mesh=1,2", 2, "1,2"),
    ("aot", 2, "--topology"),
    ("aot --published --topology=v5e-8", 2, "--topology has no meaning for --published"),
    ("aot --published --config.model.n_embd=8", 2, "--config.model.n_embd has no meaning"),
    ("bench nope", 2, "nope"),
    ("convert --from=xx", 2, "xx"),
    ("sweep --config=X --workdir=W --set=novalue", 2, "novalue"),
    ("train --workdir=W extra", 2, "extra"),
    # wrong types
    ("train --workdir=W --config.train.num_steps=abc", 2, "abc"),
    ("eval --workdir=W --eval_batches=x", 2, "x"),
    ("sample --workdir=W --max_new_tokens=ten", 2, "ten"),
    ("compare W --smoothing=high", 2, "high"),
    ("bench train --steps=many", 2, "many"),
    ("bench serve --bench_new_tokens_min=300", 2, "--bench_new_tokens_min=300 must be in [1,"),
    ("bench evals --bench_examples=0 --bench_core=B", 2, "--bench_core needs --bench_tpu"),
    ("aot --topology=v5e-8 --batch_size=1.5", 2, "1.5"),
]


@pytest.mark.parametrize("line, code, names", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_is_one_line_naming_the_value(gpt_jax, tmp_path, monkeypatch, line, code,
                                                 names):
    monkeypatch.setenv("GPT_JAX_CACHE", str(tmp_path / "cache"))
    missing = str(tmp_path / "missing")
    args = [a.replace("MISSING", missing).replace("=W", f"={tmp_path / 'w'}")
            .replace("=X", f"={tmp_path / 'x.py'}") for a in line.split()]
    args = [str(tmp_path / "w") if a == "W" else a for a in args]
    result = gpt_jax(*args)
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    assert result.code == code, result.err
    assert lines[0].startswith(f"gpt-jax {args[0]}: ")
    assert names.replace("MISSING", missing) in lines[0]
    assert "Traceback" not in result.err + result.out


def test_verbose_and_debug_show_the_traceback_unexpected_errors_always(gpt_jax, monkeypatch,
                                                                         tmp_path):
    bad = ("train", f"--workdir={tmp_path}", "--config.train.num_steps=-3")
    with pytest.raises(ConfigError, match="num_steps=-3"):
        gpt_jax(*bad, "--verbose")
    with pytest.raises(ConfigError, match="num_steps=-3"):
        gpt_jax(*bad, GPT_JAX_DEBUG="1")
    assert gpt_jax(*bad, GPT_JAX_DEBUG="0").code == 2

    def a_bug(config, workdir, explicit=frozenset()):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train_lib, "train", a_bug)
    with pytest.raises(ZeroDivisionError, match="a bug"):
        gpt_jax("train", f"--workdir={tmp_path}")


# --- end to end: a tiny run the way `make train` runs it, then resuming it ----------------


def _tree_digest(folder: pathlib.Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """configs/tiny.py for 10 steps (checkpoints at 5 and 10) through the real CLI."""
    root = tmp_path_factory.mktemp("cli_run")
    corpus = write_corpus(root / "corpus")
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "GPT_JAX_CACHE": str(root / "cache")}
    env.pop("GPT_JAX_DEBUG", None)
    base = [sys.executable, "-m", "gpt_jax.cli", "train", "--config=configs/tiny.py",
            "--config.data.source=text_files", f"--config.data.paths={corpus}",
            "--config.train.num_steps=10", "--config.checkpoint.every=5"]
    proc = subprocess.run(base + [f"--workdir={root / 'run'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    return root, base, env, proc


def _warning_lines(text: str) -> list[str]:
    return [line for line in text.splitlines()
            if re.match(r"[WE]\d{4} ", line) or re.search(r"warn", line, re.IGNORECASE)]


def test_a_clean_run_prints_no_warnings(tiny_run):
    root, _, _, proc = tiny_run
    assert proc.returncode == 0, proc.stderr
    assert _warning_lines(proc.stdout + proc.stderr) == []
    assert "Traceback" not in proc.stderr
    assert re.search(r"^prepare text_files \(2 of 2 shards\): 100.0% of [\d,]+ B, ",
                     proc.stdout, re.MULTILINE)
    assert "step 10/10" in proc.stdout
    assert sorted(os.listdir(root / "run" / "checkpoints")) == ["10", "5"]


def test_resume_with_another_model_names_the_field_and_touches_nothing(tiny_run, gpt_jax,
                                                                         monkeypatch):
    root, base, env, _ = tiny_run
    monkeypatch.setenv("GPT_JAX_CACHE", env["GPT_JAX_CACHE"])
    workdir = root / "run"
    before = _tree_digest(workdir)
    result = gpt_jax(*base[3:], f"--workdir={workdir}", "--config.model.n_embd=64")
    assert result.code == 1
    assert result.err.splitlines() == [result.err.strip()]
    assert "model.n_embd=32 (the config says 64)" in result.err
    assert f"--config.train.init_from={workdir}" in result.err
    assert "unreadable" not in result.err
    after = _tree_digest(workdir)
    status = json.loads((workdir / "status.json").read_text())  # how the attempt ended
    assert status["state"] == "failed" and "model.n_embd=32" in status["error"]
    assert {k: v for k, v in after.items() if k != "status.json"} == {
        k: v for k, v in before.items() if k != "status.json"}


def test_corrupt_newest_checkpoint_falls_back_with_one_warning(tiny_run):
    root, base, env, _ = tiny_run
    workdir = root / "corrupt"
    shutil.copytree(root / "run", workdir)
    for blob in (workdir / "checkpoints" / "10" / "params").rglob("d/*"):
        if blob.is_file():
            blob.unlink()  # the arrays' data is gone; the metadata still says they exist
    proc = subprocess.run(base + [f"--workdir={workdir}"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "Event loop is closed" not in proc.stderr
    warnings = _warning_lines(proc.stdout + proc.stderr)
    assert len(warnings) == 1 and "checkpoint 10" in warnings[0], warnings
    assert "trying step 5" in warnings[0]
    assert "resuming at step 5 of 10" in proc.stdout and "step 10/10" in proc.stdout
