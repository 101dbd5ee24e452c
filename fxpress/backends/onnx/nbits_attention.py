"""Attention of a torch.onnx-exported Llama-style decoder  ==>  one ``com.microsoft.GroupQueryAttention``.

torch.onnx writes HF's eager attention as ~30 nodes a layer: Reshape/Transpose of q, k, v to
heads, the rotary embedding twice (Mul, Slice, Slice, Neg, Concat, Mul, Add), ``repeat_kv``
(Unsqueeze, Expand, Reshape) for k and v, MatMul, scale Mul, mask Add, Softmax, MatMul,
Transpose, Reshape. At batch-1 decode each costs a kernel launch beside 4-bit weights that
stream in microseconds, so `fuse_gqa` replaces each such region by one GroupQueryAttention
(rotary inside, grouped heads without copies, causal mask implied); where q, k and v are the
three outputs of one Split (a fused q/k/v MatMulNBits, `nbits.fuse_shared_input`), the Split
goes too and GQA reads the packed projection.

    model, n = fuse_gqa(model)      # n == layers on a Llama-style decoder, 0: returned as is

The match is checked, not assumed: static shapes (batch and sequence length read from the
graph), heads split from the last axis, a constant mask that is exactly causal (none at all
only for one token), the graph's own score scale (1 where it has none), constant cos/sin
tables in HF's rotate-half layout (two equal halves, one row per position 0..S-1), the same
tables for q and k, and no intermediate read outside the region. Anything else is left as
it was. GQA takes positions 0..S-1 (no KV cache: ``seqlens_k = S - 1``), which is
what the constant tables hold.
"""
from __future__ import annotations

import copy
import zlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .fuse import _Graph as _Index
from .fuse import node_attr as _attr

__all__ = ["fuse_gqa"]

MS = "com.microsoft"


class _Graph(_Index):
    """fuse._Graph's producer (`prod`) / consumer (`cons`) / constant index, plus the graph's
    inferred static shapes and the evaluation of small constant subgraphs."""

    def __init__(self, model: onnx.ModelProto):
        super().__init__(model)
        self.order = list(self.g.node)
        self.opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx")]
        inferred = onnx.shape_inference.infer_shapes(model)
        self.shapes = {}
        for vi in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            dims = vi.type.tensor_type.shape.dim
            if all(d.HasField("dim_value") for d in dims):
                self.shapes[vi.name] = [d.dim_value for d in dims]

    def folded(self, name: str, max_nodes: int = 24):
        """`name`'s value where it is a small subgraph of constants only, evaluated (torch.onnx
        leaves a 128 x 128 causal mask as Where(And(..)) over constants: past its constant
        folder's size limit), else None."""
        value = self.const(name)
        if value is not None or name not in self.prod:
            return value
        nodes, todo, seen = [], [name], set()
        while todo:
            t = todo.pop()
            if t in seen or t in self.inits or not t:
                continue
            seen.add(t)
            p = self.prod.get(t)
            if p is None or p.domain not in ("", "ai.onnx") or len(nodes) >= max_nodes:
                return None  # reads a graph input, or not a small standard-op subgraph
            if p not in nodes:
                nodes.append(p)
            todo += list(p.input)
        from onnx.reference import ReferenceEvaluator
        order = [n for n in self.order if n in nodes]  # the graph's topological order
        used = {i for n in order for i in n.input}
        graph = helper.make_graph(order, "folded", [], [helper.make_empty_tensor_value_info(name)],
                                  [t for k, t in self.inits.items() if k in used])
        try:
            model = helper.make_model(graph, opset_imports=self.opsets)
            return ReferenceEvaluator(model).run(None, {})[0]
        except Exception:  # noqa: BLE001  (an op the reference evaluator lacks, or fails on: not a constant we can read)
            return None

    def made_by(self, name: str, op: str):
        """The standard-domain `op` node producing `name`, else None."""
        n = self.prod.get(name)
        return n if n is not None and n.op_type == op and n.domain in ("", "ai.onnx") else None


def _to_heads(g: _Graph, name: str):
    """name = Transpose(0,2,1,3)(Reshape(x, [B, S, H, D])) -> (x, D, nodes) or None."""
    tr = g.made_by(name, "Transpose")
    if tr is None or list(_attr(tr, "perm", [])) != [0, 2, 1, 3]:
        return None
    rs = g.made_by(tr.input[0], "Reshape")
    shape = None if rs is None else g.const(rs.input[1])
    if shape is None or shape.size != 4 or int(shape[3]) <= 0:
        return None
    return rs.input[0], int(shape[3]), [tr, rs]  # rs last: its output's shape is checked


def _slice(g: _Graph, node, src: str):
    """(start, end) of a step-1 Slice of `src` along the last axis (4-d), else None."""
    if node is None or node.op_type != "Slice" or node.input[0] != src or len(node.input) < 4:
        return None
    starts, ends, axes = (g.const(i) for i in node.input[1:4])
    steps = g.const(node.input[4]) if len(node.input) > 4 and node.input[4] else np.ones(1)
    if any(c is None or c.size != 1 for c in (starts, ends, axes, steps)):
        return None
    if int(axes.item()) not in (3, -1) or int(steps.item()) != 1:
        return None
    return int(starts.item()), int(ends.item())


def _rotary(g: _Graph, name: str):
    """name = x * cos + rotate_half(x) * sin -> (x, cos, sin, nodes, half) or None; rotate_half
    is Concat(Neg(x[..., half:]), x[..., :half]) (HF's non-interleaved form)."""
    add = g.made_by(name, "Add")
    if add is None:
        return None
    for a, b in (add.input, add.input[::-1]):
        m1, m2 = g.made_by(a, "Mul"), g.made_by(b, "Mul")
        if m1 is None or m2 is None:
            continue
        for cat_in, sin_in in (m2.input, m2.input[::-1]):
            cat, sin = g.made_by(cat_in, "Concat"), g.const(sin_in)
            if cat is None or sin is None or _attr(cat, "axis") not in (3, -1) or len(cat.input) != 2:
                continue
            neg = g.made_by(cat.input[0], "Neg")
            hi = None if neg is None else g.prod.get(neg.input[0])
            lo = g.prod.get(cat.input[1])
            x = None if hi is None else hi.input[0]
            r_hi, r_lo = _slice(g, hi, x), _slice(g, lo, x)
            if r_hi is None or r_lo is None or r_lo[0] != 0 or r_hi[0] != r_lo[1] or x not in m1.input:
                continue
            cos = g.const(m1.input[1] if m1.input[0] == x else m1.input[0])
            if cos is None:
                continue
            return x, cos, sin, [add, m1, m2, cat, neg, hi, lo], r_lo[1], r_hi[1]
    return None


def _repeat_kv(g: _Graph, name: str):
    """name = Reshape(Expand(Unsqueeze(x, [2]), [B, kvh, rep, S, D]), [B, kvh*rep, S, D])
    -> (x, rep, nodes); anything else -> (name, 1, []) (no grouping)."""
    rs = g.made_by(name, "Reshape")
    ex = None if rs is None else g.made_by(rs.input[0], "Expand")
    un = None if ex is None else g.made_by(ex.input[0], "Unsqueeze")
    if un is None:
        return name, 1, []
    axes = g.const(un.input[1]) if len(un.input) > 1 else np.array(_attr(un, "axes", []))
    shape = g.const(ex.input[1])
    if axes is None or axes.tolist() != [2] or shape is None or shape.size != 5:
        return name, 1, []
    return un.input[0], int(shape[2]), [rs, ex, un]


def _table(t: np.ndarray, s: int, d: int):
    """A rotary table broadcast as [.., S, D] with equal halves -> its [S, D/2] cache, else None."""
    t = np.asarray(t, np.float32)
    # [.., S, D] with leading ones: one row per query position, the same for every head
    if t.ndim < 2 or t.shape[-2:] != (s, d) or t.size != s * d:
        return None
    t = t.reshape(s, d)
    return t[:, : d // 2].copy() if np.array_equal(t[:, : d // 2], t[:, d // 2:]) else None


def _is_causal(mask, s: int) -> bool:
    if mask is None:
        return s == 1  # one query, one key: nothing to mask
    m = np.asarray(mask, np.float32)
    m = m.reshape((1,) * max(0, 2 - m.ndim) + m.shape)
    try:
        m = np.broadcast_to(m, m.shape[:-2] + (s, s))
    except ValueError:
        return False
    upper = np.triu(np.ones((s, s), bool), 1)
    return bool(np.all(m[..., ~upper] == 0) and np.all(m[..., upper] <= -1e30))


def _match(g: _Graph, sm):
    """The attention region around one Softmax -> a dict describing the GQA, or None."""
    if _attr(sm, "axis", -1) not in (-1, 3):
        return None
    region, score = [sm], sm.input[0]
    mask = None
    add = g.made_by(score, "Add")
    if add is not None:
        consts = [g.folded(i) for i in add.input]
        k = 1 if consts[1] is not None else 0 if consts[0] is not None else None
        if k is None:
            return None
        mask, score = consts[k], add.input[1 - k]
        region.append(add)
    mul, div = g.made_by(score, "Mul"), g.made_by(score, "Div")
    scale = 1.0  # no Mul / Div: the scores are not scaled
    if mul is not None:
        c = [g.const(i) for i in mul.input]
        k = 1 if c[1] is not None and c[1].size == 1 else 0 if c[0] is not None and c[0].size == 1 else None
        if k is None:
            return None
        scale, score = float(c[k].item()), mul.input[1 - k]
        region.append(mul)
    elif div is not None and g.const(div.input[1]) is not None and g.const(div.input[1]).size == 1:
        scale, score = 1.0 / float(g.const(div.input[1]).item()), div.input[0]
        region.append(div)
    qk = g.made_by(score, "MatMul")
    kt = None if qk is None else g.made_by(qk.input[1], "Transpose")
    if kt is None or list(_attr(kt, "perm", [])) != [0, 1, 3, 2]:
        return None
    region += [qk, kt]
    k_rot, rep_k, nodes = _repeat_kv(g, kt.input[0])
    region += nodes
    # after the softmax: probs @ v -> Transpose(0,2,1,3) -> Reshape [B, S, H*D]
    users = g.cons.get(sm.output[0], [])
    if len(users) != 1 or users[0].op_type != "MatMul" or users[0].input[0] != sm.output[0]:
        return None
    pv = users[0]
    v_heads, rep_v, nodes = _repeat_kv(g, pv.input[1])
    region += [pv, *nodes]
    tr = g.cons.get(pv.output[0], [])
    if len(tr) != 1 or tr[0].op_type != "Transpose" or list(_attr(tr[0], "perm", [])) != [0, 2, 1, 3]:
        return None
    out = g.cons.get(tr[0].output[0], [])
    if len(out) != 1 or out[0].op_type != "Reshape":
        return None
    region += [tr[0], out[0]]
    heads = {}
    for role, t in (("q", qk.input[0]), ("k", k_rot), ("v", v_heads)):
        src = _to_heads(g, t)
        rot = None
        if src is None and role != "v":  # through the rotary embedding first
            rot = _rotary(g, t)
            src = None if rot is None else _to_heads(g, rot[0])
            # the two halves of the whole head (a partial rotary, Phi's, is not this op's form)
            if src is None or 2 * rot[4] != src[1] or rot[5] < src[1]:
                return None
            region += rot[3]
        if src is None:
            return None
        region += src[2]
        heads[role] = (src[0], src[1], rot, src[2][-1])
    d = heads["q"][1]
    if {heads["k"][1], heads["v"][1]} != {d} or rep_k != rep_v:
        return None
    if (heads["q"][2] is None) != (heads["k"][2] is None):
        return None
    shapes = [g.shapes.get(heads[r][0]) for r in "qkv"]
    out_shape = g.shapes.get(out[0].output[0])
    if any(s is None or len(s) != 3 for s in shapes) or out_shape is None:
        return None
    (b, s, wq), (_, _, wk), (_, _, wv) = shapes
    if wq % d or wk % d or wk != wv or wq // d != (wk // d) * rep_k or out_shape != [b, s, wq]:
        return None
    # each Reshape splits the last axis into heads x head size ([B, S, H, D], not [B, H, S, D])
    for r, w in (("q", wq), ("k", wk), ("v", wv)):
        if g.shapes.get(heads[r][3].output[0]) != [b, s, w // d, d]:
            return None
    if not _is_causal(mask, s):
        return None
    rotary = None
    if heads["q"][2] is not None:
        (_, cq, sq, *_), (_, ck, sk, *_) = heads["q"][2], heads["k"][2]
        if not (np.array_equal(cq, ck) and np.array_equal(sq, sk)):
            return None
        cos, sin = _table(cq, s, d), _table(sq, s, d)
        if cos is None or sin is None:
            return None
        rotary = (cos, sin)
    return {"region": region, "q": heads["q"][0], "k": heads["k"][0], "v": heads["v"][0],
            "out": out[0], "b": b, "s": s, "d": d, "heads": wq // d, "kv_heads": wk // d,
            "scale": scale, "rotary": rotary}


def _packed(g: _Graph, q: str, k: str, v: str):
    """The Split whose three outputs are exactly q, k, v (a fused q/k/v projection), or None."""
    sp = g.prod.get(q)
    if sp is None or sp.op_type != "Split" or list(sp.output) != [q, k, v] or \
            _attr(sp, "axis", 0) not in (-1, 2):
        return None
    return sp


def _live(nodes: list, outputs: set) -> list:
    """`nodes` less those whose every output is unread (the mask's Where / And chain, once
    its Add is gone), walked backwards so a chain goes at once."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
           for n in nodes for a in n.attribute):
        return nodes  # a subgraph may read outer names its node does not list as inputs
    read, keep = set(outputs), []
    for n in reversed(nodes):
        if any(o in read for o in n.output):
            keep.append(n)
            read.update(n.input)
    return keep[::-1]


def fuse_gqa(model: onnx.ModelProto) -> tuple[onnx.ModelProto, int]:
    """(copy of `model` with each matched attention region one GroupQueryAttention, how many).

    >>> fused, n = fuse_gqa(export_nbits(cm.graph_module, (ids,), attention=False))
    >>> n   # one per decoder layer; 0 when nothing matched (then `fused` is `model`)
    """
    m = copy.deepcopy(model)
    g = _Graph(m)
    matches, claimed = [], set()
    for sm in m.graph.node:
        if sm.op_type != "Softmax":
            continue
        hit = _match(g, sm)
        if hit is None:
            continue
        ids = {id(n) for n in hit["region"]}
        if len(ids) != len(hit["region"]) or ids & claimed:
            continue
        final = hit["out"]
        # every intermediate stays inside the region (so removing the region changes nothing else)
        inner = [o for n in hit["region"] if n is not final for o in n.output]
        if any(o in g.outputs or any(id(c) not in ids for c in g.cons.get(o, []))
               for o in inner):
            continue
        sp = _packed(g, hit["q"], hit["k"], hit["v"])
        if sp is not None and all(id(c) in ids for o in sp.output for c in g.cons.get(o, [])):
            hit["region"].append(sp)
            ids.add(id(sp))
            hit["packed"] = sp.input[0]
        claimed |= ids
        matches.append(hit)
    if not matches:
        return model, 0
    new_inits, replace, drop = {}, {}, set()
    for hit in matches:
        b, s = hit["b"], hit["s"]
        lens, total = f"gqa_seqlens_k_{b}x{s}", f"gqa_total_len_{s}"
        new_inits[lens] = numpy_helper.from_array(np.full(b, s - 1, np.int32), lens)
        new_inits[total] = numpy_helper.from_array(np.array(s, np.int32), total)
        if "packed" in hit:
            qkv = [hit["packed"], "", ""]
        else:
            qkv = [hit["q"], hit["k"], hit["v"]]
        ins = [*qkv, "", "", lens, total]
        attrs = {"num_heads": hit["heads"], "kv_num_heads": hit["kv_heads"], "scale": hit["scale"]}
        if hit["rotary"] is not None:
            key = zlib.crc32(hit["rotary"][0].tobytes() + hit["rotary"][1].tobytes())
            cos_n, sin_n = f"gqa_cos_cache_{key:08x}", f"gqa_sin_cache_{key:08x}"
            new_inits[cos_n] = numpy_helper.from_array(hit["rotary"][0], cos_n)
            new_inits[sin_n] = numpy_helper.from_array(hit["rotary"][1], sin_n)
            ins += [cos_n, sin_n]
            attrs.update(do_rotary=1, rotary_interleaved=0)
        out = hit["out"]
        replace[id(out)] = helper.make_node("GroupQueryAttention", ins, [out.output[0]],
                                            name=f"{out.name or out.output[0]}_gqa", domain=MS, **attrs)
        drop |= {id(n) for n in hit["region"]}
    nodes = [replace.get(id(n), n) for n in m.graph.node if id(n) not in drop or id(n) in replace]
    del m.graph.node[:]
    m.graph.node.extend(_live(nodes, g.outputs))
    # equal rotary tables (every layer's, usually) are stored once, keyed by their bytes
    used = {i for n in m.graph.node for i in n.input} | g.outputs
    keep = [t for t in m.graph.initializer if t.name in used]
    del m.graph.initializer[:]
    m.graph.initializer.extend(keep + [t for n, t in new_inits.items() if n in used])
    if not any(o.domain == MS for o in m.opset_import):
        m.opset_import.append(helper.make_opsetid(MS, 1))
    return m, len(matches)
