"""`gpt-jax aot --search`: candidates, pruning, a real (tiny) search, its cache, nothing-fits."""

import dataclasses
import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

from gpt_jax import aot, aot_search, attention, hardware, tpu_flags
from gpt_jax.config import load_preset
from gpt_jax.model import REMAT_POLICIES

requires_libtpu = pytest.mark.skipif(
    not aot.libtpu_available(),
    reason="libtpu is not installed (pip install 'libtpu==0.0.42.*'): no TPU compiler to AOT with")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPT_JAX_CACHE", str(tmp_path / "cache"))


def test_candidates_cover_the_space_and_respect_the_mesh():
    config = load_preset("tiny")  # n_head 4, block_size 32, head_dim 8: no splash
    tpu = aot.get_slice("v5e-8")
    cands = aot_search.enumerate_candidates(config, tpu)
    meshes = {c.mesh for c in cands}
    assert all(math.prod(m) == 8 and m[2] in (1, 2, 4) for m in meshes)
    assert (8, 1, 1) in meshes and (1, 8, 1) in meshes and (1, 2, 4) in meshes
    assert all(c.batch % (c.mesh[0] * c.mesh[1]) == 0 for c in cands)
    batches = sorted({c.batch for c in cands})
    assert batches == [b for b in (8, 16, 32) if b <= max(8, config.train.global_batch_size)]
    assert {c.remat for c in cands} == set(REMAT_POLICIES)
    assert {c.scan for c in cands} == {False, True} and {c.attention for c in cands} == {"xla"}
    assert {c.loss_chunks for c in cands} == {0, 8}
    fixed = aot_search.enumerate_candidates(config, tpu, tokens_per_step=64 * 32)
    assert {c.batch for c in fixed} == {64}
    with pytest.raises(aot.AotError, match="not a multiple of block_size 32"):
        aot_search.enumerate_candidates(config, tpu, tokens_per_step=100)
    # GPT-2's shapes suit splash (head_dim 64, context 1024); 20 heads allow tensor 1, 2, 4.
    gpt2 = load_preset("gpt2_774m")
    c774 = aot_search.enumerate_candidates(gpt2, aot.get_slice("v4-8"))
    assert {c.attention for c in c774} == {"xla", "splash"}
    assert {c.mesh[2] for c in c774} == {1, 2, 4}


def test_estimates_order_memory_and_prune_against_hbm():
    config = load_preset("gpt2_124m")
    config.model.dtype = "bfloat16"
    tpu = aot.get_slice("v5e-8")

    def est(**kw):
        base = dict(mesh=(1, 8, 1), batch=64, remat="none", scan=False, attention="xla",
                    loss_chunks=0)
        return aot_search.estimate(config, tpu, aot_search.Candidate(**{**base, **kw}))

    # (xla attention's save_dots keeps the float32 scores: more than `none`'s probabilities)
    assert est(remat="full", attention="splash").memory_bytes \
        < est(remat="save_dots", attention="splash").memory_bytes \
        < est(remat="none", attention="splash").memory_bytes
    assert est(loss_chunks=8).memory_bytes < est().memory_bytes
    assert est(attention="splash").memory_bytes < est().memory_bytes
    assert est(batch=128).memory_bytes > est().memory_bytes
    assert est(mesh=(8, 1, 1)).memory_bytes > est().memory_bytes  # replicated state
    assert est(remat="full").step_s > est(remat="none").step_s  # recomputation
    assert 0 < est().mfu <= 1
    cands = aot_search.enumerate_candidates(config, tpu)
    kept, over = aot_search.prune(config, tpu, cands, per_shape=2)
    assert kept and over and len(kept) + len(over) <= len(cands)
    assert all(e.memory_bytes <= 0.95 * tpu.hbm_bytes for _, e in kept)
    assert all(e.memory_bytes > 0.95 * tpu.hbm_bytes for _, e in over)
    tps = [e.tokens_per_s_per_chip for _, e in kept]
    assert tps == sorted(tps, reverse=True)
    per_shape = {}
    for c, _ in kept:
        per_shape[(c.mesh, c.batch)] = per_shape.get((c.mesh, c.batch), 0) + 1
    assert max(per_shape.values()) <= 2


@pytest.mark.e2e
def test_nothing_fits_names_the_smallest_overshoot(monkeypatch):
    small = dataclasses.replace(aot.SLICES["v5e-8"], hbm_bytes=1 * aot.GiB)
    monkeypatch.setitem(aot.SLICES, "v5e-8", small)

    def boom(*a):
        raise AssertionError("nothing should be compiled")

    with pytest.raises(aot.AotError) as e:
        aot_search.search(load_preset("gpt2_1558m"), "v5e-8", compile_fn=boom, log=lambda s: None)
    msg = str(e.value)
    assert "\n" not in msg
    found = re.match(
        r"nothing fits v5e-8 \(1 GiB per chip\): the smallest, mesh 1x8x1 batch 8 remat full.*, "
        r"needs ([\d.]+) GiB \(([\d.]+) GiB over, estimated\)$", msg)
    assert found, msg
    assert float(found.group(1)) - 1 == pytest.approx(float(found.group(2)), abs=0.11)


def test_auto_attention_is_xla_on_cpu_and_splash_for_tpu():
    assert attention.resolve_impl("auto", "cpu", 64, 1024) == "xla"
    assert attention.resolve_impl("auto", "gpu", 64, 1024) == "xla"
    assert attention.resolve_impl("auto", "tpu", 64, 1024) == "splash"
    assert attention.resolve_impl("auto", "tpu", 8, 1024) == "xla"  # head_dim
    assert attention.resolve_impl("auto", "tpu", 64, 1000) == "xla"  # context
    assert attention.resolve_impl("splash", "cpu", 8, 32) == "splash"
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 128, 2, 64)), jnp.float32) for _ in range(3))
    np.testing.assert_array_equal(attention.attend(q, k, v, impl="auto"),
                                  attention.attend(q, k, v, impl="xla"))
    from gpt_jax.config import ModelConfig
    assert ModelConfig().attention_impl == "auto"


def test_overlap_flags_merge():
    ours = tpu_flags.overlap_flags("v5e")
    assert tpu_flags.merge("v5litepod-8").split() == list(ours)
    assert tpu_flags.merge("v5e-8", "--x=1", on=False) == "--x=1"
    mine = "--xla_enable_async_all_gather=false"
    merged = tpu_flags.merge("v4-8", mine)
    assert merged.endswith(mine) and merged.count("xla_enable_async_all_gather") == 1
    assert "scoped_vmem" in tpu_flags.merge("v6e-8") and tpu_flags.generation("v5:2x2x1") == "v5p"


def test_cost_report_adds_back_pallas_flops():
    r = aot.cost_report({"flops": 5e12, "bytes accessed": 1e9, "optimal_seconds": 0.05},
                        4e12, 100e12, 1e12, extra_flops=1e12)
    assert r["xla_flops_per_chip"] == 6e12 and r["flops_added_back_per_chip"] == 1e12
    assert r["xla_estimated_step_s"] == pytest.approx(0.06)


@pytest.mark.e2e
@requires_libtpu
def test_tiny_search_compiles_the_winner_and_a_second_run_is_cached():
    config = load_preset("tiny")
    calls = []

    def counting(*args):
        calls.append(args)
        return aot_search.compile_record(*args)

    rows = aot_search.search(config, "v5e-4", top=2, workers=1, compile_fn=counting,
                             log=lambda s: None)
    compiled = [r for r in rows if r.record is not None]
    assert 2 <= len(calls) == len(compiled) <= 4
    winner = rows[0]
    assert winner.fits and not winner.cached and winner.record["train_compile_s"] > 0
    assert winner.record["topology"] == "v5e-4" and winner.record["xla_overlap_flags"]
    assert winner.record["mesh"] == winner.candidate.mesh_str
    fitting = [r.tokens_per_s_per_chip for r in rows if r.fits]
    assert fitting == sorted(fitting, reverse=True)  # by the realistic estimate, over the bound
    assert winner.record["train_realistic_step_s"] > winner.record["train_bound_step_s"] > 0
    table = aot_search.table(compiled, aot.get_slice("v5e-4"))
    assert table.count("| compiled |") == len(compiled)
    train, launch = aot_search.commands(winner, "configs/tiny.py", "v5e-4")
    assert train.startswith("gpt-jax train --config=configs/tiny.py --config.mesh.data=")
    assert "--accelerator=v5litepod-4" in launch and "--config.model.remat_policy=" in launch
    assert launch.startswith("python launch/tpu.py train --name=$NAME --project=$PROJECT ")
    # What the search was given (e.g. --config.model.vocab_multiple=128) comes first, in both.
    given = ("--config.model.vocab_multiple=128",)
    for line in aot_search.commands(winner, "configs/tiny.py", "v5e-4", given):
        assert " --config=configs/tiny.py --config.model.vocab_multiple=128 --config.mesh" in line

    def boom(*args):
        raise AssertionError("the second identical search must not compile")

    again = aot_search.search(config, "v5e-4", top=2, workers=1, compile_fn=boom,
                              log=lambda s: None)
    assert [r.candidate for r in again if r.record] == [r.candidate for r in rows if r.record]
    assert all(r.cached for r in again if r.record)
    assert aot_search.table([r for r in again if r.record],
                            aot.get_slice("v5e-4")).count("| cached |") == len(compiled)


_PROBE = """
import os, sys
os.environ.update(JAX_PLATFORMS="cpu", ALLOW_MULTIPLE_LIBTPU_LOAD="1", LIBTPU_INIT_ARGS=sys.argv[1])
import jax, jax.numpy as jnp
from gpt_jax import aot
devices = aot.topology_devices(aot.get_slice("v5e-4"), overlap_flags=False)
mesh = jax.sharding.Mesh(devices, ("x",))
s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x"))
x = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16, sharding=s)
jax.jit(lambda a: (a @ a.T).sum()).lower(x).compile()
print("compiled")
"""


@pytest.mark.e2e
@requires_libtpu
def test_every_overlap_flag_is_known_to_the_installed_libtpu():
    """libtpu aborts on an unknown flag: a compile with all of ours succeeds, a bogus one not."""
    import os
    import subprocess
    import sys

    flags = sorted({f for t in hardware.TPUS.values() for f in t.overlap_flags})
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))

    def run(args):
        return subprocess.run([sys.executable, "-c", _PROBE, args], env=env,
                              capture_output=True, text=True, timeout=300)

    ok = run(" ".join(flags))
    assert ok.returncode == 0 and "compiled" in ok.stdout, ok.stderr[-2000:]
    bad = run("--xla_tpu_no_such_flag_gpt_jax=true")
    assert bad.returncode != 0 and "Unknown command line flag" in bad.stderr


def test_a_budget_spent_before_anything_fits_is_not_nothing_fits(monkeypatch, tmp_path):
    """Two compiles over HBM and untried candidates left: the error asks for more budget
    instead of claiming that nothing fits the slice."""
    monkeypatch.setenv("GPT_JAX_CACHE", str(tmp_path))
    calls = []

    def over_hbm(config_json, topology, overlap):
        calls.append(config_json)
        return {"train_fits": False, "train_total_bytes": 40.0 * aot.GiB + len(calls),
                "error": "over HBM"}

    with pytest.raises(aot.AotError) as e:
        aot_search.search(load_preset("gpt2_774m"), "v4-8", top=1, compile_fn=over_hbm,
                          log=lambda s: None)
    msg = str(e.value)
    assert len(calls) == 2 and "\n" not in msg and not msg.startswith("nothing fits")
    assert re.match(r"none of the 2 candidates compiled fits v4-8 \(the smallest, mesh .*, "
                    r"needs 40\.0 GiB of 32\); \d+ more were not tried: raise --budget_s "
                    r"\(now 1200\) or --top \(now 1\)$", msg), msg
