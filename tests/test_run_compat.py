"""A run directory written before the typed config (main at 0077710) still loads, samples and
resumes exactly: tests/data/run_0077710 is that run stopped at step 10 of 20 (tiny config,
byte tokenizer, the store in tests/data/store_0077710); run_0077710_expected.json holds what
that code printed when sampling from it, and the losses of its own steps 11-20 and its params'
sums and norms after them."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import run_on_one_device

pytestmark = pytest.mark.e2e  # every test here runs a training run or a process


DATA = pathlib.Path(__file__).parent / "data"
ROOT = DATA.parent.parent
EXPECTED = json.loads((DATA / "run_0077710_expected.json").read_text())


def sample(workdir: str, *flags: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "gpt_jax.cli", "sample", f"--workdir={workdir}",
                           "--prompt=def ", "--max_new_tokens=24", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def test_an_old_run_samples_what_it_sampled_then():
    run = str(DATA / "run_0077710")
    assert sample(run, "--temperature=0", "--num_samples=1") == EXPECTED["greedy"]
    assert sample(run, "--temperature=0.8", "--top_k=40", "--num_samples=2",
                  "--seed=3") == EXPECTED["sampled"]


RESUME = """
import json, sys
import jax, numpy as np
from gpt_jax import checkpoint, train
from gpt_jax.config import from_json
workdir, store = sys.argv[1], sys.argv[2]
config = from_json(open(workdir + "/config.json").read())
config.data.store = store  # where the run's store lies now
train.train(config, workdir)
_, params = checkpoint.load_params(workdir)
leaves = [np.asarray(leaf, np.float64) for leaf in jax.tree.leaves(jax.device_get(params))]
print(json.dumps([[float(x.sum()), float(np.sqrt((x * x).sum()))] for x in leaves]))
"""


def test_an_old_run_resumes_exactly(tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(DATA / "run_0077710", workdir)
    stats = json.loads(run_on_one_device(RESUME, str(workdir),
                                         str(DATA / "store_0077710")).splitlines()[-1])
    events = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    losses = {str(e["step"]): e["loss"] for e in events if "loss" in e and e["step"] > 10}
    assert losses == EXPECTED["losses"]
    assert [e["eval_loss"] for e in events if e["step"] == 20 and "eval_loss" in e] == [
        EXPECTED["eval_loss_20"]]
    # the last update's bytes differ between CPUs (its losses do not): sums and norms, tightly
    want = np.array(EXPECTED["params_sum_and_norm_step20"])
    got = np.array(stats)
    assert got.shape == want.shape
    np.testing.assert_allclose(got[:, 1], want[:, 1], rtol=1e-5)
    assert (abs(got[:, 0] - want[:, 0]) <= 1e-5 * want[:, 1]).all(), (got[:, 0], want[:, 0])


def test_the_fixture_is_what_the_note_says():
    config = json.loads((DATA / "run_0077710" / "config.json").read_text())
    assert config["train"]["num_steps"] == 20 and config["data"]["tokenizer"] == "byte"
    assert sorted(os.listdir(DATA / "run_0077710" / "checkpoints")) == ["10"]
    manifest = json.loads((DATA / "store_0077710" / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            data = (DATA / "store_0077710" / "shards" / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert np.isfinite(EXPECTED["eval_loss_20"])
