"""What bounds a compiled step: its HBM traffic and largest buffers, read from the optimized HLO.

XLA's cost analysis gives one total of bytes accessed. To say *where* they go, this walks the
compiled module's text: every instruction that runs (the entry computation and what it calls,
loop bodies once as XLA's cost analysis counts them, or with `every_trip` as many times as
they run), its bytes as output + operands (fused
computations are inside their fusion, so never counted twice), grouped by the JAX op that
produced it (`metadata={op_name=...}`), layers merged. The total is an estimate of the same
kind as XLA's (tests compare the two on a compiled step). `aot` counts every trip: the fsdp
collective matmuls are loops XLA counts once (see `matmul_flops`). A scanned model's traffic
comes from unscanned 1- and 2-layer compiles, extrapolated like its cost
(`aot.layer_extrapolated_cost`).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict

# Instructions that move no HBM data of their own.
FREE = {"parameter", "get-tuple-element", "tuple", "constant", "bitcast", "while", "call",
        "conditional", "after-all", "partition-id", "replica-id", "opt-barrier", "iota",
        "add-dependency", "domain"}
FREE_CALLS = {"ConcatBitcast"}  # custom calls that only relabel memory (slices DMA'd in place)
_ITEMSIZE = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1,
             "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
             "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_ARRAY = re.compile(r"\b([a-z]+\d*[a-z0-9]*)\[([\d,]*)\](?:\{([^}]*)\})?")
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) ")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = (.+?) ([a-z][a-z0-9-]*)\((.*)$")
_CALLEE = re.compile(r"\b(body|condition|true_computation|false_computation|to_apply|calls)="
                     r"%([^\s,]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_WRAPPERS = {"checkpoint", "while", "body", "cond", "closed_call", "rematted_computation"}


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape string (arrays and tuples), with the minor dimensions padded to
    the layout's tile: `f32[8,64]{1,0:T(8,128)}` is stored, and moved, as f32[8,128]."""
    total = 0
    for array in _ARRAY.finditer(shape):
        dtype, dims, layout = array.groups()
        sizes = [int(d) for d in dims.split(",") if d]
        minor_to_major, _, tiling = (layout or "").partition(":")
        tile = re.match(r"T\(([\d,]+)\)", tiling)
        if tile and minor_to_major:
            order = [int(d) for d in minor_to_major.split(",")]
            for dim, t in zip(order, reversed([int(x) for x in tile.group(1).split(",")])):
                sizes[dim] = -(-sizes[dim] // t) * t
        total += _ITEMSIZE.get(dtype, 4) * math.prod(sizes)
    return total


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str
    opcode: str
    rest: str  # operands and attributes

    @property
    def operands(self) -> list[str]:
        depth, args = 1, []
        for i, ch in enumerate(self.rest):  # the operand list ends at its closing paren
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if depth == 0:
                args = re.findall(r"%([^\s,)]+)", self.rest[:i])
                break
        return args

    @property
    def results(self) -> str:
        """The output shape less what an async start's ((aliased operands), ...) repeats."""
        return self.shape[self.shape.index(")") + 1:] if self.shape.startswith("((") \
            else self.shape

    @property
    def label(self) -> str:
        """The JAX op that produced it, short and layer-free: 'bwd h/mlp/fc/dot_general'; an
        op without a module path (or without metadata) also names its largest output array."""
        found, target = _OP_NAME.search(self.rest), _TARGET.search(self.rest)
        arrays = [(shape_bytes(a.group(0)), f"{a.group(1)}[{a.group(2)}]")
                  for a in _ARRAY.finditer(self.results)]
        largest = max(arrays)[1] if arrays else ""
        if not found:
            return f"{target.group(1) if target else self.opcode} {largest}"
        path = found.group(1).split("/", 1)[-1]  # drop jit(train_step)
        phase = "bwd " if path.startswith("transpose(") else "fwd " if "jvp(" in path else ""
        parts = [re.sub(r"^h_\d+$", "h", p) for p in path.split("/")
                 if "(" not in p and p not in _WRAPPERS and not p.startswith("GPT._")]
        parts = parts or [self.opcode]
        return phase + "/".join(parts) + (f" {largest}" if len(parts) == 1 else "")


def parse(hlo_text: str) -> tuple[dict[str, list[Instruction]], str]:
    """(computation name -> instructions, entry name) of an HLO module's text."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in hlo_text.splitlines():
        head = _COMPUTATION.match(line)
        if head and line.rstrip().endswith("{"):
            current = computations.setdefault(head.group(2), [])
            entry = head.group(2) if head.group(1) else entry
            continue
        found = _INSTRUCTION.match(line)
        if found and current is not None:
            current.append(Instruction(*found.groups()))
    return computations, entry


def _bytes_moved(ins: Instruction, sizes: dict[str, int]) -> int:
    """HBM bytes one instruction reads and writes: its operands and output, except that a
    slice reads only what it returns, an unfused dynamic-update-slice writes its update in
    place, and an async start's output tuple repeats the operands it aliases."""
    operands = [sizes.get(o, 0) for o in ins.operands]
    out = sizes[ins.name]
    if ins.opcode.endswith("-start"):
        out = max(0, out - sum(operands))
    if ins.opcode in ("slice", "dynamic-slice", "slice-start"):
        return 2 * out
    if ins.opcode == "dynamic-update-slice":
        return 2 * operands[1]
    return out + sum(operands)


@dataclasses.dataclass
class Profile:
    total_bytes: float  # HBM bytes accessed per step, this module's estimate
    by_op: list[tuple[str, float]]  # (op label, bytes), largest first
    buffers: list[tuple[str, str, int]]  # (op label, shape, bytes), largest outputs first


def profile(hlo_text: str, top: int = 8, every_trip: bool = False) -> Profile:
    """HBM bytes per op label and the largest buffers of a compiled module (see module doc);
    `top=0` keeps every op label (for extrapolation). `every_trip`: a loop body counts as many
    times as the loop runs (`loop_trips`), not once as XLA's cost analysis counts it."""
    computations, entry = parse(hlo_text)
    sizes = {i.name: shape_bytes(i.shape) for body in computations.values() for i in body}
    defs = {i.name: i for body in computations.values() for i in body}
    traffic: dict[str, float] = defaultdict(float)
    buffers: dict[tuple[str, str], int] = {}
    todo = [(entry, 1)]
    while todo:
        name, times = todo.pop()
        for ins in computations.get(name, []):
            callees = dict(_CALLEE.findall(ins.rest))
            if ins.opcode in ("while", "call", "conditional"):
                trips = (loop_trips(ins, callees, computations, defs) or 1
                         if every_trip and ins.opcode == "while" else 1)
                todo += [(callees[k], times * trips) for k in (
                    "body", "to_apply", "calls", "true_computation", "false_computation")
                    if k in callees]
                for group in _BRANCHES.findall(ins.rest):
                    todo += [(c.strip().lstrip("%"), times) for c in group.split(",")]
            if ins.opcode in FREE or ins.opcode.endswith("-done"):
                continue
            if ins.opcode == "custom-call" and _TARGET.search(ins.rest).group(1) in FREE_CALLS:
                continue
            label = ins.label
            traffic[label] += times * _bytes_moved(ins, sizes)
            for array in _ARRAY.finditer(ins.results):
                key = (label, f"{array.group(1)}[{array.group(2)}]")
                buffers[key] = max(buffers.get(key, 0), shape_bytes(array.group(0)))
    by_op = sorted(traffic.items(), key=lambda kv: -kv[1])
    biggest = sorted(((label, shape, b) for (label, shape), b in buffers.items()),
                     key=lambda x: -x[2])
    return Profile(sum(traffic.values()), by_op[:top or None], biggest[:top or None])


# -- FLOPs that run: every dot and convolution, times the trip counts of the loops around it ----

_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_DIMS = re.compile(r"\b(lhs_contracting_dims|lhs_batch_dims)=\{([\d,]*)\}")
_DIM_LABELS = re.compile(r"dim_labels=([a-z0-9?]+)_([a-z0-9?]+)->([a-z0-9?]+)")


def _dims(shape: str) -> list[int]:
    array = _ARRAY.search(shape)
    return [int(d) for d in array.group(2).split(",") if d] if array else []


_WINDOW = re.compile(r"window=\{([^}]*)\}")


def _window(rest: str, rank: int) -> list[list]:
    """[stride, (pad low, pad high), lhs dilation, rhs dilation] per spatial dimension."""
    fields = dict(f.split("=", 1) for f in (_WINDOW.search(rest) or [None, ""])[1].split()
                  if "=" in f)

    def per_dim(key: str, default):
        if key not in fields:
            return [default] * rank
        return [tuple(int(p) for p in v.split("_")) if "_" in v else int(v)
                for v in fields[key].split("x")]
    return [per_dim("stride", 1), per_dim("pad", (0, 0)), per_dim("lhs_dilate", 1),
            per_dim("rhs_dilate", 1)]


def _taps(size: int, out: int, window: int, stride: int, pad: tuple[int, int],
          lhs_dilate: int, rhs_dilate: int) -> int:
    """How many (output position, window position) pairs of one spatial dimension read a
    real input element (not padding, not a hole of the input's dilation)."""
    last = (size - 1) * lhs_dilate
    count = 0
    for o in range(out):
        for k in range(window):
            at = o * stride + k * rhs_dilate - pad[0]
            count += 0 <= at <= last and at % lhs_dilate == 0
    return count


def _matmul_flops(ins: Instruction, shapes: dict[str, str]) -> float:
    """2 x output elements x contracted size of one dot or convolution (0 for other ops)."""
    out = math.prod(_dims(ins.results))
    operands = ins.operands
    if ins.opcode == "dot" and operands:
        lhs = _dims(shapes.get(operands[0], ""))
        contracting = dict(_DIMS.findall(ins.rest)).get("lhs_contracting_dims", "")
        size = math.prod(lhs[int(d)] for d in contracting.split(",") if d) if lhs else 0
        return 2.0 * out * size
    if ins.opcode == "convolution" and len(operands) > 1:
        labels = _DIM_LABELS.search(ins.rest)
        lhs, kernel = _dims(shapes.get(operands[0], "")), _dims(shapes.get(operands[1], ""))
        if not labels or len(kernel) != len(labels.group(2)) or len(lhs) != len(labels.group(1)):
            return 0.0
        lhs_l, kernel_l, out_l = labels.groups()
        outs = _dims(ins.results)
        # per output element: the kernel's input features (per feature group) times the window
        # taps that land on real input; TPU writes batched matmuls as convolutions whose
        # windows, dilated and strided, hit one element each, so counting window sizes
        # would overcount them many times over
        per_output = kernel[kernel_l.index("i")]
        spatial = sorted(c for c in out_l if c.isdigit())  # window entry i is dimension "i"
        non_spatial = math.prod(n for n, c in zip(outs, out_l) if not c.isdigit())
        window = _window(ins.rest, len(spatial))
        taps = 1
        for c in spatial:
            taps *= _taps(lhs[lhs_l.index(c)], outs[out_l.index(c)], kernel[kernel_l.index(c)],
                          *(w[int(c)] for w in window))
        return 2.0 * non_spatial * per_output * taps
    return 0.0


_INDEX = re.compile(r"\bindex=(\d+)")


def _constant(name: str, defs: dict[str, Instruction]) -> int | None:
    """The integer a scalar constant (or a copy/convert/bitcast of one) holds, else None."""
    ins = defs.get(name)
    while ins is not None and ins.opcode in ("copy", "convert", "bitcast") and ins.operands:
        ins = defs.get(ins.operands[0])
    if ins is None or ins.opcode != "constant":
        return None
    value = ins.rest.split(")", 1)[0].strip()
    return int(value) if value.lstrip("-").isdigit() else None


def _trip_count(loop: Instruction, callees: dict[str, str],
                computations: dict[str, list[Instruction]],
                defs: dict[str, Instruction]) -> int | None:
    """The trip count of a `while i < C` loop whose counter starts at a constant and grows by
    a constant (XLA's windowed einsum loops: collective matmuls over fsdp; they carry no
    known_trip_count), or None for any other loop."""
    cond, body = computations.get(callees.get("condition", "")), computations.get(callees["body"])
    if not cond or not body or not loop.operands or "direction=LT" not in cond[-1].rest:
        return None
    counter, limit = (defs.get(n) for n in cond[-1].operands[:2])
    if counter is None or counter.opcode != "get-tuple-element" or limit is None:
        return None
    slot, end = int(_INDEX.search(counter.rest).group(1)), _constant(limit.name, defs)
    init = defs.get(loop.operands[0])
    step = defs.get(body[-1].operands[slot]) if body[-1].opcode == "tuple" else None
    if end is None or init is None or init.opcode != "tuple" or step is None \
            or step.opcode != "add":
        return None
    start = _constant(init.operands[slot], defs)
    stride = max([c for c in (_constant(n, defs) for n in step.operands) if c] or [0])
    if start is None or stride <= 0:
        return None
    return max(0, -(-(end - start) // stride))


def loop_trips(loop: Instruction, callees: dict[str, str],
               computations: dict[str, list[Instruction]],
               defs: dict[str, Instruction]) -> int | None:
    """How many times a while loop runs: its known_trip_count, else read from its counter."""
    known = _TRIP_COUNT.search(loop.rest)
    return int(known.group(1)) if known else _trip_count(loop, callees, computations, defs)


def matmul_flops(hlo_text: str) -> tuple[float, int]:
    """(FLOPs of every dot and convolution that runs, loops without a known trip count) of a
    compiled module: a loop body counts trip-count times (XLA's cost analysis counts it once),
    fused and called computations count where they are called."""
    computations, entry = parse(hlo_text)
    shapes = {i.name: i.shape for body in computations.values() for i in body}
    defs = {i.name: i for body in computations.values() for i in body}
    total, unknown = 0.0, 0
    todo = [(entry, 1)]
    while todo:
        name, times = todo.pop()
        for ins in computations.get(name, []):
            total += times * _matmul_flops(ins, shapes)
            callees = dict(_CALLEE.findall(ins.rest))
            if ins.opcode == "while" and "body" in callees:
                count = loop_trips(ins, callees, computations, defs)
                unknown += count is None
                todo.append((callees["body"], times * (count or 1)))
            elif ins.opcode in ("fusion", "call", "async-start", "custom-call") or \
                    ins.opcode.endswith("-start"):
                todo += [(callees[k], times) for k in ("calls", "to_apply") if k in callees]
            elif ins.opcode == "conditional":
                branches = [c.strip().lstrip("%") for group in _BRANCHES.findall(ins.rest)
                            for c in group.split(",")]
                branches += [callees[k] for k in ("true_computation", "false_computation")
                             if k in callees]
                todo += [(b, times) for b in branches]  # every branch: an upper bound
    return total, unknown
