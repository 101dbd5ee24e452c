"""CPU schedule templates for the fused Relax kernels, and the candidates tuning measures.

Untuned TVM runs each fused kernel as written by legalization: one thread, scalar loops
(ResNet-18: 2.2 s against ORT's 24 ms here). MetaSchedule's generic search space needs
thousands of trials to find what is known about direct convolution on a SIMD CPU, so the
kernels that hold the time get a template instead:

* ``conv2d_nhwc`` (ConvertLayout gives NHWC activations and HWIO weights): output tiled as
  ``wb`` pixels x ``fb`` channels held in vector registers, reduction over (ry, rx, rc)
  inside the tile, output channel blocks outermost and parallel with the rows; the weight is
  re-laid out to ``[F/fb, KH, KW, C, fb]`` in a `layout_rewrite_preproc` block, which
  `SplitLayoutRewritePreproc` + `FoldConstant` turn into a compile-time repack of the
  constant (so a weight tile is one contiguous stream); the elementwise epilogue (BN affine,
  bias, residual add, ReLU, requantization) is inlined and computed on the register tile.
* everything else: parallel outer spatial loops, innermost spatial loop vectorized (moved
  inside the reduction loops for pooling, means and small matmuls).

`candidates(func)` lists the (wb, fb) choices tuning measures; `schedule(func)` without a
choice uses the register-budget heuristic (about 8 accumulators). Float and integer kernels
share the templates (the integer conv accumulates int32 in the same tile).
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "SCHEDULED_ATTR",
    "ConvChoice",
    "apply_default_schedules",
    "candidates",
    "default_choice",
    "schedule",
    "vector_lanes",
]

SCHEDULED_ATTR = "tirx.is_scheduled"
INT8_LANES, INT8_GROUP = 8, 4   # the 8x4 int8 dot-product intrinsics (intrin.py)


def _int8_lanes(intrin: str | None) -> int:
    """Accumulators per call of one of intrin.py's intrinsics (named fxpress_dot_<lanes>x4_*)."""
    return 16 if intrin and intrin.startswith("fxpress_dot_16x4") else INT8_LANES
_MAX_ACC = 14        # vector accumulators a tile may hold (16 ymm registers on AVX2)


@dataclass(frozen=True)
class ConvChoice:
    wb: int          # output pixels per register tile (along W)
    fb: int          # output channels per register tile (a multiple of the vector width)


def _ext(sch, loop) -> int:
    return int(sch.get(loop).extent)


def _divisors(n: int, cap: int) -> list[int]:
    return [d for d in range(1, min(n, cap) + 1) if n % d == 0]


def _blocks(sch):
    return list(sch.get_child_blocks(sch.get_sblock("root")))


def _name(sch, block) -> str:
    return str(sch.get(block).name_hint)


def _conv_block(sch):
    """The single NHWC conv2d block with HWIO weights (iters SSSSRRR), or None."""
    convs = [b for b in _blocks(sch) if _name(sch, b).startswith("conv2d_nhwc")]
    if len(convs) != 1:
        return None
    conv = convs[0]
    blk = sch.get(conv)
    if "".join(_iter_kinds(sch, conv) or []) != "SSSSRRR" or len(blk.reads) != 2:
        return None
    weight_index = [str(r.min) for r in blk.reads[1].region]
    iv = [str(v.var) for v in blk.iter_vars]
    if weight_index != [iv[4], iv[5], iv[6], iv[3]]:  # weight[ry, rx, rc, ff]: HWIO
        return None
    return conv


def _conv_dims(sch, conv) -> tuple[int, int]:
    """(output width W, output channels F) of the conv block."""
    _, _, w, f, *_ = sch.get_loops(conv)
    return _ext(sch, w), _ext(sch, f)


def vector_lanes(target=None) -> int:
    """fp32/int32 lanes of the widest vector unit LLVM will use for `target` (8 on AVX2).

    The tuning worker (no fxpress import) reads it from the target, whose mattr fxpress.hw
    built; in-process callers pass hw's lanes instead (`target.target_lanes`).
    """
    try:
        from tvm.target import codegen
        feats = codegen.llvm_get_cpu_features(target) if target is not None else {}
        return 16 if "avx512f" in {str(k) for k in feats} else 8
    except Exception:
        return 8


def _tiles(W: int, F: int, lanes: int) -> list[ConvChoice]:
    fbs = [fb for fb in (lanes, 2 * lanes, 4 * lanes) if F % fb == 0]
    if not fbs:  # e.g. channels pruned to an odd count: one partial-vector channel tile
        fbs = [max(_divisors(F, 2 * lanes))]
    out = []
    for fb in fbs:
        vecs = -(-fb // lanes)
        for wb in _divisors(W, 14):
            acc = wb * vecs
            if lanes // 2 <= acc <= _MAX_ACC or (acc < lanes // 2 and wb == W):
                out.append(ConvChoice(wb, fb))
        if not out:
            out.append(ConvChoice(max(_divisors(W, _MAX_ACC // vecs)), fb))
    return out


def _default_tile(W: int, F: int, lanes: int) -> ConvChoice:
    """About 8 accumulators, preferring 2-vector channel tiles (what tuning picks most often here)."""
    return min(_tiles(W, F, lanes),
               key=lambda c: (abs(c.wb * -(-c.fb // lanes) - 8), abs(c.fb - 2 * lanes), -c.wb))


def _func_dims(func) -> tuple[int, int] | None:
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    conv = _conv_block(sch)
    return None if conv is None else _conv_dims(sch, conv)


def candidates(func, lanes: int = 8) -> list[ConvChoice]:
    """The register tiles worth measuring for a conv kernel (empty for other kernels)."""
    dims = _func_dims(func)
    return [] if dims is None else _tiles(*dims, lanes)


def default_choice(func, lanes: int = 8) -> ConvChoice | None:
    """The tile `schedule(func)` uses without a choice (None for other kernels)."""
    dims = _func_dims(func)
    return None if dims is None else _default_tile(*dims, lanes)


def _int8_tensorizable(sch, conv, fb: int, lanes: int = INT8_LANES) -> bool:
    """u8 x s8 -> int32 conv whose channel tile and input channels fit the lanes x 4 intrinsics."""
    blk = sch.get(conv)
    dtypes = [str(r.source.dtype) for r in blk.reads]
    cin = _ext(sch, sch.get_loops(conv)[6])
    return (dtypes == ["uint8", "int8"] and str(blk.writes[0].source.dtype) == "int32"
            and cin % INT8_GROUP == 0 and fb % lanes == 0)


def _schedule_conv(sch, conv, choice: ConvChoice | None, lanes: int, intrin: str | None = None) -> bool:
    """The conv register-tile template; with `intrin` (an 8x4 or 16x4 u8 x s8 dot-product tensor
    intrinsic, see intrin.py) an int8 conv's inner (8/16 channels x 4 input channels) is one
    intrinsic call. Returns whether the intrinsic was used."""
    choice = choice or _default_tile(*_conv_dims(sch, conv), lanes)
    blocks = _blocks(sch)
    ci = [_name(sch, b) for b in blocks].index(_name(sch, conv))
    # Producers (padding, input quantization): inline what is elementwise into the pad; the
    # pad itself stays a parallel stage (inlined it would put a bounds test in the tile loop).
    for b in blocks[:ci]:
        if not _name(sch, b).startswith("pad"):
            try:
                sch.compute_inline(b)
            except Exception:  # noqa: BLE001 - a non-inlinable producer stays a root stage
                pass
    after = blocks[ci + 1:]
    for b in after[:-1]:
        sch.compute_inline(b)
    if after:
        last = after[-1]
        sch.set_scope(conv, 0, "local")
    else:
        last = sch.cache_write(conv, 0, "local")
    n, h, w, f, ry, rx, rc = sch.get_loops(conv)
    fb, wb = choice.fb, choice.wb
    il = _int8_lanes(intrin)
    tensorize = intrin is not None and _int8_tensorizable(sch, conv, fb, il)
    wcache = sch.cache_read(conv, 1, "global")
    if tensorize:  # weight tile [F/fb, KH, KW, C/4, fb, 4]: one intrinsic reads lanes x 4 contiguous bytes
        g = INT8_GROUP
        sch.transform_layout(conv, ("read", 1), lambda a, b, c, d: (d // fb, a, b, c // g, d % fb, c % g))
    else:
        sch.transform_layout(conv, ("read", 1), lambda a, b, c, d: (d // fb, a, b, c, d % fb))
    sch.annotate(wcache, "meta_schedule.layout_rewrite_preproc", True)
    fo, fi = sch.split(f, [None, fb])
    wo, wi = sch.split(w, [None, wb])
    if tensorize:
        rco, rci = sch.split(rc, [None, INT8_GROUP])
        fio, fii = sch.split(fi, [None, il])
        sch.reorder(n, fo, h, wo, ry, rx, rco, wi, fio, fii, rci)
    else:
        sch.reorder(n, fo, h, wo, ry, rx, rc, wi, fi)
    sch.reverse_compute_at(last, wo)
    sch.parallel(sch.fuse(n, fo, h))
    sch.unroll(wi)
    if tensorize:
        sch.unroll(fio)
    else:
        sch.vectorize(fi)
    init = sch.decompose_reduction(conv, ry)
    if tensorize:
        sch.tensorize(fii, intrin)
    # Init, update and epilogue all index the tile with constants (pixel loops unrolled,
    # channel loops vectorized), so LLVM keeps the accumulators in registers: one loop over
    # a pixel left rolled would make the tile a stack array that every FMA loads and stores.
    depth = 3  # the fused (n, fo, h) loop, wo, then the tile's own loops
    for blk in (init, last):
        *pixels, chans = sch.get_loops(blk)[depth - 1:]
        for lp in pixels:
            sch.unroll(lp)
        sch.vectorize(chans)
    for b in _blocks(sch):
        if _name(sch, b).startswith("pad"):
            _parallel_vectorize(sch, b, lanes)
    return tensorize


def _iter_kinds(sch, block) -> list[str] | None:
    blk = sch.get(block)
    loops = sch.get_loops(block)
    if len(loops) != len(blk.iter_vars):
        return None
    kinds = []
    for iv in blk.iter_vars:
        if iv.iter_type == 0:
            kinds.append("S")
        elif iv.iter_type == 2:
            kinds.append("R")
        else:
            return None
    return kinds


def _parallel_vectorize(sch, block, lanes: int) -> None:
    """Outer spatial loops fused and parallel; innermost spatial loop vectorized."""
    loops = sch.get_loops(block)
    kinds = _iter_kinds(sch, block)
    if kinds is None or not loops:
        return
    spatial = [lp for lp, k in zip(loops, kinds) if k == "S"]
    reduce_ = [lp for lp, k in zip(loops, kinds) if k == "R"]
    if not spatial:
        return
    inner = spatial[-1]
    vec = None
    ext = _ext(sch, inner)
    if ext % lanes == 0 and ext >= lanes:
        vec_len = 4 * lanes if ext % (4 * lanes) == 0 else lanes
        outer_in, vec = sch.split(inner, [None, vec_len])
        spatial = spatial[:-1] + [outer_in]
    order = spatial + reduce_ + ([vec] if vec is not None else [])
    if len(order) > 1:
        sch.reorder(*order)
    if vec is not None:
        sch.vectorize(vec)
    # parallel and vectorized loops are checked against the block with its init still in it
    sch.parallel(sch.fuse(*spatial) if len(spatial) > 1 else spatial[0])
    if vec is not None and reduce_:
        init = sch.decompose_reduction(block, reduce_[0])
        sch.vectorize(sch.get_loops(init)[-1])


def _schedule_generic(sch, lanes: int) -> None:
    blocks = _blocks(sch)
    for b in blocks[:-1]:
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001 - reductions and multi-consumer blocks stay
            pass
    for b in _blocks(sch):
        _parallel_vectorize(sch, b, lanes)


def int8_matmul_block(sch):
    """The u8 x s8 -> int32 matmul block (iters SSR, weight read as [k, n]), or None."""
    mms = [b for b in _blocks(sch) if _name(sch, b).startswith("matmul")]
    if len(mms) != 1:
        return None
    blk = sch.get(mms[0])
    if ("".join(_iter_kinds(sch, mms[0]) or []) != "SSR" or len(blk.reads) != 2
            or [str(r.source.dtype) for r in blk.reads] != ["uint8", "int8"]
            or str(blk.writes[0].source.dtype) != "int32"):
        return None
    iv = [str(v.var) for v in blk.iter_vars]
    if [str(r.min) for r in blk.reads[1].region] != [iv[2], iv[1]]:
        return None
    return mms[0]


def _schedule_dense_int8(sch, mm, intrin: str, lanes: int) -> bool:
    """int8 dense: weight repacked to [N/8, K/4, 8, 4], one 8-lane accumulator per (row, 8
    columns) over all of K, each step one intrinsic call; epilogue on the register."""
    m, n, k = sch.get_loops(mm)
    L, G = _int8_lanes(intrin), INT8_GROUP
    if _ext(sch, n) % L or _ext(sch, k) % G:
        return False
    blocks = _blocks(sch)
    i = [_name(sch, b) for b in blocks].index(_name(sch, mm))
    for b in blocks[:i]:
        try:
            sch.compute_inline(b)
        except Exception:  # noqa: BLE001 - a non-inlinable producer stays a root stage
            pass
    after = blocks[i + 1:]
    for b in after[:-1]:
        sch.compute_inline(b)
    if after:
        last = after[-1]
        sch.set_scope(mm, 0, "local")
    else:
        last = sch.cache_write(mm, 0, "local")
    wcache = sch.cache_read(mm, 1, "global")
    sch.transform_layout(mm, ("read", 1), lambda kk, nn: (nn // L, kk // G, nn % L, kk % G))
    sch.annotate(wcache, "meta_schedule.layout_rewrite_preproc", True)
    no, ni = sch.split(n, [None, L])
    ko, ki = sch.split(k, [None, G])
    sch.reorder(m, no, ko, ni, ki)
    outer = sch.fuse(m, no)
    sch.parallel(outer)
    sch.reverse_compute_at(last, outer)
    init = sch.decompose_reduction(mm, ko)
    sch.tensorize(ni, intrin)
    for blk in (init, last):
        sch.vectorize(sch.get_loops(blk)[-1])
    return True


def schedule(func, choice: ConvChoice | None = None, lanes: int = 8, intrin: str | None = None):
    """A traced `s_tir.Schedule` for `func` (conv template or the generic one), or None."""
    return _schedule_kind(func, choice, lanes, intrin)[0]


def _schedule_kind(func, choice, lanes, intrin=None):
    from tvm import s_tir
    sch = s_tir.Schedule(func)
    try:
        conv = _conv_block(sch)
        if conv is not None:
            if _schedule_conv(sch, conv, choice, lanes, intrin):
                return sch, f"conv_template+{intrin}"
            return sch, "conv_template"
        mm = int8_matmul_block(sch) if intrin else None
        if mm is not None and _schedule_dense_int8(sch, mm, intrin, lanes):
            return sch, f"dense_template+{intrin}"
        _schedule_generic(sch, lanes)
        return sch, "generic"
    except Exception:  # noqa: BLE001 - a kernel no template fits is left as legalized
        return None, "unscheduled"


def apply_default_schedules(mod, target, lanes: int | None = None, int8_intrins: dict | None = None):
    """Schedule every PrimFunc without a tuning record with its template.

    `lanes` (fp32 per vector register) comes from fxpress.hw for the host target
    (`target.target_lanes`); without it, from the LLVM features of `target`.
    `int8_intrins` maps a PrimFunc name to the int8 tensor intrinsic its conv may use
    (intrin.plan: chosen by ISA, and by weight values for the saturating AVX2 one); those
    kernels count as "conv_template" / "dense_template" and also under "int8_intrinsic:<name>".

    Returns (module, counts): kernels per kind, "tuned" (a database record applied),
    "conv_template", "generic", "unscheduled" (left as legalized: scalar, one thread).
    """
    import tvm
    lanes = lanes or vector_lanes(target)
    counts = {"tuned": 0, "conv_template": 0, "dense_template": 0, "generic": 0, "unscheduled": 0}
    out = mod
    for gv, func in mod.functions.items():
        if not isinstance(func, tvm.tirx.PrimFunc):
            continue
        if func.attrs is not None and func.attrs.get(SCHEDULED_ATTR, False):
            counts["tuned"] += 1
            continue
        sch, kind = _schedule_kind(func, None, lanes, (int8_intrins or {}).get(gv.name_hint))
        if "+" in kind:
            kind, used = kind.split("+", 1)
            counts[f"int8_intrinsic:{used}"] = counts.get(f"int8_intrinsic:{used}", 0) + 1
        counts[kind] += 1
        if sch is not None:
            out[gv] = sch.mod["main"].with_attr(SCHEDULED_ATTR, True)
    return out, counts
