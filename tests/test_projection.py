"""The realistic TPU step estimate (gpt_jax/projection.py): its terms from a record, its
calibration against published runs, and the search ranking by it."""

import json
from pathlib import Path

import pytest

from gpt_jax import projection
from gpt_jax.config import typed
from gpt_jax.model import ModelConfig
from gpt_jax.projection import Calibration, Efficiency


def record(**over):
    r = {"train_compute_s": 0.3, "train_hbm_s": 0.2, "peak_tflops_per_chip": 197.0,
         "train_flops_added_back_per_chip": 197e12 * 0.05, "device_kind": "TPU v5 lite",
         "mesh": "2x4x1", "batch_size": 64, "seq_len": 1024, "params": 124_000_000,
         "dtype": "bfloat16", "param_dtype": "float32", "chips": 8,
         "train_model_flops_per_chip": 197e12 * 0.28}
    r.update(over)
    return r


def model(**over):
    return ModelConfig(**{"n_layer": 12, "n_embd": 768, "n_head": 12, **over})


def test_terms_split_the_roofline_by_op_class_and_add_the_collectives():
    cfg = model()  # head_dim 64 on a 128-wide MXU: splash fills half of it
    t = projection.terms(record(), cfg)
    assert t["matmul"] == pytest.approx(0.25) and t["splash_full"] == pytest.approx(0.05)
    assert t["splash"] == pytest.approx(0.10) and t["hbm"] == 0.2
    # fsdp 4 all-gathers (fwd, bwd) and reduce-scatters bf16 weights; data 2 all-reduces f32
    sent = 3 * 124e6 * 2 * 3 / 4 + 2 * 124e6 * 4 / 4 * 1 / 2
    assert t["ici"] == pytest.approx(sent / 200e9)
    eff = Efficiency(matmul=0.5, hbm=0.8, overlap=0.4, exposed=0.25)
    compute, memory = (0.25 + 0.10) / 0.5, 0.2 / 0.8
    step = compute + 0.4 * memory + 0.25 * t["ici"]
    r = projection.realistic(record(), cfg, eff)
    assert r["train_realistic_step_s"] == pytest.approx(step)
    assert r["train_realistic_tokens_per_s_per_chip"] == pytest.approx(64 * 1024 / 8 / step)
    assert r["train_realistic_mfu"] == pytest.approx(0.28 / step)
    # the bound: FLOPs at peak (splash at full fill), HBM traffic and collectives, the longest
    assert r["train_bound_step_s"] == pytest.approx(0.3)
    assert r["train_bound_step_s"] < r["train_realistic_step_s"]
    assert r["train_realistic_limit"] == "compute"
    assert projection.realistic(record(train_compute_s=None), cfg) == {}


def test_a_wide_mxu_halves_a_narrow_heads_splash_speed():
    v5e = projection.terms(record(), model())["splash"]
    v6e = projection.terms(record(device_kind="TPU v6 lite", peak_tflops_per_chip=918.0,
                                  train_flops_added_back_per_chip=918e12 * 0.05), model())
    assert v6e["splash"] == pytest.approx(2 * v5e)  # 64 of a 256-wide array, not of 128
    assert projection.terms(record(), model(n_head=6))["splash"] == pytest.approx(0.05)


def test_the_fit_recovers_the_efficiencies_that_made_the_measurements():
    truth = Efficiency(matmul=0.62, hbm=1.13, overlap=0.31, exposed=projection.EXPOSED)
    runs = []
    for matmul, splash, hbm, ici in ((0.3, 0.02, 0.2, 0.01), (0.1, 0.05, 0.4, 0.0),
                                     (0.5, 0.01, 0.05, 0.02), (0.2, 0.1, 0.1, 0.05),
                                     (0.05, 0.0, 0.3, 0.1)):
        t = {"matmul": matmul, "splash": splash, "splash_full": splash, "hbm": hbm, "ici": ici}
        runs.append(Calibration("run", "v5e-8", 1e4 / projection.step_seconds(t, truth), t, 1e4))
    fitted, held_out = projection.calibrate(runs)
    assert fitted == truth
    for r, out in zip(runs, held_out):
        assert out == pytest.approx(r.measured, rel=0.02)
    table = projection.calibration_table(runs, fitted, held_out)
    assert "fit: matmul 0.62, hbm 1.13, overlap 0.31" in table and "not the fit" in table


def test_every_published_run_is_a_config_that_fills_its_slice():
    from gpt_jax import aot
    from gpt_jax.commands.common import config_with_overrides
    runs = projection.published_runs()
    assert len(runs) >= 4 and {r.topology for r in runs} >= {"v5e-1", "v6e-1", "v6e-8"}
    for run in runs:
        config = typed(config_with_overrides(run.file, []))
        mesh = config.mesh
        assert mesh.data * mesh.fsdp * mesh.tensor == aot.get_slice(run.topology).chips
        assert run.measured > 0 and run.run.startswith("configs/published/")


def test_the_search_ranks_compiled_rows_by_the_realistic_estimate_not_the_bound():
    from gpt_jax import aot_search
    c = aot_search.Candidate((1, 8, 1), 64, "save_dots", True, "splash", 8)
    e = aot_search.Estimate(1e9, 0.1, 1e12, 1e5, 0.5)
    fast_bound = aot_search.Row(c, e, {"train_fits": True, "projected_tokens_per_s": 9e5,
                                       "chips": 8, "train_realistic_tokens_per_s_per_chip": 4e4})
    fast_real = aot_search.Row(c, e, {"train_fits": True, "projected_tokens_per_s": 6e5,
                                      "chips": 8, "train_realistic_tokens_per_s_per_chip": 5e4})
    assert aot_search.rank([fast_bound, fast_real]) == [fast_real, fast_bound]


def test_the_shipped_efficiencies_are_the_fit_of_the_recorded_published_runs():
    """docs/aot_search/published.json is what `gpt-jax aot --published` compiled: each run's
    record fields and measurement. Their terms are derived again here (a change to `terms` or
    the hardware table shows), then refit: the fit is EFFICIENCY, so the factors are
    reproducible, not typed in."""
    from gpt_jax.commands.common import config_with_overrides
    recorded = json.loads((Path(__file__).parents[1] / "docs/aot_search/published.json")
                          .read_text())
    published = {(r.run, r.topology): r for r in projection.published_runs()}
    runs = []
    for r in recorded["runs"]:
        run = published.pop((r["run"], r["topology"]))
        assert r["measured"] == run.measured
        terms = projection.terms(r["record"], typed(config_with_overrides(run.file, [])).model)
        assert terms == pytest.approx(r["terms"])
        runs.append(Calibration(r["run"], r["topology"], r["measured"], terms, r["tokens"]))
    assert not published  # every published run was in the fit
    fitted, held_out = projection.calibrate(runs)
    assert fitted == projection.EFFICIENCY == Efficiency(**recorded["fit"])
    for r, out in zip(runs, held_out):  # the spread BENCHMARKS.md quotes
        assert 0.8 < r.estimate(fitted) / r.measured < 1.2 and 0.7 < out / r.measured < 1.4
