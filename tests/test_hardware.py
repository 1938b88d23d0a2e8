"""The one table of accelerator facts and every reader agreeing with it."""

import pytest

from gpt_jax import aot, hardware, tpu_flags
from launch import tpu_types


@pytest.mark.parametrize("name, generation", [
    ("v5e-8", "v5e"), ("v5litepod-8", "v5e"), ("v5e:2x4", "v5e"), ("TPU v5 lite", "v5e"),
    ("v5p-8", "v5p"), ("v5:2x2x1", "v5p"), ("TPU v5", "v5p"), ("v4-32", "v4"),
    ("v6e-8", "v6e"), ("TPU v6 lite", "v6e")])
def test_every_name_of_a_chip_is_one_generation(name, generation):
    assert hardware.tpu(name).name == generation


def test_an_unknown_generation_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown TPU generation 'v9-8'; one of: v4, v5e"):
        hardware.tpu("v9-8")


def test_peak_flops_take_the_longest_device_kind():
    assert hardware.peak_flops("TPU v5 lite") == 197e12  # not v5p's "TPU v5"
    assert hardware.peak_flops("TPU v5") == 459e12
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.peak_flops("cpu") is None


def test_aot_slices_and_gcloud_types_are_the_same_chips():
    for name, s in aot.SLICES.items():
        gen = hardware.tpu(name)
        assert s.hbm_bytes == gen.hbm_bytes and s.topology.startswith(gen.libtpu + ":")
        if int(name.split("-")[1]) in gen.sizes:  # a slice gcloud sells: the same chip count
            assert tpu_types.accelerator(name).chips == s.chips
    assert aot.get_slice("v5litepod-8") == aot.get_slice("v5e-8")
    assert tpu_types.accelerator("v5e-8") == tpu_types.accelerator("v5litepod-8")
    assert tpu_flags.overlap_flags("v5litepod-8") == hardware.TPUS["v5e"].overlap_flags
