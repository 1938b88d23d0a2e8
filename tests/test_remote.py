"""`gpt_jax.load`, `gpt-jax sample` and `gpt-jax eval` on a gs:// run directory.

A fake `gs` fsspec filesystem (served from a local folder) stands in for Cloud Storage, the way
etils.epath reaches it without TensorFlow. Orbax reads arrays through TensorStore's own GCS
driver, not fsspec, so the checkpoint readers get the gs:// path and read its local twin.
"""

from __future__ import annotations

import json
import shutil
import sys

import pytest
from absl import flags
from etils.epath import backend as epath_backend
from fsspec.implementations.local import LocalFileSystem

import gpt_jax
from gpt_jax import checkpoint
from gpt_jax.config import load_preset, typed
from gpt_jax.run import resolve_run
from gpt_jax.step import Trainer

pytestmark = pytest.mark.e2e  # every test here runs a training run or a process


REMOTE = "gs://bucket/run"
REMOTE_READS: list[str] = []  # the gs:// paths the checkpoint readers were given


def fake_gcs(root: str) -> LocalFileSystem:
    class FakeGCS(LocalFileSystem):
        protocol = ("gs", "gcs")

        @classmethod
        def _strip_protocol(cls, path):
            path = str(path)
            return (root + "/" + path[len("gs://"):]) if path.startswith("gs://") else path

    return FakeGCS()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, text_corpus) -> str:
    """A run directory with a step-0 checkpoint: config, tokenizer, params."""
    workdir = str(tmp_path_factory.mktemp("local") / "run")
    config = load_preset("tiny")
    config.data.update(source="text_files", paths=str(text_corpus),
                       cache_dir=str(tmp_path_factory.mktemp("cache")))
    config.train.eval_batches = 1
    config = resolve_run(config, workdir).config
    trainer = Trainer.for_config(typed(config), typed(config).mesh.make())
    saver = checkpoint.Checkpointer(workdir, config.checkpoint)
    saver.save(trainer.init_state(0), {"step": 0, "seed": 0}, typed(config).to_dict(), force=True)
    saver.close()
    return workdir


@pytest.fixture
def remote(run_dir, tmp_path, monkeypatch) -> str:
    """REMOTE holds a copy of `run_dir`; the checkpoint readers see only gs:// paths."""
    REMOTE_READS.clear()
    shutil.copytree(run_dir, tmp_path / "bucket" / "run")
    fs = fake_gcs(str(tmp_path))
    local_fs = epath_backend.fsspec_backend.fs
    monkeypatch.setattr(epath_backend._FileSystemSpecBackend, "fs",
                        lambda self, p: fs if str(p).startswith("gs://") else local_fs(p))
    for name in ("load_params", "load_config", "restore_tokenizer_files"):
        read = getattr(checkpoint, name)

        def local_twin(path, *args, _read=read, **kwargs):
            if str(path).startswith(REMOTE):
                REMOTE_READS.append(str(path))
                path = run_dir + str(path)[len(REMOTE):]
            return _read(path, *args, **kwargs)

        monkeypatch.setattr(checkpoint, name, local_twin)
    return REMOTE


def test_load_a_gs_run_directory(run_dir, remote):
    want = gpt_jax.load(run_dir).generate(["def "], max_new_tokens=4, temperature=0.0)
    lm = gpt_jax.load(remote)
    assert lm.generate(["def "], max_new_tokens=4, temperature=0.0) == want
    assert lm.generate(["def "], max_new_tokens=4, temperature=0.0) == gpt_jax.load(
        remote + "/checkpoints/0").generate(["def "], max_new_tokens=4, temperature=0.0)
    assert REMOTE_READS == [remote, remote + "/checkpoints/0"]  # params; the tokenizer: fsspec
    with pytest.raises(FileNotFoundError, match="gs://bucket/nothing does not exist"):
        gpt_jax.load("gs://bucket/nothing")


def run_command(module, argv: list[str]) -> None:
    flags.FLAGS(argv)
    try:
        module.main(argv[:1])
    finally:
        flags.FLAGS.unparse_flags()


def test_eval_and_sample_commands_on_a_gs_run_directory(run_dir, remote, capsys):
    if "workdir" in flags.FLAGS and "gpt_jax.commands.evaluate" not in sys.modules:
        delattr(flags.FLAGS, "workdir")  # commands.sample's (test_api); eval defines its own
    from gpt_jax.commands import evaluate, sample  # their flags: defined once per process

    results = []
    for workdir in (run_dir, remote):
        run_command(evaluate, ["gpt-jax eval", f"--workdir={workdir}"])
        results.append(json.loads(capsys.readouterr().out.strip().splitlines()[-1]))
    assert results[1]["workdir"] == remote and REMOTE_READS == [remote, remote]
    assert {k: v for k, v in results[1].items() if k != "workdir"} == pytest.approx(
        {k: v for k, v in results[0].items() if k != "workdir"})

    outputs = []
    for workdir in (run_dir, remote):
        run_command(sample, ["gpt-jax sample", f"--workdir={workdir}", "--prompt=def ",
                             "--max_new_tokens=4", "--temperature=0"])
        outputs.append(capsys.readouterr().out)
    assert "=== prompt 0, sample 0 ===" in outputs[1] and outputs[1] == outputs[0]
