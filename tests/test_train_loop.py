"""The training loop end to end: exact resume, SIGTERM/SIGKILL, corrupt checkpoints, reshard
on load, fine-tuning. Every comparison is against an uninterrupted run of the same config."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import tiny_run_config
from gpt_jax import checkpoint, train
from gpt_jax.config import to_json, typed
from gpt_jax.errors import ConfigMismatchError
from gpt_jax.metrics import read_metrics
from gpt_jax.sharding import MeshConfig

pytestmark = pytest.mark.e2e  # every test here runs a training run or a process


STEPS = 16


def config_for(tmp_path, text_corpus, **train_overrides):
    overrides = {"num_steps": STEPS, "log_every": 2, "eval_every": 8, **train_overrides}
    config = tiny_run_config(text_corpus, tmp_path.parent / "shared_cache", **overrides)
    config.checkpoint.update(every=4, keep=3)
    return config


def losses_by_step(workdir):
    return {e["step"]: e["loss"] for e in read_metrics(str(workdir)) if "loss" in e}


def final_params(workdir):
    return jax.device_get(checkpoint.load_params(str(workdir))[1])


def assert_trees_equal(a, b):
    flat_a, tree_a = jax.tree.flatten(a)
    flat_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(flat_a, flat_b):
        np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, text_corpus):
    """The uninterrupted reference: STEPS steps in one go."""
    workdir = tmp_path_factory.mktemp("straight") / "run"
    train.train(config_for(workdir, text_corpus), str(workdir))
    return workdir


def test_straight_run_writes_a_run_directory(straight_run):
    for name in ("config.json", "metrics.jsonl", "tokenizer", "checkpoints", "tensorboard"):
        assert os.path.exists(straight_run / name), name
    steps = sorted(int(s) for s in os.listdir(straight_run / "checkpoints") if s.isdigit())
    assert steps == [8, 12, 16]  # every 4, keep 3
    events = read_metrics(str(straight_run))
    assert [e["step"] for e in events if "eval_loss" in e] == [8, 16]
    assert sorted(losses_by_step(straight_run)) == list(range(2, STEPS + 1, 2))


def test_stop_and_resume_is_exact(tmp_path, text_corpus, straight_run, monkeypatch):
    workdir = tmp_path / "run"
    config = config_for(workdir, text_corpus)
    # Stop as a SIGTERM would, after step 6 (not a checkpoint step): it must save step 6.
    monkeypatch.setattr(train.StopSignal, "should_stop",
                        lambda self, step: setattr(self, "received", "SIGTERM") or step == 6)
    train.train(config, str(workdir))
    assert 6 in checkpoint.Checkpointer(str(workdir), config.checkpoint).manager.all_steps()
    monkeypatch.undo()
    train.train(config_for(workdir, text_corpus), str(workdir))
    assert losses_by_step(workdir) == losses_by_step(straight_run)
    assert_trees_equal(final_params(workdir), final_params(straight_run))


def test_resume_restores_the_rng_with_dropout(tmp_path, text_corpus, monkeypatch):
    """With dropout on, a resumed run equals an uninterrupted one only if the step's RNG is
    restored from the checkpoint (every other resume test runs with dropout 0)."""
    def dropout_config(workdir):
        config = config_for(workdir, text_corpus, num_steps=8, eval_every=8)
        config.model.dropout = 0.2
        return config

    straight = tmp_path / "straight"
    train.train(dropout_config(straight), str(straight))
    workdir = tmp_path / "run"
    monkeypatch.setattr(train.StopSignal, "should_stop",
                        lambda self, step: setattr(self, "received", "SIGTERM") or step == 6)
    train.train(dropout_config(workdir), str(workdir))
    monkeypatch.undo()
    train.train(dropout_config(workdir), str(workdir))
    assert losses_by_step(workdir) == losses_by_step(straight)
    assert_trees_equal(final_params(workdir), final_params(straight))


def run_cli(workdir, config_path, extra=()):
    args = [sys.executable, "-m", "gpt_jax.cli", "train", f"--config={config_path}",
            f"--workdir={workdir}", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})


def write_config_file(tmp_path, config) -> str:
    """A config file whose get_config() returns exactly `config` (for the CLI)."""
    path = tmp_path / "config.py"
    path.write_text("from gpt_jax import config as c\n\ndef get_config():\n"
                    f"    return c.from_json({json.dumps(to_json(config))})\n")
    return str(path)


def wait_for(predicate, proc, timeout=120.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    raise TimeoutError("the training process did not get there in time")


def test_sigkill_after_checkpoint_then_resume_is_exact(tmp_path, text_corpus):
    config = config_for(tmp_path, text_corpus, num_steps=400, log_every=4, eval_every=400)
    config.checkpoint.update(every=20, keep=2, async_save=False)
    ref = tmp_path / "ref"
    workdir = tmp_path / "killed"
    path = write_config_file(tmp_path, config)
    proc = run_cli(workdir, path)
    ckpts = workdir / "checkpoints"
    killed = wait_for(lambda: ckpts.exists() and any(s.isdigit() for s in os.listdir(ckpts)),
                      proc)
    if killed:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = max(losses_by_step(workdir), default=0)
    assert killed and done < 400, "the run ended before it could be killed"
    resumed = run_cli(workdir, path)
    assert resumed.wait() == 0, resumed.stdout.read()[-2000:]
    train.train(config, str(ref))
    assert losses_by_step(workdir) == losses_by_step(ref)
    assert_trees_equal(final_params(workdir), final_params(ref))


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path, text_corpus):
    config = config_for(tmp_path, text_corpus, num_steps=100_000, log_every=5,
                        eval_every=100_000)
    config.checkpoint.update(every=100_000)
    workdir = tmp_path / "run"
    proc = run_cli(workdir, write_config_file(tmp_path, config))
    assert wait_for(lambda: (workdir / "metrics.jsonl").exists(), proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-2000:]
    assert "SIGTERM: saved a checkpoint at step" in out
    steps = checkpoint.Checkpointer(str(workdir), config.checkpoint).manager.all_steps()
    assert len(steps) == 1 and 0 < steps[0] < 100_000


def test_corrupt_newest_checkpoint_falls_back(tmp_path, straight_run):
    import shutil

    workdir = tmp_path / "copy"
    shutil.copytree(straight_run, workdir)
    for root, _, files in os.walk(workdir / "checkpoints" / "16" / "params"):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"garbage")
    from gpt_jax.config import from_json
    from gpt_jax.step import Trainer

    config = from_json(open(workdir / "config.json").read())
    trainer = Trainer.for_config(typed(config), typed(config).mesh.make())
    state, meta = checkpoint.Checkpointer(str(workdir), config.checkpoint).restore_latest(
        trainer.abstract_state())
    assert meta["step"] == 12 and int(state["step"]) == 12
    expected = checkpoint.load_params(str(straight_run / "checkpoints" / "12"))[1]
    assert_trees_equal(jax.device_get(state["params"]), jax.device_get(expected))


def test_load_params_onto_another_mesh(straight_run):
    reference = final_params(straight_run)
    mesh = MeshConfig.from_dict({"data": 2, "fsdp": 2, "tensor": 2}).make()
    _, params = checkpoint.load_params(str(straight_run), mesh=mesh)
    kernel = params["h_0"]["mlp"]["fc"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert kernel.addressable_shards[0].data.shape == (kernel.shape[0] // 2,
                                                       kernel.shape[1] // 2)
    assert_trees_equal(jax.device_get(params), reference)


def test_finetune_starts_from_the_parent(tmp_path, text_corpus, straight_run):
    child = tmp_path / "child"
    config = config_for(tmp_path, text_corpus, num_steps=4, init_from=str(straight_run))
    train.train(config, str(child))
    parent_eval = [e for e in read_metrics(str(straight_run)) if "eval_loss" in e][-1]
    child_events = read_metrics(str(child))
    child_start = [e for e in child_events if e["step"] == 0 and "eval_loss" in e]
    assert child_start and child_start[0]["eval_loss"] == pytest.approx(
        parent_eval["eval_loss"], rel=1e-6)
    assert sorted(losses_by_step(child)) == [2, 4]  # a fresh schedule: steps from 0


@pytest.mark.parametrize("change", ["seed", "global_batch_size", "corpus"])
def test_a_resume_that_would_change_the_data_stream_is_refused(tmp_path, text_corpus,
                                                               straight_run, change):
    import shutil

    workdir = tmp_path / "run"
    shutil.copytree(straight_run, workdir)
    config = config_for(workdir, text_corpus, num_steps=STEPS + 4)
    if change == "seed":
        config.train.seed += 1
    elif change == "global_batch_size":
        config.train.global_batch_size *= 2
    else:
        other = tmp_path / "other_corpus"
        other.mkdir()
        (other / "a.txt").write_text((text_corpus / os.listdir(text_corpus)[0]).read_text())
        config.data.paths = str(other)
    with pytest.raises(ConfigMismatchError, match="would change its data stream") as e:
        train.train(config, str(workdir))
    expected = {"seed": "train.seed", "global_batch_size": "train.global_batch_size",
                "corpus": "the training data"}[change]
    assert expected in str(e.value)


def test_two_training_processes_on_one_run_directory(tmp_path, text_corpus):
    config = config_for(tmp_path, text_corpus, num_steps=2000, log_every=50, eval_every=2000)
    path = write_config_file(tmp_path, config)
    workdir = tmp_path / "run"
    first = run_cli(workdir, path)
    try:
        assert wait_for(lambda: (workdir / "run.lock").exists(), first, timeout=300)
        second = run_cli(workdir, path)
        out, _ = second.communicate(timeout=300)
        assert second.returncode == 1, out
        line = out.strip().splitlines()[-1]
        assert line.startswith("gpt-jax train: the run directory") and \
            f"in use by pid {first.pid} on" in line, out
        assert json.loads((workdir / "status.json").read_text())["state"] == "running"
    finally:
        first.send_signal(signal.SIGTERM)
        first.communicate(timeout=300)
    assert first.returncode == 0
    assert not (workdir / "run.lock").exists()
