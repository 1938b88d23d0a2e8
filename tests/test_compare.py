"""compare: statistics over seeds from hand-written metrics, report.md, plots, bad input."""

import json
import os
import statistics
import subprocess
import sys

import pytest

from gpt_jax import config as config_lib
from gpt_jax import report
from gpt_jax.config import typed
from gpt_jax.flops import count_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# variant -> final eval loss of each seed (the numbers make the expected results easy to state)
FINALS = {"base": [2.0, 2.2, 2.4],     # mean 2.2, sample std 0.2
          "better": [1.6, 1.7, 1.8],   # mean 1.7, std 0.1: delta -0.5, beyond the spread
          "same": [2.1, 2.3, 2.5],     # mean 2.3, std 0.2: delta +0.1 < 0.2, within noise
          "single": [2.6]}             # one seed: no std; delta +0.4 vs base's spread 0.2


def small_config(n_layer: int = 2):
    config = config_lib.base_config()
    config.model.update(vocab_size=64, block_size=32, n_layer=n_layer, n_head=4, n_embd=32)
    config.train.update(global_batch_size=8, num_steps=10)
    return config


def write_run(path, final: float, config=None, mfu: bool = False, first_eval=None,
              evals: bool = True, member: dict | None = None) -> None:
    """Train events at steps 2..10 (tokens/s 1000, 2000, 2000, 4000, 4000; 1 s per step) and
    eval events at step 5 (first_eval, default final + 0.5) and step 10 (final)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(config_lib.to_json(config or small_config()))
    events = []
    for step, tps, u in zip([2, 4, 6, 8, 10], [1000, 2000, 2000, 4000, 4000],
                            [0.5, 0.2, 0.2, 0.4, 0.4]):
        events.append({"step": step, "loss": 4.0 - 0.1 * step, "tokens_per_s": tps,
                       "step_time_s": 1.0, **({"mfu": u} if mfu else {})})
    if evals:
        events.insert(2, {"step": 5, "eval_loss": final + 0.5 if first_eval is None
                          else first_eval})
        events.append({"step": 10, "eval_loss": final, "eval_ppl": 2.718 ** final})
    with open(os.path.join(path, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(e) + "\n" for e in events)
    if member is not None:
        with open(os.path.join(path, "sweep_member.json"), "w") as f:
            json.dump(member, f)


@pytest.fixture
def runs_dir(tmp_path):
    for variant, finals in FINALS.items():
        for seed, final in enumerate(finals):
            config = small_config(n_layer=3 if variant == "better" else 2)
            config.train.seed = seed
            write_run(tmp_path / "runs" / variant / f"seed_{seed}", final, config,
                      mfu=variant == "better", first_eval=1.95 if (variant, seed) == (
                          "base", 0) else None)
    return tmp_path / "runs"


def test_means_stds_deltas_and_noise_flags(runs_dir):
    result = report.compare([str(runs_dir)], baseline="base")
    stats = {s.name: s for s in result["stats"]}
    assert [s.name for s in result["stats"]] == ["better", "base", "same", "single"]
    for name, finals in FINALS.items():
        assert stats[name].n == len(finals)
        assert stats[name].final_mean == pytest.approx(statistics.fmean(finals))
    assert stats["base"].final_std == pytest.approx(0.2)
    assert stats["better"].final_std == pytest.approx(0.1)
    assert stats["single"].final_std is None
    assert stats["better"].delta == pytest.approx(-0.5)
    assert stats["same"].delta == pytest.approx(0.1)
    assert stats["single"].delta == pytest.approx(0.4)
    assert (stats["better"].within_noise, stats["same"].within_noise,
            stats["single"].within_noise) == (False, True, False)
    assert statistics.fmean(stats["base"].best) == pytest.approx((1.95 + 2.2 + 2.4) / 3)
    assert stats["better"].params == [count_params(typed(small_config(3)).model)] * 3
    assert stats["base"].tokens == [10 * 8 * 32] * 3


def test_report_md_states_seeds_deltas_and_noise(runs_dir):
    text = open(report.compare([str(runs_dir)], baseline="base")["report"]).read()
    rows = {line.split(" | ")[1]: line for line in text.splitlines()  # the variant table
            if line[:3] in ("| 1", "| 2", "| 3", "| 4") and line.split(" | ")[1] in FINALS}
    n_params = f"{count_params(typed(small_config(3)).model):,}"
    assert rows["better"] == (f"| 1 | better | 3 | {n_params} | 2.56k | 1.7000 ± 0.1000 | "
                              "1.7000 ± 0.1000 | -0.5000 | 3,000 | 30.0% | 10 s |")
    assert "| 2 | base | 3 |" in rows["base"] and "| baseline |" in rows["base"]
    assert "| 2.1833 ± 0.2255 |" in rows["base"]  # best: 1.95, 2.2, 2.4
    assert "| 2.3000 ± 0.2000 |" in rows["same"] and "| +0.1000 ≈ within noise |" in rows["same"]
    assert "| 4 | single | 1 |" in rows["single"] and "| 2.6000 | 2.6000 | +0.4000 | 3,000 | n/a"\
        in rows["single"]
    assert "better 3, base 3, same 3, single 1" in text  # how many seeds each mean rests on
    assert "ddof=1" in text
    assert "**same** ends 0.1000 worse than **base**" in text
    assert "**smaller than the seed spread** (0.2000)" in text


def test_plots_are_written_with_one_line_per_variant(runs_dir, tmp_path):
    result = report.compare([str(runs_dir)], out_dir=str(tmp_path / "out"))
    assert result["plots"] == {"eval_loss_vs_step.png": 4, "eval_loss_vs_tokens.png": 4,
                               "train_loss.png": 4, "final_eval_loss.png": 4,
                               "time_to_target.png": 4}
    for name in result["plots"]:
        data = open(tmp_path / "out" / name, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    text = open(tmp_path / "out" / "report.md").read()
    assert all(f"]({name})" in text for name in result["plots"])


def test_default_baseline_is_the_first_variant_found(runs_dir):
    result = report.compare([str(runs_dir / v) for v in ("same", "base")],
                            out_dir=str(runs_dir))
    stats = {s.name: s for s in result["stats"]}
    assert stats["same"].delta == 0 and stats["base"].delta == pytest.approx(-0.1)


def test_no_eval_metrics_anywhere_is_a_clear_error_listing_them(tmp_path):
    for name in ("a", "b"):
        write_run(tmp_path / name, 2.0, evals=False)
    with pytest.raises(report.ReportError, match="no eval metrics") as e:
        report.compare([str(tmp_path / "a"), str(tmp_path / "b")])
    assert str(tmp_path / "a") in str(e.value) and str(tmp_path / "b") in str(e.value)


def test_runs_without_eval_are_left_out_with_a_warning(runs_dir):
    write_run(runs_dir / "late" / "seed_0", 2.0, evals=False)
    result = report.compare([str(runs_dir)])
    assert "late" not in {s.name for s in result["stats"]}
    assert any("late" in w and "no eval metrics" in w for w in result["warnings"])


def test_not_a_run_directory_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(report.ReportError, match="no run directory"):
        report.compare([str(tmp_path / "empty")])


def test_a_run_from_another_base_config_is_flagged(tmp_path):
    for variant, norm in (("ln", "layernorm"), ("rms", "rmsnorm")):
        config = small_config()
        config.model.norm = norm
        write_run(tmp_path / "sweep" / variant / "seed_0", 2.0, config,
                  member={"variant": variant, "seed": 0, "overrides": {"model.norm": norm}})
    write_run(tmp_path / "stray", 1.0, small_config(n_layer=6))
    result = report.compare([str(tmp_path / "sweep"), str(tmp_path / "stray")],
                            out_dir=str(tmp_path))
    assert len(result["warnings"]) == 1
    assert "stray" in result["warnings"][0] and "model.n_layer=6 vs 2" in result["warnings"][0]
    assert "## Warnings" in open(tmp_path / "report.md").read()


def test_compare_reads_a_sweep_and_its_baseline(tmp_path):
    from test_sweep import FakeTrain, small_sweep

    from gpt_jax import sweep as sweep_lib

    sweep_lib.run_sweep(small_sweep(baseline="b"), str(tmp_path), train_fn=FakeTrain(),
                        log=lambda s: 0)
    result = report.compare([str(tmp_path)])
    assert sorted(s.name for s in result["stats"]) == ["a", "b"]
    assert all(s.n == 2 for s in result["stats"]) and result["warnings"] == []
    assert "(**b**)" in open(tmp_path / "report.md").read()


@pytest.mark.e2e
def test_cli_compare_writes_the_report_and_explains_bad_input(runs_dir, tmp_path):
    cli = [sys.executable, "-m", "gpt_jax.cli", "compare"]
    ok = subprocess.run(cli + [str(runs_dir), f"--out={tmp_path / 'o'}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "better" in ok.stdout and os.path.exists(tmp_path / "o" / "report.md")
    assert "time to eval loss 2.2000 (the baseline base's mean final eval loss):" in ok.stdout
    assert "3/3 reached" in ok.stdout
    write_run(tmp_path / "noeval", 2.0, evals=False)
    bad = subprocess.run(cli + [str(tmp_path / "noeval")], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode != 0
    assert "no eval metrics" in bad.stderr and str(tmp_path / "noeval") in bad.stderr


# variant/seed -> (eval losses at steps 4, 8, 12; step_time_s of the intervals ending at 4, 8, 12)
CROSSINGS = {"base/seed_0": ([3.0, 2.0, 1.5], [1.0, 1.0, 1.0]),
             "base/seed_1": ([2.4, 2.0, 1.9], [0.5, 0.5, 0.5]),
             "fast/seed_0": ([2.6, 2.2, 1.6], [2.0, 0.75, 1.0]),
             "fast/seed_1": ([3.0, 2.9, 2.8], [1.0, 1.0, 1.0])}


@pytest.fixture
def crossing_runs(tmp_path):
    for name, (evals, times) in CROSSINGS.items():
        events = []
        for step, loss, t in zip([4, 8, 12], evals, times):
            events += [{"step": step, "loss": loss, "step_time_s": t},
                       {"step": step, "eval_loss": loss}]
        os.makedirs(tmp_path / "runs" / name)
        with open(tmp_path / "runs" / name / "metrics.jsonl", "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in events)
    return tmp_path / "runs"


def test_time_to_target_interpolates_steps_and_training_time(crossing_runs, tmp_path):
    result = report.compare([str(crossing_runs)], str(tmp_path / "out"), baseline="base",
                            target_loss=2.5)
    ttt = {t.name: t for t in result["time_to_target"]}
    # base/0 crosses 2.5 half-way from step 4 (3.0) to 8 (2.0): step 6, 6 steps x 1 s;
    # base/1 is below at its first eval: step 4, 4 x 0.5 s.
    assert ttt["base"].first_eval == [8, 4] and ttt["base"].steps == pytest.approx([6, 4])
    assert ttt["base"].seconds == pytest.approx([6.0, 2.0])
    # fast/0: 4 + 4 x (2.6-2.5)/(2.6-2.2) = step 5: 4 steps x 2 s + 1 x 0.75 s; fast/1 never.
    assert (ttt["fast"].reached, ttt["fast"].n, ttt["fast"].first_eval) == (1, 2, [8])
    assert ttt["fast"].steps == pytest.approx([5.0])
    assert ttt["fast"].seconds == pytest.approx([8.75])
    text = open(tmp_path / "out" / "report.md").read()
    assert "Target eval loss: **2.5000** (--target_loss)." in text
    assert "| base | 2/2 reached | 6 ± 3 | 5.0 ± 1.4 | 1.00× | 4.0 ± 2.8 s | 1.00× |" in text
    assert "| fast | 1/2 reached | 8 | 5.0 | 1.00× | 8.8 s | 2.19× |" in text
    assert "- **base** reaches eval loss 2.5000 first in training time (4.0 s, 2/2 seeds)." in text
    assert result["plots"]["time_to_target.png"] == 2
    assert "](time_to_target.png)" in text


def test_default_target_is_the_baseline_mean_final_eval_loss(crossing_runs, tmp_path):
    result = report.compare([str(crossing_runs)], str(tmp_path / "out"), baseline="base")
    assert result["target"] == pytest.approx(1.7)  # (1.5 + 1.9) / 2
    ttt = {t.name: t for t in result["time_to_target"]}
    # The baseline's own mean final loss: where it gets on average is the end of its runs (a
    # crossing would count base/0 alone, which ends below it at 1.5; base/1 ends at 1.9).
    assert ttt["base"].whole_runs and ttt["base"].steps == [12.0, 12.0]
    assert ttt["base"].seconds == pytest.approx([12.0, 6.0])
    assert ttt["fast"].steps == pytest.approx([8 + 4 * 0.5 / 0.6])
    assert ttt["fast"].seconds == pytest.approx([4 * 2 + 4 * 0.75 + 4 * 0.5 / 0.6])
    text = open(tmp_path / "out" / "report.md").read()
    assert "(the baseline base's mean final eval loss)" in text and "1/2 reached" in text
    assert "| base | 2 whole runs | 12 ± 0 | 12.0 ± 0.0 | 1.00× | 9.0 ± 4.2 s | 1.00× |" in text
    assert "its row is its whole runs" in text
