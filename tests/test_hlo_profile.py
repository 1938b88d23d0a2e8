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


def test_matmul_flops_count_each_loop_trip():
    """A 3-step scan of one matmul, forward and backward: XLA's cost analysis counts the loop
    body once; the count from the HLO counts every trip (by hand: 3 x 2 x 4 x 8 x 8 forward,
    twice that backward)."""
    import jax
    import jax.numpy as jnp

    def f(x, w):
        return jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0].sum()

    compiled = jax.jit(jax.grad(f, argnums=1)).lower(jnp.ones((4, 8)),
                                                     jnp.ones((3, 8, 8))).compile()
    assert hlo_profile.matmul_flops(compiled.as_text()) == (3 * 3 * 2 * 4 * 8 * 8, 0)


@pytest.mark.parametrize("scan_layers,loss_chunks,remat", [(True, 2, "save_dots"),
                                                           (False, 0, "none")])
def test_a_compiled_train_step_counts_at_least_the_models_flops(scan_layers, loss_chunks,
                                                                  remat):
    """Every loop counted (layer scan, loss-chunk scan, microbatch scan): the compiled step's
    matmul FLOPs are at least the model's 6N + 12LDT per token (remat and full causal scores
    only add to them)."""
    import jax

    from gpt_jax import config as config_lib
    from gpt_jax import flops, sharding
    from gpt_jax import model as model_lib
    from gpt_jax.config import typed
    from gpt_jax.sharding import MeshConfig
    from gpt_jax.step import Trainer

    config = config_lib.load_preset("tiny")
    config.model.update(scan_layers=scan_layers, loss_chunks=loss_chunks, remat_policy=remat,
                        attention_impl="xla")
    config.train.update(global_batch_size=4, microbatches=2)
    config = typed(config)
    mesh = MeshConfig.from_dict({"data": 1, "fsdp": 1, "tensor": 1}).make(jax.devices()[:1])
    trainer = Trainer.for_config(config, mesh)
    with sharding.activate(mesh, trainer.rules):
        T = config.model.block_size
        batch = {k: jax.ShapeDtypeStruct((4, T), "int32", sharding=trainer.batch_sharding)
                 for k in ("inputs", "targets")}
        compiled = trainer.jit_train_step().lower(trainer.abstract_state(), batch).compile()
    counted, unknown = hlo_profile.matmul_flops(compiled.as_text())
    # 6N counts every parameter; biases and norm scales (vectors) are not matmul work
    vectors = sum(x.size for path, x in jax.tree_util.tree_flatten_with_path(
        model_lib.abstract_params(config.model))[0] if path[-1].key in ("bias", "scale"))
    model = (flops.flops_per_token(config.model, T) - 6 * vectors) * 4 * T
    assert unknown == 0
    assert counted >= model, (counted, model)
    assert counted < 3 * model  # and not wildly over: each matmul counted where it runs


WINDOWED_LOOP = """HloModule m

%cond (p: (f32[2,3], u32[])) -> pred[] {
  %p = (f32[2,3]{1,0}, u32[]) parameter(0)
  %limit = u32[] constant(4)
  %i = u32[] get-tuple-element(%p), index=1
  ROOT %lt = pred[] compare(%i, %limit), direction=LT
}

%body (q: (f32[2,3], u32[])) -> (f32[2,3], u32[]) {
  %q = (f32[2,3]{1,0}, u32[]) parameter(0)
  %x = f32[2,3]{1,0} get-tuple-element(%q), index=0
  %w = f32[3,3]{1,0} parameter(1)
  %d = f32[2,3]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %j = u32[] get-tuple-element(%q), index=1
  %two = u32[] constant(2)
  %next = u32[] add(%j, %two)
  ROOT %t = (f32[2,3]{1,0}, u32[]) tuple(%d, %next)
}

ENTRY %main (a: f32[2,3]) -> f32[2,3] {
  %a = f32[2,3]{1,0} parameter(0)
  %zero = u32[] constant(0)
  %start = u32[] copy(%zero)
  %init = (f32[2,3]{1,0}, u32[]) tuple(%a, %start)
  %loop = (f32[2,3]{1,0}, u32[]) while(%init), condition=%cond, body=%body
  ROOT %out = f32[2,3]{1,0} get-tuple-element(%loop), index=0
}
"""


def test_a_loop_without_a_known_trip_count_is_counted_from_its_counter():
    """XLA's fsdp collective matmuls (windowed einsum) are `while i < C` loops, i += 2 on TPU,
    with no known_trip_count: their trips come from the counter (0, 2: two), and a loop whose
    counter cannot be read counts once and is reported."""
    one = 2 * 2 * 3 * 3
    assert hlo_profile.matmul_flops(WINDOWED_LOOP) == (2 * one, 0)
    unreadable = WINDOWED_LOOP.replace("%start = u32[] copy(%zero)", "%start = u32[] parameter(1)")
    assert hlo_profile.matmul_flops(unreadable) == (one, 1)
    once, every = (hlo_profile.profile(WINDOWED_LOOP, top=0, every_trip=e).total_bytes
                   for e in (False, True))
    assert once < every < 2 * once  # the body's bytes twice, the entry's once


def test_a_batched_matmul_written_as_a_dilated_convolution_counts_its_real_work():
    """TPU writes attention's batched QK^T as a convolution whose batch and head axes are
    spatial windows, dilated and strided so that each output reads one element of each
    (line taken from a v5e compile, sizes shrunk): 2 B H T T D, not that times B H; a real
    3-tap convolution with padding counts its 3N - 2 taps."""
    B, H, T, D = 4, 12, 8, 16
    hlo = f"""HloModule m

ENTRY %main (a: f32[{B},{T},{H},{D}], b: f32[{B},{T},{H},{D}]) -> f32[{B},{H},{T},{T}] {{
  %a = f32[{B},{T},{H},{D}]{{3,2,1,0}} parameter(0)
  %b = f32[{B},{T},{H},{D}]{{3,2,1,0}} parameter(1)
  ROOT %s = f32[{B},{H},{T},{T}]{{3,2,1,0}} convolution(%a, %b), window={{size=4x12 stride=3x11 lhs_dilate=4x12}}, dim_labels=0b1f_0o1i->01bf
}}
"""
    assert hlo_profile.matmul_flops(hlo) == (2.0 * B * H * T * T * D, 0)
    N, C = 10, 5
    conv = f"""HloModule m

ENTRY %main (x: f32[1,{N},{C}], k: f32[3,{C},{C}]) -> f32[1,{N},{C}] {{
  %x = f32[1,{N},{C}]{{2,1,0}} parameter(0)
  %k = f32[3,{C},{C}]{{2,1,0}} parameter(1)
  ROOT %y = f32[1,{N},{C}]{{2,1,0}} convolution(%x, %k), window={{size=3 pad=1_1}}, dim_labels=b0f_0io->b0f
}}
"""
    assert hlo_profile.matmul_flops(conv) == (2.0 * C * C * (3 * N - 2), 0)
