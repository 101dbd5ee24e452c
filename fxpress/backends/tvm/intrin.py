"""int8 dot-product tensor intrinsics for x86 CPUs without AVX-512 (TVM ships only 512-bit ones).

Each computes, for 8 int32 accumulators, ``C[i] += sum_k u8 A[k] * s8 B[i, k]`` over k < 4
(one 32-bit group of activations broadcast against an 8x4 weight tile) into a register-tile
accumulator (scope "local", as the conv template keeps it):

* ``fxpress_dot_8x4_avx2``: ``vpmaddubsw`` (u8 x s8 pairs -> saturating int16) then
  ``vpmaddwd`` by ones (int16 pairs -> int32), the 256-bit sequence of TVM's legacy topi
  skylake ``dot_16x1x16_uint8_int8_int32``. Exact only where no pair sum saturates: with
  u8 activations up to 255 that is every adjacent weight pair ``|w0| + |w1| <= 128``
  (7-bit weights always; `pairs_fit` checks a weight tensor).
* ``fxpress_dot_8x4_vnni``: one ``vpdpbusd`` on ymm registers (AVX-VNNI, or AVX-512 VNNI
  with VL): exact for any weights.
* ``fxpress_dot_16x4_vnni``: the same on zmm, 16 accumulators (AVX-512 VNNI): 64 MACs per
  instruction against 16 for an fp32 zmm FMA (the ymm form gets only 2x over fp32 there);
  kernels whose output channels do not divide by 16 keep the ymm form.

    name = int8_intrin(target)           # None on a target with neither
    sch.tensorize(inner_channel_loop, name)

Used by the conv and dense (int8 matmul) templates in schedules.py, chosen by `plan`.
"""
from __future__ import annotations

import numpy as np

__all__ = ["AVX2_DOT_8x4", "VNNI_DOT_16x4", "VNNI_DOT_8x4", "int8_intrin", "pairs_fit", "plan", "register"]

AVX2_DOT_8x4 = "fxpress_dot_8x4_avx2"
VNNI_DOT_8x4 = "fxpress_dot_8x4_vnni"
VNNI_DOT_16x4 = "fxpress_dot_16x4_vnni"  # AVX-512 VNNI: 16 accumulators per zmm, 4x fp32 FMA's MACs
LANES = 8      # int32 accumulators per intrinsic call (one ymm register)
GROUP = 4      # reduction elements per accumulator per call (one u8x4 activation group)


def _funcs(lanes: int = LANES):
    """(desc, avx2, vnni) for `lanes` int32 accumulators (8: one ymm; 16: one zmm, vnni only)."""
    from tvm.script import tirx as T
    i8, u8, acc = f"int8x{4 * lanes}", f"uint8x{4 * lanes}", f"int32x{lanes}"
    vpdpbusd = "llvm.x86.avx512.vpdpbusd.512" if lanes == 16 else "llvm.x86.avx512.vpdpbusd.256"

    @T.prim_func(s_tir=True)
    def desc(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def avx2(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((8, 4), "int8", offset_factor=1),
             C: T.Buffer((8,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:8], A[0:4], B[0:8, 0:4])
            T.writes(C[0:8])
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), 8),
                              dtype="uint8x32")
            pairs = T.call_llvm_pure_intrin(T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.ub.sw"),
                                            a, B.vload([0, 0], dtype="int8x32"), dtype="int16x16")
            C[T.ramp(T.int32(0), 1, 8)] += T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd"), pairs, T.int16x16(1), dtype="int32x8")

    @T.prim_func(s_tir=True)
    def vnni(A: T.Buffer((4,), "uint8", offset_factor=1), B: T.Buffer((lanes, 4), "int8", offset_factor=1),
             C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local")) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:4], B[0:lanes, 0:4])
            T.writes(C[0:lanes])
            # LLVM >= 21 declares vpdpbusd's operands as <N x i8> (older: <N/4 x i32>)
            a = T.reinterpret(T.broadcast(T.reinterpret(A.vload([0], "uint8x4"), dtype="int32"), lanes),
                              dtype=u8)
            C[T.ramp(T.int32(0), 1, lanes)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id(vpdpbusd), C.vload([0], dtype=acc), a,
                B.vload([0, 0], dtype=i8), dtype=acc)

    return desc, avx2, vnni


def register() -> None:
    """Register both intrinsics with TVM once (under fxpress_* names; TVM's own are untouched)."""
    from tvm.s_tir import TensorIntrin
    if TensorIntrin.get(AVX2_DOT_8x4, allow_missing=True) is not None:
        return
    desc, avx2, vnni = _funcs()
    TensorIntrin.register(AVX2_DOT_8x4, desc, avx2)
    TensorIntrin.register(VNNI_DOT_8x4, desc, vnni)
    desc16, _, vnni16 = _funcs(16)
    TensorIntrin.register(VNNI_DOT_16x4, desc16, vnni16)


def int8_intrin(target) -> str | None:
    """The 8x4 intrinsic for an llvm x86 `target`: VNNI where it has it, AVX2 otherwise, else None."""
    if target.kind.name != "llvm" or "x86" not in str(target.attrs.get("mtriple", "x86")):
        return None
    from .target import target_features
    feats = target_features(target)
    if {"avx512vnni", "avx512f"} <= feats:
        return VNNI_DOT_16x4
    if "avxvnni" in feats or {"avx512vnni", "avx512vl"} <= feats:
        return VNNI_DOT_8x4
    if "avx2" in feats:
        return AVX2_DOT_8x4
    return None


def pairs_fit(weight: np.ndarray, axis: int) -> bool:
    """Whether every adjacent pair along `axis` (the reduction the intrinsic groups by 4) has
    |w0| + |w1| <= 128, so vpmaddubsw's int16 pair sums cannot saturate for any u8 input.

    >>> pairs_fit(np.array([[64, -64, 127, 1]], dtype=np.int8), axis=1)
    True
    >>> pairs_fit(np.array([[127, 2, 0, 0]], dtype=np.int8), axis=1)
    False
    """
    w = np.abs(np.moveaxis(weight.astype(np.int32), axis, 0))
    if w.shape[0] % 2:
        return False
    return bool(((w[0::2] + w[1::2]) <= 128).all())


def _weight_constant(func, call, sch, conv):
    """The relax.Constant bound to the conv's weight parameter in `call`, or None."""
    from tvm import relax
    from tvm.ir.expr import Constant
    weight = sch.get(conv).reads[1].source  # this TVM's PrimFunc params are the buffers themselves
    args = call.args[1].fields if isinstance(call.args[1], relax.Tuple) else [call.args[1]]
    for i, p in enumerate(func.params):
        if p.same_as(weight) and i < len(args):
            return args[i] if isinstance(args[i], Constant) else None
    return None


def plan(mod, target) -> dict[str, str]:
    """PrimFunc name -> int8 intrinsic for each u8 x s8 conv / dense kernel of a lowered Relax module.

    VNNI for every int8 conv where the target has it; the AVX2 pair sequence only where the
    conv's weight is a constant whose adjacent input-channel pairs cannot saturate
    (`pairs_fit`); other kernels keep LLVM's own int8 code (exact, int32 multiplies).
    """
    import tvm
    from tvm import relax, s_tir, tirx
    name = int8_intrin(target)
    if name is None:
        return {}
    from .schedules import _conv_block, int8_matmul_block
    out: dict[str, str] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")
    for func in mod.functions.values():
        if not isinstance(func, relax.Function):
            continue
        calls: list = []
        relax.analysis.post_order_visit(
            func.body, lambda e, found=calls: found.append(e)
            if isinstance(e, relax.Call) and e.op.same_as(call_tir) else None)
        for call in calls:
            gv = call.args[0]
            prim = mod[gv] if gv in mod.functions else None
            if not isinstance(prim, tirx.PrimFunc):
                continue
            sch = s_tir.Schedule(prim)
            blk, axis = _conv_block(sch), 2  # HWIO weight: pairs along I
            if blk is None or [str(r.source.dtype) for r in sch.get(blk).reads] != ["uint8", "int8"]:
                blk, axis = int8_matmul_block(sch), 0  # [K, N] weight: pairs along K
            if blk is None:
                continue
            if name == AVX2_DOT_8x4:
                w = _weight_constant(prim, call, sch, blk)
                if w is None or not pairs_fit(w.value.numpy(), axis=axis):
                    continue
            out_channels = int(sch.get(sch.get_loops(blk)[3 if axis == 2 else 1]).extent)
            # a zmm tile needs 16 output channels; fewer (an fc of 1000): the ymm form
            out[gv.name_hint] = VNNI_DOT_8x4 if name == VNNI_DOT_16x4 and out_channels % 16 else name
    if out:
        register()
    return out
