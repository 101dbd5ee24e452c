"""Print the IR with its compression records, in the user's module names.

    print(format_graph(gm))
    # %conv2d  aten.conv2d.default(x, conv1.weight, conv1.bias) -> [1, 64, 112, 112]   # conv1 (Conv2d) qspec=int8/per_channel
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .meta import META_KEY, ChannelGroup, Lineage, ObserverStats, QuantSpec, SparsityMask, Factorization

__all__ = ["format_graph", "format_record"]


def format_record(rec) -> str:
    if isinstance(rec, QuantSpec):
        s = f"{rec.dtype}/{rec.qscheme}/{'sym' if rec.symmetric else 'affine'}"
        return s + ("/dynamic" if rec.dynamic else "")
    if isinstance(rec, ObserverStats):
        return f"{rec.observer}[{float(rec.min_val.min()):.4g}, {float(rec.max_val.max()):.4g}]"
    if isinstance(rec, ChannelGroup):
        return str(rec)
    if isinstance(rec, SparsityMask):
        return f"{rec.pattern} density={rec.density:.2f}"
    if isinstance(rec, Factorization):
        return f"{rec.method} rank={rec.rank} [{rec.factor_index + 1}/{rec.num_factors}]"
    return type(rec).__name__


def _arg(a) -> str:
    if isinstance(a, fx.Node):
        return str(a.target) if a.op == "get_attr" else f"%{a.name}"
    if isinstance(a, (list, tuple)):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    return repr(a)


def format_graph(gm: fx.GraphModule, *, show_params: bool = False) -> str:
    lines = []
    for n in gm.graph.nodes:
        if n.op == "get_attr" and not show_params:
            continue
        v = n.meta.get("val")
        shape = f" -> {list(v.shape)} {str(v.dtype).replace('torch.', '')}" if isinstance(v, torch.Tensor) else ""
        recs = n.meta.get(META_KEY, {})
        lin = recs.get(Lineage.KEY)
        where = f"{lin.module_path or '<top>'} ({lin.module_type})" if lin and lin.module_type else \
            (lin.module_path if lin and lin.module_path else "")
        extra = " ".join(f"{k}={format_record(r)}" for k, r in recs.items() if k != Lineage.KEY)
        comment = "   # " + "  ".join(x for x in (where, extra) if x) if (where or extra) else ""
        if n.op == "placeholder":
            lines.append(f"%{n.name} = input{shape}{comment}")
        elif n.op == "get_attr":
            lines.append(f"%{n.name} = attr {n.target}{shape}{comment}")
        elif n.op == "output":
            lines.append(f"return {_arg(n.args[0])}")
        else:
            target = str(n.target)
            args = ", ".join([_arg(a) for a in n.args] + [f"{k}={_arg(v)}" for k, v in n.kwargs.items()])
            lines.append(f"%{n.name} = {target}({args}){shape}{comment}")
    return "\n".join(lines)
