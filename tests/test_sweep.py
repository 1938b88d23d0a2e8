"""Sweeps: planning and bad input, running, skipping, resuming after a kill (fake training),
plus one real tiny sweep through gpt_jax.train."""

import dataclasses
import glob
import json
import os
import signal
import subprocess
import sys

import pytest

from gpt_jax import config as config_lib
from gpt_jax import sweep as sweep_lib
from gpt_jax.config import typed
from gpt_jax.sweep import Sweep, SweepError

pytestmark = pytest.mark.e2e  # every test here runs a training run or a process


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Killed(BaseException):
    """Stands in for the process dying (not an Exception: the sweep must not catch it)."""


class FakeTrain:
    """Writes config.json and one metrics event per step, resuming after the last written step.

    die_at={(variant, seed): step} dies once at that step; fail={(variant, seed)} raises;
    sigkill=True makes 'dying' a real SIGKILL of this process.
    """

    def __init__(self, die_at=None, fail=(), sigkill=False, stop_at=None):
        self.calls, self.die_at, self.fail = [], dict(die_at or {}), set(fail)
        self.sigkill, self.stop_at = sigkill, dict(stop_at or {})

    def __call__(self, config, workdir):
        key = (os.path.basename(os.path.dirname(workdir)), config.train.seed)
        start = sweep_lib.last_step(workdir)
        self.calls.append((os.path.relpath(workdir, os.path.dirname(os.path.dirname(workdir))),
                           start))
        if key in self.fail:
            raise RuntimeError("boom: loss diverged\nsecond line")
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))
        t = config.train
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            for step in range(start + 1, t.num_steps + 1):
                if self.die_at.get(key) == step:
                    del self.die_at[key]
                    f.flush()
                    if self.sigkill:
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise Killed(f"killed at step {step}")
                if self.stop_at.get(key) == step:
                    del self.stop_at[key]
                    return {}  # like train() after SIGTERM: saved and returned early
                f.write(json.dumps({"step": step, "loss": 3.0 - 0.1 * step}) + "\n")
                if step % t.eval_every == 0 or step == t.num_steps:
                    f.write(json.dumps({"step": step, "eval_loss": 3.0 - 0.1 * step}) + "\n")
        return {}


def small_sweep(**changes) -> Sweep:
    sweep = Sweep(base="tiny", seeds=[0, 1],
                  variants=[("a", {"model.norm": "layernorm"}), ("b", {"model.norm": "rmsnorm"})],
                  overrides={"train.num_steps": 6, "train.eval_every": 3, "train.log_every": 1})
    return dataclasses.replace(sweep, **changes)


def states(workdir) -> dict:
    with open(os.path.join(workdir, "sweep.json")) as f:
        summary = json.load(f)
    return {f"{m['variant']}/seed_{m['seed']}": m["state"] for m in summary["members"]}


def test_plan_orders_members_seed_major_and_sets_seed(tmp_path):
    members = sweep_lib.plan(small_sweep(), str(tmp_path))
    assert [m.key for m in members] == ["a/seed_0", "b/seed_0", "a/seed_1", "b/seed_1"]
    assert [m.config.train.seed for m in members] == [0, 0, 1, 1]
    assert [m.config.model.norm for m in members] == ["layernorm", "rmsnorm"] * 2
    assert all(m.config.train.num_steps == 6 for m in members)
    assert members[3].workdir == os.path.join(str(tmp_path), "b", "seed_1")


def test_sweep_runs_every_member_and_a_rerun_starts_nothing(tmp_path):
    fake = FakeTrain()
    summary = sweep_lib.run_sweep(small_sweep(), str(tmp_path), train_fn=fake, log=lambda s: 0)
    assert fake.calls == [("a/seed_0", 0), ("b/seed_0", 0), ("a/seed_1", 0), ("b/seed_1", 0)]
    assert summary["counts"]["done"] == 4
    assert set(states(tmp_path).values()) == {"done"}
    with open(tmp_path / "b" / "seed_1" / "config.json") as f:
        saved = json.load(f)
    assert (saved["model"]["norm"], saved["train"]["seed"]) == ("rmsnorm", 1)

    again = FakeTrain()
    sweep_lib.run_sweep(small_sweep(), str(tmp_path), train_fn=again, log=lambda s: 0)
    assert again.calls == []
    assert set(states(tmp_path).values()) == {"done"}


def test_killed_member_resumes_and_only_missing_members_run(tmp_path):
    fake = FakeTrain(die_at={("a", 1): 4})
    with pytest.raises(Killed):
        sweep_lib.run_sweep(small_sweep(), str(tmp_path), train_fn=fake, log=lambda s: 0)
    assert states(tmp_path) == {"a/seed_0": "done", "b/seed_0": "done",
                                "a/seed_1": "interrupted", "b/seed_1": "pending"}
    again = FakeTrain()
    sweep_lib.run_sweep(small_sweep(), str(tmp_path), train_fn=again, log=lambda s: 0)
    assert again.calls == [("a/seed_1", 3), ("b/seed_1", 0)]  # resumed after its last step
    assert set(states(tmp_path).values()) == {"done"}
    steps = [e["step"] for e in map(json.loads, open(tmp_path / "a" / "seed_1" / "metrics.jsonl"))]
    assert sorted(set(steps)) == [1, 2, 3, 4, 5, 6]


def _child(workdir: str) -> None:
    """Runs in a subprocess: SIGKILLs itself in the middle of member b/seed_0."""
    sweep_lib.run_sweep(small_sweep(), workdir, train_fn=FakeTrain(die_at={("b", 0): 5},
                                                                   sigkill=True))


def test_sigkill_mid_member_then_rerun_finishes_only_what_was_missing(tmp_path):
    code = (f"import sys; sys.path.insert(0, {os.path.join(ROOT, 'tests')!r}); "
            f"import test_sweep; test_sweep._child({str(tmp_path)!r})")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert states(tmp_path)["b/seed_0"] == "running"  # what the dead process left behind
    members = sweep_lib.plan(small_sweep(), str(tmp_path))
    assert sweep_lib.member_state(members[1])["state"] == "interrupted"  # its pid is gone

    again = FakeTrain()
    sweep_lib.run_sweep(small_sweep(), str(tmp_path), train_fn=again, log=lambda s: 0)
    assert again.calls == [("b/seed_0", 4), ("a/seed_1", 0), ("b/seed_1", 0)]
    assert set(states(tmp_path).values()) == {"done"}


def test_failed_member_is_recorded_others_go_on_and_a_rerun_retries_it(tmp_path):
    fake = FakeTrain(fail={("b", 0)})
    summary = sweep_lib.run_sweep(small_sweep(), str(tmp_path), train_fn=fake, log=lambda s: 0)
    failed = [m for m in summary["members"] if m["state"] == "failed"]
    assert [(m["variant"], m["seed"]) for m in failed] == [("b", 0)]
    assert failed[0]["error"] == "RuntimeError: boom: loss diverged"
    assert summary["counts"]["done"] == 3
    again = FakeTrain()
    sweep_lib.run_sweep(small_sweep(), str(tmp_path), train_fn=again, log=lambda s: 0)
    assert again.calls == [("b/seed_0", 0)]


def test_train_stopping_early_stops_the_sweep(tmp_path):
    fake = FakeTrain(stop_at={("a", 0): 3})
    summary = sweep_lib.run_sweep(small_sweep(), str(tmp_path), train_fn=fake, log=lambda s: 0)
    assert fake.calls == [("a/seed_0", 0)]
    assert summary["members"][0]["state"] == "interrupted"
    assert "stopped at step 2 of 6" in summary["members"][0]["error"]


@pytest.mark.parametrize("only, expected", [("3", ["b/seed_1"]), ("b,1", ["b/seed_1"]),
                                            ("a", ["a/seed_0", "a/seed_1"]),
                                            (" a , 0 ", ["a/seed_0"])])
def test_only_selects_members(tmp_path, only, expected):
    fake = FakeTrain()
    summary = sweep_lib.run_sweep(small_sweep(), str(tmp_path), only=only, train_fn=fake,
                                  log=lambda s: 0)
    assert [c[0] for c in fake.calls] == expected
    assert summary["counts"]["pending"] == 4 - len(expected)


@pytest.mark.parametrize("only", ["4", "c", "a,7"])
def test_only_that_matches_nothing_is_an_error(tmp_path, only):
    with pytest.raises(SweepError, match="matches no member|members 0..3"):
        sweep_lib.run_sweep(small_sweep(), str(tmp_path), only=only, train_fn=FakeTrain())


@pytest.mark.parametrize("variants, message", [
    ([("a", {}), ("b", {"model.positon": "rope"})],
     r"variant 'b': unknown config key 'model.positon' .*did you mean 'position'"),
    ([("a", {}), ("b", {"modle.norm": "rmsnorm"})], r"variant 'b': unknown config key 'modle"),
    ([("a", {}), ("b", {"model.norm": "batchnorm"})],
     r"variant 'b' \(seed 0\): model.norm='batchnorm' is not one of layernorm, rmsnorm"),
    ([("a", {}), ("b", {"model.n_layer": "four"})],
     r"variant 'b': model.n_layer='four' has the wrong type \(str; the field holds int"),
    ([("a", {}), ("b", {"model": {"norm": "rmsnorm"}})], r"variant 'b': 'model' is a section"),
    ([("a", {}), ("a", {"model.norm": "rmsnorm"})], r"duplicate variant name 'a'"),
    ([], r"the sweep has no variants"),
    ([("a/b", {})], r"variant name 'a/b' is not usable"),
])
def test_bad_variants_fail_before_anything_runs(tmp_path, variants, message):
    fake = FakeTrain()
    with pytest.raises(SweepError, match=message):
        sweep_lib.run_sweep(small_sweep(variants=variants), str(tmp_path / "w"), train_fn=fake)
    assert fake.calls == [] and not os.path.exists(tmp_path / "w")


def test_no_seeds_and_unknown_baseline_are_errors(tmp_path):
    with pytest.raises(SweepError, match="no seeds"):
        sweep_lib.plan(small_sweep(seeds=[]), str(tmp_path))
    with pytest.raises(SweepError, match="baseline='c' is not a variant"):
        sweep_lib.plan(small_sweep(baseline="c"), str(tmp_path))


def test_changed_config_of_an_existing_member_is_refused(tmp_path):
    sweep_lib.run_sweep(small_sweep(), str(tmp_path), train_fn=FakeTrain(), log=lambda s: 0)
    changed = small_sweep(overrides={**small_sweep().overrides, "optim.lr": 0.01})
    with pytest.raises(SweepError, match=r"variant 'a' \(seed 0\): .* was trained with "
                                         r"optim.lr=0.001 but the sweep now sets 0.01"):
        sweep_lib.run_sweep(changed, str(tmp_path), train_fn=FakeTrain())


def test_grid_names_and_expands_every_combination():
    variants = sweep_lib.grid({"optim.lr": [1e-3, 3e-3], "model.n_layer": [2, 4]})
    assert [name for name, _ in variants] == ["lr=0.001_n_layer=2", "lr=0.001_n_layer=4",
                                              "lr=0.003_n_layer=2", "lr=0.003_n_layer=4"]
    assert variants[1][1] == {"optim.lr": 1e-3, "model.n_layer": 4}


def test_shipped_ablations_plan_and_match_parameters(tmp_path):
    from gpt_jax.flops import count_params

    names = sorted(os.path.basename(p)[:-3]
                   for p in glob.glob(os.path.join(ROOT, "configs/ablations/[a-z]*.py")))
    assert {"norm", "position", "mlp", "tie_embeddings", "lr", "depth_width"} <= set(names)
    for name in names:
        sweep = sweep_lib.load_sweep(os.path.join(ROOT, "configs/ablations", f"{name}.py"))
        members = sweep_lib.plan(sweep, str(tmp_path / name))
        assert len(members) == len(sweep.variants) * len(sweep.seeds) >= 6
        if name in ("mlp", "depth_width"):  # variants at matched parameter count
            params = [count_params(typed(m.config).model)
                      for m in members[:len(sweep.variants)]]
            assert max(params) / min(params) < 1.02, (name, params)
        if name == "lr":
            assert [m.config.optim.lr for m in members[:3]] == [3e-4, 1e-3, 3e-3]
        if name == "modern":  # the recipe at the default's size: parameters within 5%
            params = [count_params(typed(m.config).model) for m in members[:2]]
            assert abs(params[1] / params[0] - 1) < 0.05, params


def test_recipe_sweep_holds_every_switch_file_member():
    """recipe.py's members are those of qk_norm.py, muon.py, ...: one run serves every report."""
    ablations = os.path.join(ROOT, "configs/ablations")
    recipe = sweep_lib.plan(sweep_lib.load_sweep(os.path.join(ablations, "recipe.py")), "w")
    by_key = {(m.variant, m.seed): config_lib.to_json(m.config) for m in recipe}
    switches = [n for n, _ in sweep_lib.load_sweep(os.path.join(ablations, "recipe.py")).variants]
    assert len(switches) == 7 and switches[0] == "baseline"
    for name in switches[1:]:
        for m in sweep_lib.plan(sweep_lib.load_sweep(os.path.join(ablations, f"{name}.py")), "w"):
            assert config_lib.to_json(m.config) == by_key[(m.variant, m.seed)], (name, m.variant)


def test_a_field_the_schema_gained_since_a_member_ran_is_not_a_change(tmp_path):
    sweep_lib.run_sweep(small_sweep(), str(tmp_path), train_fn=FakeTrain(), log=lambda s: 0)
    path = tmp_path / "a" / "seed_0" / "config.json"
    saved = json.loads(path.read_text())
    del saved["optim"]["lr"]  # as if written before the schema had optim.lr
    path.write_text(json.dumps(saved))
    again = FakeTrain()
    sweep_lib.run_sweep(small_sweep(), str(tmp_path), train_fn=again, log=lambda s: 0)
    assert again.calls == []


def test_real_tiny_sweep_trains_and_skips_on_rerun(tmp_path):
    """Two variants x two seeds of a few steps each through the real gpt_jax.train."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"f{i}.txt").write_text(("def f(x):\n    return x + %d\n" % i) * 300)
    sweep = small_sweep(overrides={
        "train.num_steps": 4, "train.eval_every": 4, "train.log_every": 2,
        "train.eval_batches": 1, "checkpoint.every": 4, "data.source": "text_files",
        "data.paths": str(corpus), "data.cache_dir": str(tmp_path / "cache"),
        "data.validation_fraction": 0.25, "data.prefetch": 0})
    work = str(tmp_path / "sweep")
    summary = sweep_lib.run_sweep(sweep, work, log=lambda s: 0)
    assert summary["counts"]["done"] == 4, summary["members"]
    for m in summary["members"]:
        events = json.loads(open(os.path.join(work, m["dir"], "metrics.jsonl")).readlines()[-1])
        assert events["step"] == 4 and "eval_loss" in events
    calls = []
    sweep_lib.run_sweep(sweep, work, log=calls.append)
    assert all("skipped" in line for line in calls) and len(calls) == 4
