"""Give int8 conv/linear outputs that feed fp32 ops their own Q/DQ, so ORT keeps them int8.

PT2E's x86 form leaves ``conv -> add(residual) -> relu -> q`` with the conv output in fp32
(Inductor fuses the add into the qconv kernel). ORT has no conv+add kernel: its selector
needs a Q right after the Conv, so without one the Conv runs in fp32 on dequantized inputs.
This rewrite observes those tensors on a few batches (min/max) and inserts
``quantize_per_tensor -> dequantize_per_tensor`` (uint8, affine) after them; the add then
becomes QLinearAdd and the conv QLinearConv.
"""
from __future__ import annotations

import copy
from typing import Iterable

import torch
import torch.fx as fx

from ...ir.meta import lineage, set_record
from .qdq import DQ_CHANNEL, DQ_TENSOR, Q_TENSOR

aten = torch.ops.aten
_COMPUTE = {aten.conv2d.default, aten.conv1d.default, aten.convolution.default, aten.linear.default}
_PASS = {aten.relu.default, aten.relu_.default}
__all__ = ["unquantized_int8_outputs", "requantize_outputs"]


def _is_dq_act(n) -> bool:
    return isinstance(n, fx.Node) and n.target is DQ_TENSOR


def _is_dq_weight(n) -> bool:
    return isinstance(n, fx.Node) and n.target in (DQ_CHANNEL, DQ_TENSOR) and \
        isinstance(n.args[0], fx.Node) and n.args[0].op == "get_attr"


def unquantized_int8_outputs(gm: fx.GraphModule) -> list[fx.Node]:
    """conv/linear nodes with int8 inputs whose output reaches no Q (through relu)."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _COMPUTE:
            continue
        if not (_is_dq_act(n.args[0]) and _is_dq_weight(n.args[1])):
            continue
        cur = n
        while len(cur.users) == 1 and next(iter(cur.users)).target in _PASS:
            cur = next(iter(cur.users))
        if cur.users and all(u.target is Q_TENSOR for u in cur.users):
            continue
        # only worth it when the consumer takes int8 in ORT (QLinearAdd, another int8 op)
        if any(u.target in (aten.add.Tensor, aten.add_.Tensor) for u in cur.users):
            out.append(n)
    return out


class _Observe(fx.Interpreter):
    def __init__(self, gm, names):
        super().__init__(gm)
        self.names, self.lo, self.hi = set(names), {}, {}

    def run_node(self, n):
        r = super().run_node(n)
        if n.name in self.names:
            lo, hi = float(r.min()), float(r.max())
            self.lo[n.name] = min(lo, self.lo.get(n.name, lo))
            self.hi[n.name] = max(hi, self.hi.get(n.name, hi))
        return r


def requantize_outputs(gm: fx.GraphModule, batches: Iterable[tuple]) -> tuple[fx.GraphModule, list[str]]:
    """A copy of `gm` with observed uint8 Q/DQ after each `unquantized_int8_outputs` node."""
    targets = unquantized_int8_outputs(gm)
    if not targets:
        return gm, []
    gm = copy.deepcopy(gm)
    targets = [n for n in gm.graph.nodes if n.name in {t.name for t in targets}]
    obs = _Observe(gm, [t.name for t in targets])
    seen = 0
    with torch.no_grad():
        for b in batches:
            obs.run(*b)
            seen += 1
    done = []
    for n in targets:
        if n.name not in obs.lo:
            continue
        lo, hi = min(obs.lo[n.name], 0.0), max(obs.hi[n.name], 0.0)
        scale = max((hi - lo) / 255.0, 1e-8)
        zp = int(min(255, max(0, round(-lo / scale))))
        users = list(n.users)
        with gm.graph.inserting_after(n):
            q = gm.graph.call_function(Q_TENSOR, (n, scale, zp, 0, 255, torch.uint8))
        with gm.graph.inserting_after(q):
            dq = gm.graph.call_function(DQ_TENSOR, (q, scale, zp, 0, 255, torch.uint8))
        lin = lineage(n)
        if lin is not None:
            set_record(q, lin.derived(str(Q_TENSOR)))
            set_record(dq, lin.derived(str(DQ_TENSOR)))
        for u in users:
            u.replace_input_with(n, dq)
        done.append(lin.module_path if lin is not None and lin.module_path else n.name)
    gm.graph.lint()
    gm.recompile()
    return gm, done
