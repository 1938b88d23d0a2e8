"""gpt_jax.hlo_profile: HBM bytes per op and largest buffers from HLO text (checked by hand)."""

import pytest

from gpt_jax import hlo_profile

# A module with a matmul in the entry, a fusion in a loop body and a fused computation whose
# instructions must not count (they run inside their fusion).
HLO = """HloModule jit_train_step, entry_computation_layout={()->f32[16,64]}

%fused_computation (param_0: f32[4,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %negate.1 = f32[4,8]{1,0} negate(%param_0)
}

%cond (p.1: (s32[], f32[4,8])) -> pred[] {
  %p.1 = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element(%p.1), index=0
  %n = s32[] constant(12)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%body (p.2: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p.2 = (s32[], f32[4,8]{1,0}) parameter(0)
  %i.2 = s32[] get-tuple-element(%p.2), index=0
  %x = f32[4,8]{1,0} get-tuple-element(%p.2), index=1
  %fusion.7 = f32[4,8]{1,0} fusion(%x), kind=kLoop, calls=%fused_computation, metadata={op_name="jit(_train_step)/jvp(GPT)/GPT._scan_blocks/while/body/closed_call/h/mlp/fc/dot_general" stack_frame_id=3}
  ROOT %t.2 = (s32[], f32[4,8]{1,0}) tuple(%i.2, %fusion.7)
}

ENTRY %main.1 (a: bf16[16,32], b: bf16[32,64], c: f32[4,8]) -> f32[16,64] {
  %a = bf16[16,32]{1,0} parameter(0)
  %b = bf16[32,64]{1,0} parameter(1)
  %c = f32[4,8]{1,0} parameter(2)
  %convolution.3 = f32[16,64]{1,0} convolution(%a, %b), dim_labels=bf_io->bf, metadata={op_name="jit(_train_step)/transpose(jvp(GPT))/h_3/attn/qkv/dot_general"}
  %zero = s32[] constant(0)
  %t = (s32[], f32[4,8]{1,0}) tuple(%zero, %c)
  %while.1 = (s32[], f32[4,8]{1,0}) while(%t), condition=%cond, body=%body
  %copy-start.1 = (f32[16,64]{1,0}, f32[16,64]{1,0}, u32[]) copy-start(%convolution.3)
  ROOT %copy-done.1 = f32[16,64]{1,0} copy-done(%copy-start.1)
}
"""


def test_shape_bytes_pads_minor_dims_to_the_tile():
    assert hlo_profile.shape_bytes("(f32[4,8]{1,0}, s32[], pred[3])") == 128 + 4 + 3
    # T(8,128): the most minor dimension (layout order) pads to 128, the next to 8.
    assert hlo_profile.shape_bytes("bf16[16,32]{1,0:T(8,128)(2,1)}") == 16 * 128 * 2
    assert hlo_profile.shape_bytes("bf16[16,32]{0,1:T(8,128)(2,1)}") == 128 * 32 * 2
    assert hlo_profile.shape_bytes("f32[2,3,64]{2,1,0:T(8,128)S(1)}") == 2 * 8 * 128 * 4
    assert hlo_profile.shape_bytes("f32[2,1024,768]{2,1,0:T(8,128)}") == 2 * 1024 * 768 * 4


def test_bytes_per_op_and_buffers_by_hand():
    p = hlo_profile.profile(HLO)
    matmul = 16 * 64 * 4 + 16 * 32 * 2 + 32 * 64 * 2  # output + both operands
    fusion = 4 * 8 * 4 * 2  # in the loop body, counted once (as XLA's cost analysis does)
    compare = 1 + 4 + 4  # the loop condition is not walked; its ops are not counted
    copy = (16 * 64 * 4 + 4) + 16 * 64 * 4  # its tuple (less the operand it aliases), operand
    assert dict(p.by_op) == {"bwd h/attn/qkv/dot_general": matmul,
                             "fwd h/mlp/fc/dot_general": fusion, "copy-start f32[16,64]": copy}
    assert p.total_bytes == matmul + fusion + copy != matmul + fusion + copy + compare
    assert p.by_op[0][0] == "bwd h/attn/qkv/dot_general"  # largest first
    # Buffers are single arrays (tuples split), largest first, labelled by their op.
    assert p.buffers[0][1:] == ("f32[16,64]", 16 * 64 * 4)
    assert ("fwd h/mlp/fc/dot_general", "f32[4,8]", 128) in p.buffers


def test_slices_read_what_they_return():
    hlo = """ENTRY %main (p: f32[96,512]) -> f32[24,512] {
  %p = f32[96,512]{1,0} parameter(0)
  %slice-start.1 = ((f32[96,512]{1,0}), f32[24,512]{1,0}, s32[]) slice-start(%p), slice={[0:24], [0:512]}
  %slice-done.1 = f32[24,512]{1,0} slice-done(%slice-start.1)
  %s2 = f32[24,512]{1,0} slice(%p), slice={[24:48], [0:512]}
  ROOT %c = f32[48,512]{1,0} custom-call(%slice-done.1, %s2), custom_call_target="ConcatBitcast"
}
"""
    p = hlo_profile.profile(hlo)
    # Read and write 24 rows each (+ the start's 4-byte context); the concat is free.
    assert dict(p.by_op) == {"slice-start f32[24,512]": 2 * (24 * 512 * 4 + 4),
                             "slice f32[24,512]": 2 * 24 * 512 * 4}
    assert "f32[96,512]" not in [shape for _, shape, _ in p.buffers]  # the aliased operand


def test_top_limits_and_zero_keeps_all():
    assert len(hlo_profile.profile(HLO, top=1).by_op) == 1
    assert len(hlo_profile.profile(HLO, top=0).by_op) == 3


@pytest.mark.parametrize("op_name,label", [
    ("jit(_train_step)/jvp(GPT)/h_11/attn/proj/dot_general", "fwd h/attn/proj/dot_general"),
    ("jit(_train_step)/transpose(jvp(GPT))/GPT._scan_blocks/while/body/closed_call/checkpoint/"
     "h/mlp/proj/dot_general", "bwd h/mlp/proj/dot_general"),
    ("jit(_train_step)/add", "add f32[2]"),
])
def test_labels_merge_layers_and_drop_wrappers(op_name, label):
    ins = hlo_profile.Instruction("f", "f32[2]", "fusion", f'%x), metadata={{op_name="{op_name}"}}')
    assert ins.label == label
