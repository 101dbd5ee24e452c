"""Coverage: what share of the model a recipe compressed, what it left float and why.

    cm = fxpress.compress(model, (x,), [fxpress.Quantize(mode="dynamic")])
    print(cm.report["coverage"])          # a table: MACs / params per family, float ops and why
    cm.summary()                          # before/after size, MACs by dtype, SQNR vs fp32

`compress` takes a `snapshot` of the captured fp32 IR before the recipe runs (cost, weight
shapes, the example's outputs) and, after it, reads the records the passes left on the final
IR: a weight reached through an int8 `dequantize_per_channel`/`per_tensor` is int8, through a
`WeightOnlySpec` dequantize int4 (or int8), a `Factorization` record is factorized, a weight
that lost rows/columns against the snapshot (or carries a `SparsityMask`) is pruned. Every
weight-bearing op left float gets one reason: ``latency`` (a `LayerChoice` kept it float),
``sensitivity`` (the sensitivity pass floated it), ``policy`` (the config's skip / ops / mode
excluded it), ``no rule`` (no quantization rule matches its op form), or ``not in recipe``.
A recipe that leaves more than `FLOAT_LIMIT` of the weight-bearing MACs untouched, or changes
nothing, warns with `CoverageWarning` naming the op kinds and reasons.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from .errors import CoverageWarning
from .ir.meta import Factorization, LayerChoice, SparsityMask, WeightOnlySpec, get_record, module_path
from .passes.analysis.cost import Cost, _fetch_attr as _attr, node_cost, total_cost

__all__ = ["FLOAT_LIMIT", "Snapshot", "CoverageSection", "snapshot", "coverage", "warn_coverage",
           "weight_bearing", "summary_text"]

aten = torch.ops.aten
FLOAT_LIMIT = 0.10  # share of weight-bearing MACs a recipe may leave untouched without a warning
FAMILIES = ("int8", "int4", "pruned", "factorized", "float")
# recipe entries that promise to compress: only a recipe with one of them can warn
COMPRESSING = ("quantize", "weight_only", "channel_pruning", "magnitude_sparsity", "lowrank")

_WEIGHT_OPS = {
    aten.conv1d.default: "conv1d", aten.conv2d.default: "conv2d", aten.conv3d.default: "conv3d",
    aten.convolution.default: "convolution", aten.conv_transpose1d.default: "conv_transpose1d",
    aten.conv_transpose2d.input: "conv_transpose2d", aten.conv_transpose3d.input: "conv_transpose3d",
    aten.linear.default: "linear", aten.matmul.default: "matmul", aten.mm.default: "mm",
    aten.bmm.default: "bmm", aten.addmm.default: "addmm", aten.baddbmm.default: "baddbmm",
    aten.einsum.default: "einsum", aten.embedding.default: "embedding",
}
# ops a weight passes through on its way to the op that uses it (layout, dtype, dequantize)
_THROUGH = {aten.t.default, aten.transpose.int, aten.permute.default, aten.view.default,
            aten.reshape.default, aten.unsqueeze.default, aten.expand.default, aten.contiguous.default,
            aten.clone.default, aten._to_copy.default, aten.to.dtype, aten.numpy_T.default,
            aten.slice.Tensor}  # slice: a weight-only weight padded to whole groups, cut back to K


def _dq_ops() -> tuple[set, Any]:
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)
    qd = torch.ops.quantized_decomposed
    int8 = {qd.dequantize_per_channel.default, qd.dequantize_per_tensor.default,
            qd.dequantize_per_tensor.tensor}
    return int8, qd.dequantize_per_channel_group.default


@dataclass(frozen=True)
class Snapshot:
    """The captured fp32 IR before the recipe: its cost, weight shapes and example outputs."""

    cost: Cost
    weight_shapes: dict[str, tuple[int, ...]]
    outputs: tuple  # flat fp32 outputs on the example (None where not computed)


def snapshot(gm: fx.GraphModule, args: tuple = (), kwargs: dict | None = None, *,
             run: bool = True) -> Snapshot:
    """Cost and weight shapes of `gm`; with `run`, its flat outputs on (args, kwargs)."""
    shapes = {str(n.target): tuple(t.shape) for n in gm.graph.nodes if n.op == "get_attr"
              and isinstance(t := _attr(gm, n.target), torch.Tensor)}
    outs: tuple = ()
    if run:
        try:
            with torch.no_grad():
                outs = tuple(t.detach().clone() if isinstance(t, torch.Tensor) else t
                             for t in pytree.tree_leaves(gm(*args, **(kwargs or {}))))
        except Exception:  # a summary without SQNR beats a compress that fails here
            outs = ()
    return Snapshot(total_cost(gm), shapes, outs)


@dataclass(frozen=True)
class _Use:
    node: fx.Node
    kind: str
    weight: fx.Node          # the get_attr the weight comes from
    via: tuple               # the nodes between the weight and the op
    macs: int
    params: int


def _weight_of(n: fx.Node) -> tuple[fx.Node, tuple] | None:
    """The get_attr a weight operand of `n` comes from, and the nodes between (None: no weight)."""
    if n.target is aten.embedding.default:
        cands = [n.args[0]]
    elif n.target is aten.einsum.default:
        cands = list(n.args[1]) if len(n.args) > 1 else []
    elif n.target in (aten.addmm.default, aten.baddbmm.default):
        cands = [n.args[2], n.args[1]]
    elif n.target in (aten.matmul.default, aten.mm.default, aten.bmm.default):
        cands = [n.args[1], n.args[0]]
    else:
        cands = [n.args[1]] if len(n.args) > 1 else []
    int8_dq, group_dq = _dq_ops()
    for a in cands:
        via: list[fx.Node] = []
        cur = a
        while isinstance(cur, fx.Node) and cur.op == "call_function" and (
                cur.target in _THROUGH or cur.target in int8_dq or cur.target is group_dq):
            via.append(cur)
            cur = cur.args[0]
        if isinstance(cur, fx.Node) and cur.op == "get_attr":
            return cur, tuple(via)
    return None


def weight_bearing(gm: fx.GraphModule) -> list[_Use]:
    """Every op of `gm` whose operand is a parameter (conv, linear, matmul/addmm/einsum of a
    weight, embedding), with its MACs and the weight's parameter count."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _WEIGHT_OPS:
            continue
        w = _weight_of(n)
        if w is None:
            continue
        t = _attr(gm, w[0].target)
        out.append(_Use(n, _WEIGHT_OPS[n.target], w[0], w[1], node_cost(gm, n).macs,
                        t.numel() if isinstance(t, torch.Tensor) else 0))
    return out


def _families(gm: fx.GraphModule, use: _Use, before: Snapshot) -> set[str]:
    int8_dq, group_dq = _dq_ops()
    fams: set[str] = set()
    for v in use.via:
        if v.target is group_dq or get_record(v, WeightOnlySpec) is not None:
            spec = get_record(v, WeightOnlySpec)
            fams.add("int4" if spec is None or spec.bits == 4 else "int8")
        elif v.target in int8_dq:
            fams.add("int8")
    if get_record(use.node, Factorization) is not None:
        fams.add("factorized")
    if get_record(use.node, SparsityMask) is not None:
        fams.add("pruned")
    name = str(use.weight.target)
    for suffix in ("", "_int8"):
        base = name[: -len(suffix)] if suffix and name.endswith(suffix) else name
        old = before.weight_shapes.get(base)
        t = _attr(gm, name)
        if old is not None and isinstance(t, torch.Tensor) and t.numel() < math.prod(old) \
                and len(t.shape) == len(old):
            fams.add("pruned")
            break
    return fams


class CoverageSection(dict):
    """The coverage section of a report: a plain dict (JSON-able, picklable) that prints as a table.

    Keys: ``before`` / ``after`` ({macs, params, bytes}), ``weight_macs`` (weight-bearing MACs
    after), ``families`` ({family: {macs, params}} as shares of the weight-bearing MACs/params),
    ``params_removed`` (share of the fp32 params), ``kinds`` ({op kind: {macs, quantized,
    nodes}}: its share of the weight MACs and the int8/int4 part of it), ``left_float`` ({op kind: {macs, nodes,
    reasons: {reason: detail}}}), ``untouched`` (share of weight-bearing MACs no family touched),
    ``changed`` (whether any pass modified the IR).
    """

    def __str__(self) -> str:
        b, a = self["before"], self["after"]
        lines = [f"MACs {_fmt(b['macs'])} -> {_fmt(a['macs'])}, params {_fmt(b['params'])} -> "
                 f"{_fmt(a['params'])}, weights {b['bytes'] / 1e6:.2f} MB -> {a['bytes'] / 1e6:.2f} MB",
                 "| family | MACs % | params % |", "| --- | --- | --- |"]
        for fam, v in self["families"].items():
            lines.append(f"| {fam} | {100 * v['macs']:.1f} | {100 * v['params']:.1f} |")
        if self["left_float"]:
            lines += ["left float:", "| op | nodes | MACs % | why |", "| --- | --- | --- | --- |"]
            for kind, v in self["left_float"].items():
                why = "; ".join(f"{r}: {d}" if d else r for r, d in v["reasons"].items())
                lines.append(f"| {kind} | {v['nodes']} | {100 * v['macs']:.1f} | {why} |")
        return "\n".join(lines)


def _fmt(x: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.2f}{unit}"
    return str(int(x))


def coverage(gm: fx.GraphModule, before: Snapshot, recipe: Any, report: Any) -> CoverageSection:
    """The coverage section of `gm` (the IR after `recipe`) against `before` (see module doc)."""
    uses = weight_bearing(gm)
    if any("val" not in u.node.meta for u in uses):
        from .passes.analysis.shape_prop import propagate_shapes
        propagate_shapes(gm, None)
        uses = weight_bearing(gm)
    wmacs = sum(u.macs for u in uses) or 1
    wparams = sum(u.params for u in {id(u.weight): u for u in uses}.values()) or 1
    fam_macs = {f: 0 for f in FAMILIES}
    fam_params = {f: 0 for f in FAMILIES}
    seen_w: set[str] = set()
    left: dict[str, dict] = {}
    kinds: dict[str, dict] = {}
    untouched = 0
    for u in uses:
        fams = _families(gm, u, before)
        first_read = str(u.weight.target) not in seen_w
        seen_w.add(str(u.weight.target))
        quant = fams & {"int8", "int4"}
        for f in fams | (set() if quant else {"float"}):
            fam_macs[f] += u.macs
            fam_params[f] += u.params if first_read else 0
        if not fams:
            untouched += u.macs
        krow = kinds.setdefault(u.kind, {"macs": 0.0, "quantized": 0.0, "nodes": 0})
        krow["macs"] += u.macs / wmacs
        krow["quantized"] += u.macs / wmacs if quant else 0.0
        krow["nodes"] += 1
        if not quant:
            reason, detail = _why_float(u, recipe, report)
            row = left.setdefault(u.kind, {"macs": 0.0, "nodes": 0, "reasons": {}})
            row["macs"] += u.macs / wmacs
            row["nodes"] += 1
            row["reasons"].setdefault(reason, detail)
    after = total_cost(gm)
    changed = any(r.modified for r in getattr(report, "passes", []))
    return CoverageSection(
        before=vars(before.cost).copy(), after=vars(after).copy(), weight_macs=sum(u.macs for u in uses),
        families={f: {"macs": fam_macs[f] / wmacs, "params": fam_params[f] / wparams}
                  for f in FAMILIES},
        params_removed=max(0.0, 1 - after.params / before.cost.params) if before.cost.params else 0.0,
        kinds=kinds, left_float=left, untouched=untouched / wmacs if uses else 0.0, changed=changed)


def _configs(recipe: Any, name: str) -> list:
    return [e for e in (getattr(recipe, "entries", None) or []) if getattr(e, "name", "") == name]


def _why_float(u: _Use, recipe: Any, report: Any) -> tuple[str, str]:
    """(reason, detail) for a weight-bearing op left float."""
    choice = get_record(u.node, LayerChoice)
    if choice is not None and choice.kept in ("float", "fp32", "dense"):
        ms = ", ".join(f"{c} {m:.3f} ms" for c, m in zip(choice.candidates, choice.ms))
        return "latency", f"kept float on {choice.backend or 'the backend'} ({ms})"
    sections = getattr(report, "sections", {}) or {}
    guard = sections.get("quant_guard") or {}
    path = module_path(u.node)
    if u.node.name in guard.get("float_layers", ()) or (
            path and path in guard.get("float_modules", ())):
        return "sensitivity", "int8 cost the most SQNR on the calibration data"
    quant = _configs(recipe, "quantize")
    wonly = _configs(recipe, "weight_only")
    if not quant and not wonly:
        return "not in recipe", "no Quantize or WeightOnly entry"
    details = []
    for cfg in wonly:
        if cfg.skipped(path) if hasattr(cfg, "skipped") else False:
            return "policy", f"WeightOnly(skip={list(cfg.skip)}) keeps {path!r} float"
        if u.kind != "linear":
            details.append(f"WeightOnly quantizes linear weights only, not {u.kind}")
    for cfg in quant:
        from .passes.quant.annotate import OP_TABLE
        kind = OP_TABLE.get(u.node.target)
        if kind is None:
            return "no rule", f"no quantization rule for aten.{u.kind} with a weight operand"
        short = {"max_pool": "pool", "avg_pool": "pool"}.get(kind, kind)
        if cfg.skipped(path):
            return "policy", f"Quantize(skip={list(cfg.skip)}) keeps {path!r} float"
        if short not in cfg.ops:
            return "policy", f"Quantize(ops={list(cfg.ops)}) leaves {short} float"
        if cfg.mode == "dynamic" and kind not in ("linear", "matmul", "embedding"):
            return "policy", f"dynamic mode quantizes linear/matmul only; mode='static' quantizes {kind}"
        wspec, _ = cfg.specs_for(path)
        if wspec is None:
            return "policy", f"weights='none' for {path!r}"
        if u.via and any(v.target not in _dq_ops()[0] for v in u.via):
            ops = sorted({str(v.target).replace("aten.", "") for v in u.via})
            return "no rule", f"its weight reaches it through {', '.join(ops)}"
        details.append("not annotated by the quantizer")
    return "no rule", "; ".join(dict.fromkeys(details))


def warn_coverage(section: CoverageSection, recipe: Any, *, stacklevel: int = 3) -> str | None:
    """Warn (CoverageWarning) when the recipe changed nothing or left > FLOAT_LIMIT of the
    weight-bearing MACs untouched; returns the message (None when silent)."""
    entries = list(getattr(recipe, "entries", ()) or ())
    if not any(getattr(e, "name", "") in COMPRESSING for e in entries):
        return None  # cleanup-only recipes (fold_bn, dce, ...) do not promise compression
    kinds = ", ".join(f"{k} ({100 * v['macs']:.0f}% of weight MACs: "
                      + "; ".join(f"{r}: {d}" if d else r for r, d in v["reasons"].items()) + ")"
                      for k, v in sorted(section["left_float"].items(), key=lambda kv: -kv[1]["macs"]))
    names = ", ".join(getattr(e, "name", type(e).__name__) for e in recipe.entries)
    if not section["changed"]:
        msg = f"recipe [{names}] changed nothing in the model" + (f"; left float: {kinds}" if kinds else "")
    elif section["untouched"] > FLOAT_LIMIT:
        msg = (f"recipe [{names}] left {100 * section['untouched']:.0f}% of the weight-bearing MACs "
               f"untouched (limit {100 * FLOAT_LIMIT:.0f}%): {kinds}")
    else:
        return None
    warnings.warn(msg, CoverageWarning, stacklevel=stacklevel)
    return msg


def summary_text(cm: Any, lowered: Any = None) -> str:
    """Before/after size, MACs by dtype, SQNR vs fp32 on the example (and the lowering's check
    and latency when `lowered` is given)."""
    from .backends.compare import sqnr
    cov = cm.report.sections.get("coverage")
    lines = []
    if cov is not None:
        b, a = cov["before"], cov["after"]
        lines.append(f"size: {b['bytes'] / 1e6:.3f} MB -> {a['bytes'] / 1e6:.3f} MB "
                     f"({a['bytes'] / max(b['bytes'], 1):.2f}x)")
        lines.append(f"MACs: {_fmt(b['macs'])} -> {_fmt(a['macs'])}; weight-bearing MACs by dtype: " +
                     ", ".join(f"{f} {100 * cov['families'][f]['macs']:.1f}%"
                               for f in ("int8", "int4", "float")))
        extra = [f"{f} {100 * cov['families'][f]['macs']:.1f}%" for f in ("pruned", "factorized")
                 if cov["families"][f]["macs"]]
        if extra or cov["params_removed"]:
            lines.append("structure: " + ", ".join(extra + [
                f"params removed {100 * cov['params_removed']:.1f}% (pruning, BN folding, ...)"]))
    ref = getattr(cm, "_fp32_outputs", ())
    if ref:
        with torch.no_grad():
            got = pytree.tree_leaves(cm(*cm.example_inputs, **cm.example_kwargs))
        dbs = [sqnr(r, g) for r, g in zip(ref, got) if isinstance(r, torch.Tensor)
               and r.is_floating_point() and isinstance(g, torch.Tensor) and r.shape == g.shape]
        if dbs:
            lines.append(f"SQNR vs fp32 on the example: {min(dbs):.1f} dB")
    if lowered is not None:
        chk = lowered.report.get("check")
        if isinstance(chk, dict) and "sqnr_db" in chk:
            lines.append(f"lowered to {lowered.backend}: {chk['sqnr_db']:.1f} dB vs the IR")
        ms = getattr(lowered, "_latency_ms", None)
        if ms is not None:
            lines.append(f"latency ({lowered.backend}, example, median): {ms:.3f} ms")
    return "\n".join(lines)


def after_compress(cm: Any, before: Snapshot) -> Any:
    """Attach the coverage section to `cm.report` (and the fp32 outputs for `summary`); warn."""
    section = coverage(cm.graph_module, before, cm.recipe, cm.report)
    cm.report.sections["coverage"] = section
    cm._fp32_outputs = before.outputs
    warn_coverage(section, cm.recipe, stacklevel=4)
    return cm
