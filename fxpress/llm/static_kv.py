"""Static KV buffers for the Inductor generator: the cache is written in place, never concatenated.

The KV-explicit IR (``fxpress.llm.capture``) takes each layer's past keys / values and returns
``present = cat(past, new, dim=2)``: a decode step copies the whole cache of every layer once.
`static_kv_cache` rewrites a flat copy of that graph so each past input is a preallocated
buffer ``[B, KV, capacity, D]`` and each present becomes

    updated = slice_scatter(buffer, new, dim=2, start=total - T, end=total)   # total = mask length
    buffer.copy_(updated)                      # Inductor re-inplaces this into a slice write
    keys    = updated[:, :, :total]            # what attention reads

with the graph returning the logits only: the buffers are the state (transformers' StaticCache
with ``cache_position = total - T + arange(T)``; column c of the attention mask is buffer slot c,
so left-padded batches keep their layout). The capacity is a dynamic dimension, so one compiled
decode graph serves every ``generate`` length.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

__all__ = ["static_kv_cache"]

aten = torch.ops.aten


def _past_of(node):
    """The tensor a cat chain starts from, skipping concatenations with empty tensors."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.cat.default:
        parts = list(node.args[0])
        live = [p for p in parts if not (isinstance(p, fx.Node) and _empty(p))]
        if len(live) != 1:
            return node
        node = live[0]
    return node


def _empty(node: fx.Node) -> bool:
    """A tensor with no elements (DynamicCache starts a layer from ``torch.tensor([])``)."""
    val = node.meta.get("val")
    n = val.numel() if isinstance(val, torch.Tensor) else None
    return isinstance(n, int) and n == 0


def static_kv_cache(fg: fx.GraphModule) -> bool:
    """Rewrite `fg` (a flat KV IR: ids, mask, positions, past..., returning logits, present...)
    in place as the module docstring says; False (and `fg` untouched) when a present is not
    ``cat(past, new)`` along the sequence dimension of its own past input."""
    g = fg.graph
    phs = [n for n in g.nodes if n.op == "placeholder"]
    out = g.output_node()
    outs = list(out.args[0])
    if len(phs) < 4 or len(outs) != len(phs) - 2:
        return False
    mask, past, presents = phs[1], phs[3:], outs[1:]
    plan = []
    for buf, present in zip(past, presents):
        if not (isinstance(present, fx.Node) and present.target is aten.cat.default):
            return False
        dim = present.args[1] if len(present.args) > 1 else 0
        parts = list(present.args[0])
        if dim not in (2, -2) or len(parts) != 2 or _past_of(parts[0]) is not buf:
            return False
        for user in buf.users:  # the past length is read as its size: sizes are rewritten below
            if user.target is aten.sym_size.int:
                continue
            if user.target is not aten.cat.default or _past_of(user) is not buf:
                return False
        plan.append((buf, present, parts[1]))
    ids = phs[0]
    with g.inserting_before(phs[-1].next):  # after the inputs, in order
        past_len = g.call_function(operator.sub, (g.call_function(aten.sym_size.int, (mask, 1)),
                                                  g.call_function(aten.sym_size.int, (ids, 1))))
    for buf, present, new in plan:
        for user in list(buf.users):
            if user.target is aten.sym_size.int and user.args[1] in (2, -2):
                user.replace_all_uses_with(past_len)
                g.erase_node(user)
        with g.inserting_before(present):
            total = g.call_function(aten.sym_size.int, (mask, 1))
            t = g.call_function(aten.sym_size.int, (new, 2))
            start = g.call_function(operator.sub, (total, t))
            upd = g.call_function(aten.slice_scatter.default, (buf, new, 2, start, total))
            g.call_function(aten.copy_.default, (buf, upd))
            keys = g.call_function(aten.slice.Tensor, (upd, 2, 0, total))
        present.replace_all_uses_with(keys)
        g.erase_node(present)
    out.args = ((outs[0],),)
    g.eliminate_dead_code()  # copy_ mutates an input: FX keeps it
    fg.recompile()
    return True
