"""Weight-only int4/int8 linears for ONNX Runtime: blocked DequantizeLinear -> MatMul  ==>  MatMulNBits.

The IR's ``dequantize_per_channel_group`` exports (with `TRANSLATIONS`, opset >= 21) as a
blocked ``DequantizeLinear(q int8 [N, K], scale [N, K/g], zp?, axis=1, block_size=g)``, and
torchlib's ``linear`` as ``Transpose -> MatMul (-> Add bias)``. `to_matmul_nbits` replaces
each such chain by one ``com.microsoft.MatMulNBits`` whose weights are packed as ORT wants
them (unsigned values, low nibble first, zero point 2^(bits-1) implied when symmetric);
per-channel DQs (``group_size=-1``) get the largest power-of-two block dividing K, with the
row's scale repeated (exact). `fuse_shared_input` then concatenates MatMulNBits nodes that
read the same activation (q/k/v, gate/up) into one wider node + Split: at decode the
activation is read once and one kernel launch streams all their weights.

    model = to_matmul_nbits(model, accuracy_level=4)     # onnx.ModelProto -> onnx.ModelProto
    model = fuse_shared_input(model)

`export_nbits` adds the RMSNorm fusions (`fuse_norms`) and one GroupQueryAttention per
decoder layer (`nbits_attention.fuse_gqa`): at batch-1 decode the per-node cost of the ~40
small ops a layer is what separates a 4-bit decoder from its weight bytes.

accuracy_level 4 runs int8 compute on the activations (MLAS's fastest path where the CPU has
VNNI/AVX2 int8 dot products); `fastest_accuracy_level` times 0 vs 4 on this host.
"""
from __future__ import annotations

import copy
import functools

import numpy as np
import onnx
import torch
import torch.ao.quantization.fx._decomposed  # defines torch.ops.quantized_decomposed
from onnx import helper, numpy_helper
from onnxscript import opset21 as op21

from .nbits_pack import pack_nbits, pack_zero_points, unpack_nbits

__all__ = [
    "DQ_GROUP",
    "TRANSLATIONS",
    "export_nbits",
    "fastest_accuracy_level",
    "fuse_norms",
    "fuse_shared_input",
    "has_weight_only",
    "nbits_nodes",
    "nbits_rewrites",
    "pack_nbits",
    "pack_zero_points",
    "to_matmul_nbits",
    "unpack_nbits",
]

DQ_GROUP = torch.ops.quantized_decomposed.dequantize_per_channel_group.default
MS = "com.microsoft"


def dequantize_per_channel_group(q, scales, zero_points, qmin: int, qmax: int, dtype,
                                 group_size: int, output_dtype=None):
    """torch.onnx translation: a blocked DequantizeLinear (ONNX opset 21) along K."""
    if zero_points is None:
        return op21.DequantizeLinear(q, scales, axis=1, block_size=group_size)
    return op21.DequantizeLinear(q, scales, op21.Cast(zero_points, to=onnx.TensorProto.INT8),
                                 axis=1, block_size=group_size)


TRANSLATIONS = {DQ_GROUP: dequantize_per_channel_group}


def _attrs(node) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _bits_of(q: np.ndarray) -> int:
    return 4 if q.size and int(q.min()) >= -8 and int(q.max()) <= 7 else 8


def _block_for(k: int) -> int | None:
    b = 1 << (k.bit_length() - 1)
    while b >= 16 and k % b:
        b //= 2
    return min(b, 256) if b >= 16 else None


def _k_slice(sl, inits, k: int) -> int | None:
    """K' when `sl` is ``Slice(x, [0], [K'], axes=[1 or -1], steps=[1])`` with constant inputs and
    0 < K' < k (a weight-only weight padded to whole blocks, cut back to its K); else None."""
    vals = []
    for name in list(sl.input[1:]) + [""] * (5 - len(sl.input)):
        if not name:
            vals.append(None)
        elif name in inits:
            vals.append(numpy_helper.to_array(inits[name]).reshape(-1).tolist())
        else:
            return None
    starts, ends, axes, steps = vals
    if starts != [0] or ends is None or len(ends) != 1 or axes not in ([1], [-1]) or \
            steps not in (None, [1]):
        return None
    return ends[0] if 0 < ends[0] < k else None


def _zero_point(dq, inits, producer):
    """The DQ's zero point as an array (None: absent; False: not a constant we can read)."""
    if len(dq.input) < 3 or not dq.input[2]:
        return None
    name = dq.input[2]
    if name not in inits and name in producer and producer[name].op_type == "Cast":
        name = producer[name].input[0]  # our translation casts the IR's int32 zero points
    return numpy_helper.to_array(inits[name]).astype(np.int8) if name in inits else False


def has_weight_only(gm: torch.fx.GraphModule) -> bool:
    """Whether the IR holds WeightOnly linears (a dequantize node with a WeightOnlySpec)."""
    from ...ir.meta import WeightOnlySpec, get_record
    return any(get_record(n, WeightOnlySpec) is not None for n in gm.graph.nodes)


def nbits_nodes(model: onnx.ModelProto) -> list[dict]:
    """[{'name', 'K', 'N', 'bits', 'block_size', 'accuracy_level'}] of the model's MatMulNBits."""
    return [{"name": n.name, **_attrs(n)} for n in model.graph.node
            if n.op_type == "MatMulNBits" and n.domain == MS]


def to_matmul_nbits(model: onnx.ModelProto, *, accuracy_level: int = 4, bits: int | None = None,
                    names: set[str] | None = None) -> onnx.ModelProto:
    """A copy of `model` with every weight-only DQ -> (Transpose ->) MatMul [-> Add] as MatMulNBits.

    bits: 4 or 8 for every rewritten weight (None: 4 when all values fit [-8, 7]). names: only
    DQs whose integer initializer is named here (None: every blocked DQ, and per-channel DQs
    whose MatMul activation is not itself dequantized - those are int8 static/dynamic Q/DQ).
    """
    m = copy.deepcopy(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    drop, add_nodes, drop_inits = set(), [], set()
    for dq in list(g.node):
        if dq.op_type != "DequantizeLinear" or dq.input[0] not in inits or dq.input[1] not in inits:
            continue
        if names is not None and dq.input[0] not in names:
            continue
        at = _attrs(dq)
        q = numpy_helper.to_array(inits[dq.input[0]])
        if q.ndim != 2 or q.dtype != np.int8:
            continue
        n_, k = q.shape
        scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float32)
        zp = _zero_point(dq, inits, producer)
        if zp is False:
            continue
        if "block_size" in at and at.get("axis", 1) == 1:
            block = int(at["block_size"])
        elif at.get("axis", 1) == 0 and scale.ndim <= 1 and scale.size == n_:
            block = _block_for(k)  # per channel: any block dividing K with the row's scale repeated
            if block is None:
                continue
            scale = np.repeat(scale.reshape(n_, 1), k // block, 1)
            zp = None if zp is None else np.repeat(zp.reshape(n_, 1), k // block, 1)
        else:
            continue
        if block < 16 or block & (block - 1) or k % block:
            continue
        # the chain DQ [-> Slice(K)] -> Transpose(1, 0) -> MatMul(x, .) (torchlib's linear), or
        # DQ [-> Slice(K)] -> Gemm(transB); the Slice cuts a weight padded to whole blocks back to
        # its K: MatMulNBits takes that K with the last block padded, as stored
        users = consumers.get(dq.output[0], [])
        if len(users) != 1:
            continue
        t = users[0]
        k_cut = _k_slice(t, inits, k) if t.op_type == "Slice" else None
        if k_cut is not None:
            if len(consumers.get(t.output[0], [])) != 1 or "block_size" not in at or \
                    -(-k_cut // block) * block != k:
                continue
            sl, t = t, consumers[t.output[0]][0]
        else:
            sl = None
        if t.op_type == "Transpose" and _attrs(t).get("perm") == [1, 0] and \
                len(consumers.get(t.output[0], [])) == 1:
            mm = consumers[t.output[0]][0]
            if mm.op_type != "MatMul" or mm.input[1] != t.output[0]:
                continue
            chain = [dq, t, mm]
        elif t.op_type == "Gemm" and _attrs(t).get("transB") == 1 and not _attrs(t).get("transA") \
                and _attrs(t).get("alpha", 1.0) == 1.0 and _attrs(t).get("beta", 1.0) == 1.0:
            mm = t
            chain = [dq, t]
        else:
            continue
        if sl is not None:
            chain.append(sl)
        a_prod = producer.get(mm.input[0])
        if names is None and "block_size" not in at and a_prod is not None and \
                a_prod.op_type in ("DequantizeLinear", "DynamicQuantizeLinear"):
            continue  # an int8 activation x weight pair: ORT's QDQ fusions own it
        nb = bits or _bits_of(q)
        if nb == 4 and (q.min() < -8 or q.max() > 7):
            continue
        base = dq.input[0]
        ins = [mm.input[0], base + "_nbits", base + "_nbits_scales"]
        new_inits = [numpy_helper.from_array(pack_nbits(q, nb, block), base + "_nbits"),
                     numpy_helper.from_array(scale.reshape(-1), base + "_nbits_scales")]
        if zp is not None and np.any(zp):
            new_inits.append(numpy_helper.from_array(pack_zero_points(zp.reshape(n_, -1), nb),
                                                     base + "_nbits_zp"))
            ins.append(base + "_nbits_zp")
        out = mm.output[0]
        if mm.op_type == "Gemm" and len(mm.input) > 2 and mm.input[2]:
            ins += [""] * (5 - len(ins)) + [mm.input[2]]
        g.initializer.extend(new_inits)
        add_nodes.append((mm, helper.make_node(
            "MatMulNBits", ins, [out], name=(mm.name or out) + "_nbits", domain=MS,
            K=k if sl is None else k_cut, N=n_, bits=nb, block_size=block,
            accuracy_level=int(accuracy_level))))
        drop.update(id(x) for x in chain)
        drop_inits.update(x for x in dq.input if x in inits)
        if sl is not None:
            drop_inits.update(x for x in sl.input[1:] if x in inits)
    if not add_nodes:
        return m
    replaced = {id(mm): new for mm, new in add_nodes}
    nodes = [replaced.get(id(n), n) for n in g.node if id(n) not in drop or id(n) in replaced]
    del g.node[:]
    g.node.extend(nodes)
    still = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    keep = [t for t in g.initializer if t.name not in drop_inits or t.name in still]
    del g.initializer[:]
    g.initializer.extend(keep)
    if not any(o.domain == MS for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS, 1))
    return m


def fuse_shared_input(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` where MatMulNBits nodes reading one activation with equal K / bits /
    block / accuracy (and all or none with zero points) are one node + Split along N."""
    m = copy.deepcopy(model)
    g = m.graph
    inits = {t.name: t for t in g.initializer}
    groups: dict[tuple, list] = {}
    for n in g.node:
        if n.op_type == "MatMulNBits" and n.domain == MS and len(n.input) <= 4:
            at = _attrs(n)
            key = (n.input[0], at["K"], at["bits"], at["block_size"], at.get("accuracy_level", 0),
                   len(n.input))
            if all(i in inits for i in n.input[1:]):
                groups.setdefault(key, []).append(n)
    fused = {}
    for key, ns in groups.items():
        if len(ns) < 2:
            continue
        arrays = [[numpy_helper.to_array(inits[i]) for i in n.input[1:]] for n in ns]
        ncols = [int(_attrs(n)["N"]) for n in ns]
        base = ns[0].output[0] + "_fused"
        new_inputs = [key[0]]
        for j in range(len(arrays[0])):
            arr = np.concatenate([a[j].reshape(nc, -1) if j else a[j] for a, nc in
                                  zip(arrays, ncols)], 0)
            arr = arr if j == 0 else arr.reshape(-1)
            g.initializer.append(numpy_helper.from_array(arr, f"{base}_{j}"))
            new_inputs.append(f"{base}_{j}")
        wide = helper.make_node("MatMulNBits", new_inputs, [base], name=base, domain=MS,
                                K=key[1], N=sum(ncols), bits=key[2], block_size=key[3],
                                accuracy_level=key[4])
        split_c = f"{base}_split"
        g.initializer.append(numpy_helper.from_array(np.array(ncols, np.int64), split_c))
        split = helper.make_node("Split", [base, split_c], [n.output[0] for n in ns],
                                 name=base + "_split", axis=-1)
        fused[id(ns[0])] = [wide, split]
        for n in ns[1:]:
            fused[id(n)] = []
    if not fused:
        return m
    nodes = []
    for n in g.node:
        nodes.extend(fused.get(id(n), [n]))
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    keep = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return m


def _run_a(session, a):
    return session.run(None, {"a": a})


@functools.lru_cache(maxsize=64)
def fastest_accuracy_level(k: int, n: int, bits: int, block: int, m_rows: int = 1,
                           threads: int | None = None) -> int:
    """Times one MatMulNBits [m_rows, k] x [k, n] at accuracy_level 0 (fp32) and 4 (int8 compute)
    on this host, returns the faster (once per process per shape). A wide N (an lm_head) is
    timed on its first columns only, <= ~16 MB of packed weight: both levels cost the same per
    column, and the full 49152 x 2048 head cost 1.2 GB and 17 s of set-up for one choice."""
    import onnxruntime as ort

    from ...timing import interleaved_medians
    from ..onnxruntime import session_options
    n = min(n, max(256, (16 << 23) // (k * bits)))
    rng = np.random.default_rng(0)
    q = rng.integers(-(1 << (bits - 1)), 1 << (bits - 1), (n, k), dtype=np.int8)  # int64: 0.8 GB
    sessions = {}
    for level in (0, 4):
        node = helper.make_node("MatMulNBits", ["a", "b", "s"], ["y"], domain=MS, K=k, N=n,
                                bits=bits, block_size=block, accuracy_level=level)
        graph = helper.make_graph(
            [node], "nbits", [helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, [m_rows, k])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [m_rows, n])],
            [numpy_helper.from_array(pack_nbits(q, bits, block), "b"),
             numpy_helper.from_array(np.full(n * (k // block), 0.01, np.float32), "s")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                        helper.make_opsetid(MS, 1)])
        sessions[level] = ort.InferenceSession(model.SerializeToString(), session_options(threads),
                                               providers=["CPUExecutionProvider"])
    a = rng.standard_normal((m_rows, k)).astype(np.float32)
    fns = {lv: functools.partial(_run_a, s) for lv, s in sessions.items()}
    ms = interleaved_medians(fns, (a,), rounds=15, warmup=3)
    return min(ms, key=ms.get)


def fuse_norms(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(copy of `model` with its RMSNorms fused, how many): torch.onnx's RMSNorm chain
    (Pow, ReduceMean, Add, Sqrt, Reciprocal, Mul, Mul) -> ``SimplifiedLayerNormalization``,
    and with the residual Add before it -> ``SkipSimplifiedLayerNormalization``.

    Only onnxscript's two norm fusions, not all of its ORT fusions: at decode the op count is
    what costs beside the weights (an 8-layer Llama: 481 -> 363 nodes), while its attention
    fusion (MultiHeadAttention for one token) timed slower than the unfused MatMul/Softmax;
    export_nbits fuses attention with `nbits_attention.fuse_gqa` (GroupQueryAttention) instead.

    >>> fused, n = fuse_norms(model)   # n == 2 * layers + 1 on a Llama-style decoder
    """
    import onnx_ir as ir
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization
    m = ir.serde.deserialize_model(copy.deepcopy(model))
    count = fuse_rms_normalization(m)
    if not count:
        return model, 0
    fuse_skip_rms_normalization(m)
    optimize(m)  # drops what the fusions left dead
    return ir.serde.serialize_model(m), int(count)


def export_nbits(gm: torch.nn.Module, example_inputs: tuple, *, accuracy_level: int = 4,
                 fuse: bool = True, norms: bool = True, attention: bool = True, dynamic_shapes=None,
                 report: dict | None = None) -> onnx.ModelProto:
    """torch.onnx (opset 21, our DQ translation) -> to_matmul_nbits -> fuse_shared_input
    (`fuse`) -> fuse_norms (`norms`) -> nbits_attention.fuse_gqa (`attention`): the weight-only
    ONNX path of bench/llm.py, ``onnx.save(export_nbits(cm.graph_module, (ids,)), "model.onnx")``.

    `report`, when given, receives how many rewrites each step made:
    ``{"matmul_nbits": 33, "shared_input": 17, "norms": 17, "gqa": 8}`` on bench/llm.py's decoder
    (shared_input: MatMulNBits nodes merged away). The GQA fusion needs static shapes (it reads
    batch and sequence length from the graph); with dynamic_shapes it matches nothing.
    """
    ep = torch.export.export(gm, tuple(example_inputs), dynamic_shapes=dynamic_shapes)
    prog = torch.onnx.export(ep, dynamo=True, opset_version=21, custom_translation_table=TRANSLATIONS,
                             verbose=False)
    model, counts = nbits_rewrites(prog.model_proto, accuracy_level=accuracy_level, fuse=fuse,
                                   norms=norms, attention=attention)
    if report is not None:
        report.update(counts)
    return model


def nbits_rewrites(model: onnx.ModelProto, *, accuracy_level: int = 4, fuse: bool = True,
                   norms: bool = True, attention: bool = True) -> tuple[onnx.ModelProto, dict]:
    """to_matmul_nbits -> fuse_shared_input (`fuse`) -> fuse_norms (`norms`) ->
    nbits_attention.fuse_gqa (`attention`) on an exported weight-only graph: (model, how many
    rewrites each step made, as `export_nbits`'s report). export_nbits and the ORT lowering
    (export.export_onnx) both run this."""
    from .nbits_attention import fuse_gqa
    model = to_matmul_nbits(model, accuracy_level=accuracy_level)
    counts = {"matmul_nbits": len(nbits_nodes(model)), "shared_input": 0, "norms": 0, "gqa": 0}
    if fuse:
        model = fuse_shared_input(model)
        counts["shared_input"] = counts["matmul_nbits"] - len(nbits_nodes(model))
    if norms:
        model, counts["norms"] = fuse_norms(model)
    if attention:
        model, counts["gqa"] = fuse_gqa(model)
    return model, counts
