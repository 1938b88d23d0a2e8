"""`gpt-jax aot`: compile the tiny config's train and decode steps for a small TPU slice on CPU."""

import math
import re
import sys

import pytest

from gpt_jax import aot, hlo_profile
from gpt_jax.config import load_preset, typed
from gpt_jax.flops import count_params, flops_per_token

requires_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed (pip install 'libtpu==0.0.42.*'): no TPU compiler to AOT with")


def test_slice_table_and_unknown_topology():
    assert aot.SLICES["v5e-8"].topology == "v5e:2x4" and aot.SLICES["v5e-8"].chips == 8
    assert aot.SLICES["v4-8"].topology == "v4:2x2x1" and aot.SLICES["v4-8"].chips == 4
    assert aot.SLICES["v5p-128"].chips == 64 and aot.SLICES["v5e-256"].chips == 256
    assert aot.SLICES["v5p-8"].hbm_bytes == 95 * aot.GiB
    with pytest.raises(aot.AotError, match=r"unknown TPU topology 'v9-8'; one of: v4-8, "):
        aot.get_slice("v9-8")


@pytest.mark.e2e
@requires_libtpu
def test_tiny_compiles_for_v5e_4_with_a_sane_memory_report():
    config = aot.apply_overrides(load_preset("tiny"), batch_size=8, mesh=(1, 4, 1))
    r = aot.project(config, "v5e-4", decode_batch_size=8)
    assert (r["chips"], r["device_kind"], r["mesh"]) == (4, "TPU v5 lite", "1x4x1")
    n = count_params(typed(config).model)
    # fsdp=4 splits the float32 params: each chip holds at least its quarter, less than all.
    assert n * 4 / 4 <= r["params_bytes_per_chip"] < n * 4
    assert r["opt_state_bytes_per_chip"] >= 2 * r["params_bytes_per_chip"]  # Adam's mu, nu
    assert r["train_argument_bytes"] >= r["params_bytes_per_chip"] + r["opt_state_bytes_per_chip"]
    assert r["train_alias_bytes"] > 0  # the state is donated
    for prefix in ("train", "decode"):
        total = r[f"{prefix}_total_bytes"]
        assert 0 < total < r[f"{prefix}_hbm_bytes"] == 16 * aot.GiB and r[f"{prefix}_fits"]
        assert r[f"{prefix}_headroom_bytes"] == 16 * aot.GiB - total
        assert r[f"{prefix}_xla_flops_per_chip"] > 0
    # XLA counts the matmuls (and more): at least the model's 6N + attention FLOPs per chip.
    assert r["train_xla_flops_per_chip"] >= 0.9 * r["train_model_flops_per_chip"]
    assert r["train_xla_estimated_step_s"] > 0 and 0 < r["train_projected_mfu"] <= 1
    cfg = typed(config).model  # the same step, attention's causal half only
    assert r["train_projected_mfu_causal_half"] == pytest.approx(
        r["train_projected_mfu"] * flops_per_token(cfg, r["seq_len"], causal_half=True)
        / flops_per_token(cfg, r["seq_len"]))
    assert r["peak_tflops_per_chip"] == 197
    assert math.isfinite(r["projected_tokens_per_s"])
    assert "fits" in aot.format_report(r)


def test_a_vmem_refusal_is_one_line_naming_it():
    error = RuntimeError("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory"
                         " in memory space vmem. Used 17.96M of 16.00M vmem. Exceeded vmem "
                         "capacity by 1.96M.\n\nProgram vmem requirement 17.96M:\n ...")
    err = aot._out_of_memory(error, "v4-8")
    assert type(err) is aot.AotError and "\n" not in str(err)
    assert str(err).startswith("XLA cannot compile this step for v4-8: Ran out of memory in "
                               "memory space vmem. Used 17.96M of 16.00M vmem.")
    assert "--attention_impl" in str(err)
    with pytest.raises(RuntimeError, match="INTERNAL"):
        aot._out_of_memory(RuntimeError("INTERNAL: something else"), "v4-8")


@pytest.mark.e2e
@requires_libtpu
def test_a_single_chip_slice_compiles_splash_in_scanned_layers_and_microbatches():
    """One chip: splash runs outside shard_map, inside flax's scan (whose partial-eval trace
    once leaked into a cached kernel) and the microbatch loop."""
    config = load_preset("tiny")
    config.model.update(attention_impl="splash", scan_layers=True, block_size=256,
                        n_embd=128, n_head=2)
    config.train.update(global_batch_size=4, microbatches=2)
    config.mesh.update(data=1, fsdp=1, tensor=1)
    r = aot.project(config, "v6e-1", decode=False)
    assert (r["chips"], r["device_kind"], r["peak_tflops_per_chip"]) == (1, "TPU v6 lite", 918)
    assert r["train_fits"] and r["train_xla_estimated_step_s"] > 0


@requires_libtpu
def test_megacore_slice_has_one_device_per_chip():
    devices = aot.topology_devices(aot.get_slice("v4-8"))
    assert len(devices) == 4 and devices[0].device_kind == "TPU v4"


@pytest.mark.e2e
@requires_libtpu
def test_scanned_cost_is_extrapolated_to_the_unscanned_programs():
    """XLA counts a scanned layer stack once; the 1- and 2-layer extrapolation restores it."""
    config = aot.apply_overrides(load_preset("tiny"), batch_size=8, mesh=(1, 4, 1))
    config = config.replace({"model.n_layer": 4})
    mesh = aot.topology_mesh(config.mesh, aot.topology_devices(aot.get_slice("v5e-4")))
    looped_step = aot.compile_train_step(config, mesh)[0]
    looped = aot.xla_cost(looped_step)
    scanned_config = aot.apply_overrides(config, scan_layers=True)
    raw_scanned = aot.xla_cost(aot.compile_train_step(scanned_config, mesh)[0])
    assert raw_scanned["flops"] < 0.75 * looped["flops"]  # the undercount this corrects
    r = aot.project(scanned_config, "v5e-4", decode=False)
    assert r["cost_source"].startswith("unscanned 1- and 2-layer")
    assert r["train_xla_flops_per_chip"] == pytest.approx(looped["flops"], rel=0.02)
    assert r["train_xla_bytes_accessed_per_chip"] == pytest.approx(looped["bytes accessed"],
                                                                   rel=0.15)
    # The HLO profile's traffic, loop bodies once, agrees with XLA's total; the record's counts
    # every trip of the fsdp collective-matmul loops too, extrapolated the same way.
    assert hlo_profile.profile(looped_step.as_text()).total_bytes == pytest.approx(
        looped["bytes accessed"], rel=0.25)
    traffic = hlo_profile.profile(looped_step.as_text(), every_trip=True).total_bytes
    assert r["train_hlo_bytes_total"] == pytest.approx(traffic, rel=0.1)
    # every loop counted (the scans; on TPU also each fsdp collective matmul's loop): the
    # model's 6N + 12LDT less its vectors (biases, norm scales: 3% of this tiny model's N)
    assert r["train_hlo_matmul_flops_per_chip"] >= 0.95 * r["train_model_flops_per_chip"]
    line = aot.bound(r)
    assert re.fullmatch(r"(HBM bytes|compute) at peak rates \([\d.]+ ms of HBM traffic vs "
                        r"[\d.]+ ms of FLOPs at peak\); the realistic estimate is "
                        r"(compute|HBM|ICI)-bound; top traffic: (.+ \d+%, ){2}.+ \d+%; largest "
                        r"buffers: (.+ [\d.]+ GiB, ){2}.+ [\d.]+ GiB", line), line
    assert "bound by " + line in aot.format_report(r)


@requires_libtpu
def test_a_step_over_hbm_is_one_line_naming_the_overshoot():
    config = aot.apply_overrides(load_preset("tiny"), batch_size=2**20, mesh=(1, 4, 1))
    with pytest.raises(aot.AotError, match=r"^does not fit on v5e-4: .* need [\d.]+ GiB per "
                       r"chip, [\d.]+ GiB of HBM is available \(over by [\d.]+ GiB\); try "):
        aot.project(config, "v5e-4", decode=False)


def test_cost_report_estimates():
    """XLA's estimate when plausible; else the roofline: max(XLA, model) FLOPs / peak + bytes
    / bandwidth (the two add up, as XLA's own TPU estimate does)."""
    peak, bw = 100e12, 1e12  # FLOP/s, bytes/s
    sane = aot.cost_report({"flops": 5e12, "bytes accessed": 20e9, "optimal_seconds": 0.08},
                           4e12, peak, bw)
    assert (sane["xla_estimated_step_s"], sane["estimate_source"]) == (0.08, "xla optimal_seconds")
    assert sane["projected_mfu"] == pytest.approx(4e12 / (0.08 * peak))
    # 44 s against a 60 ms roofline (1 TFLOP at 100 TFLOP/s + 50 GB at 1 TB/s): discarded.
    wild = aot.cost_report({"flops": 1e12, "bytes accessed": 50e9, "optimal_seconds": 44.0},
                           1e12, peak, bw)
    assert wild["estimate_source"] == "roofline"
    assert wild["xla_estimated_step_s"] == pytest.approx(0.06)
    assert (wild["compute_s"], wild["hbm_s"]) == (pytest.approx(0.01), pytest.approx(0.05))
    # XLA counted 2 TFLOP where the model needs 9: the compute term uses 9 TFLOP (90 ms).
    under = aot.cost_report({"flops": 2e12, "bytes accessed": 10e9}, 9e12, peak, bw)
    assert under["xla_flops_below_model"] and under["xla_estimated_step_s"] == pytest.approx(0.1)


def test_bound_line_from_a_record():
    """The larger roofline term, op shares of the HLO traffic, and each buffer shape once (an
    in-place update of a buffer has the same shape as the buffer)."""
    GiB = aot.GiB
    record = {"train_compute_s": 0.1422, "train_hbm_s": 0.1435, "train_hlo_bytes_total": 100.0,
              "train_hlo_bytes_by_op": [["tpu_custom_call f32[4,128]", 19.0],
                                        ["bwd h/attn/qkv/dot_general", 7.0], ["add f32[2]", 1.0]],
              "train_hlo_largest_buffers": [["fwd broadcast_in_dim", "bf16[12,3,64]", 3 * GiB],
                                            ["fwd dynamic_update_slice", "bf16[12,3,64]", 3 * GiB],
                                            ["fwd h/mlp/fc/dot_general", "bf16[12,3072]", 2 * GiB],
                                            ["copy f32[8]", "f32[8]", GiB]]}
    assert aot.bound(record) == (
        "HBM bytes at peak rates (143.5 ms of HBM traffic vs 142.2 ms of FLOPs at peak); top "
        "traffic: tpu_custom_call f32[4,128] 19%, bwd h/attn/qkv/dot_general 7%, add f32[2] 1%; "
        "largest buffers: fwd broadcast_in_dim bf16[12,3,64] 3.00 GiB, fwd h/mlp/fc/dot_general "
        "bf16[12,3072] 2.00 GiB, copy f32[8] 1.00 GiB")
    # at the calibrated efficiencies the same step may be limited by the other term
    assert "at peak); the realistic estimate is compute-bound; top traffic" in aot.bound(
        {**record, "train_realistic_limit": "compute"})
    assert aot.bound({}).startswith("n/a")


@pytest.mark.e2e
@requires_libtpu
def test_serving_step_of_tiny_on_v5e_4_counts_weights_and_cache():
    """`aot --serve_slots`: the engine's own decode step; its weights and cache per chip are
    the arrays' shards, the HBM bound is their bytes over the chip's bandwidth."""
    config = typed(load_preset("tiny"))
    r = aot.project_serving(config, "v5e-4", 8)
    m = config.model
    assert r["mesh"] == "1x1x4" if m.n_head % 4 == 0 else r["mesh"].endswith("x1x" + str(
        max(t for t in (1, 2, 4) if m.n_head % t == 0)))
    tensor = int(r["mesh"].split("x")[2])
    cache = 2 * m.n_layer * 8 * m.block_size * m.kv_heads * m.head_dim * 4 // tensor
    assert r["cache_bytes_per_chip"] == cache
    assert r["params_bytes_per_chip"] >= count_params(m) * 4 / tensor
    assert r["hbm_bound_s"] == pytest.approx(
        (r["cache_bytes_per_chip"] + r["params_bytes_per_chip"]) / aot.get_slice(
            "v5e-4").hbm_bytes_per_s)
    assert r["fits"] and r["xla_estimated_step_s"] >= r["hbm_bound_s"]
    assert r["tokens_per_s_per_chip"] == pytest.approx(8 / r["xla_estimated_step_s"] / 4)
    # one method for every row: the roofline sum; and no copy of a cache layer (the TPU path
    # reads and writes the cache whole: a switch over prefixes and a scatter copied it)
    assert r["estimate_source"] == "roofline"
    assert r["xla_estimated_step_s"] == pytest.approx(r["compute_s"] + r["hbm_s"])
    layer = f"[{8 // int(r['mesh'].split('x')[0])},"
    assert not any(label.startswith("copy ") and layer in label for label, _ in
                   r["hlo_bytes_by_op"]), r["hlo_bytes_by_op"]
    assert "serving decode step" in aot.format_serving(r)


def test_serving_mesh_puts_heads_on_the_largest_dividing_tensor_axis():
    assert aot.serving_mesh(typed(load_preset("gpt2_124m")), 8) == (2, 1, 4)  # 12 heads
    assert aot.serving_mesh(typed(load_preset("gpt2_350m")), 8) == (1, 1, 8)  # 16 heads
    assert aot.serving_mesh(typed(load_preset("gpt2_1558m")), 8) == (8, 1, 1)  # 25 heads


def test_a_preset_takes_the_command_lines_config_overrides(monkeypatch):
    from gpt_jax.commands.common import config_with_overrides
    from gpt_jax.presets import preset_path

    argv = ["--topology=v5e-8", "--config.model.loss_chunks=8", "--config.model.dtype=bfloat16"]
    monkeypatch.setattr(sys, "argv", ["gpt-jax", "aot", *argv])  # as the command line has them
    config = config_with_overrides(preset_path("gpt2_124m"), argv)
    assert (config.model.loss_chunks, config.model.dtype) == (8, "bfloat16")
    assert typed(config).model.n_layer == 12  # the rest is the preset's
    with pytest.raises(Exception, match="nope"):
        config_with_overrides(preset_path("gpt2_124m"), ["--config.model.nope=1"])
