"""Sensitivity: per-layer SQNR with only that layer quantized, and the accuracy-guarded float set.

Runs on the calibrated (observed) graph, before convert: switching an observer to
fake-quant mode quantizes exactly what convert will quantize, so no graph copies are made.
A layer's sensitivity is the SQNR (dB) of the model output when only that layer's inputs
and weights are quantized (lower = more sensitive). ``keep_float=k`` keeps the k most
sensitive layers in float; ``guard_metric`` keeps adding them, most sensitive first, until
``fp32_metric - metric <= guard_budget``. Float layers lose their QuantAnnotation, so
ConvertToQDQ drops their observers. Both land in ``cm.report.sections``:
``quant_sensitivity`` (rows: module, op, sqnr_db) and ``quant_guard``.
``Quantize(float_policy="auto")`` (the static default) also keeps float the outliers of the
ranking (``auto_float``), named with their dB in ``quant_float_nodes``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ... import distributed
from ...errors import CalibrationError
from ...ir.meta import QuantAnnotation, drop_record, get_record, module_path
from ..base import Pass, PassContext, PassResult
from .annotate import is_transformer
from .calibrate import calibration_batches
from .insert_observers import observer_nodes

__all__ = ["Sensitivity", "sqnr_db"]


def sqnr_db(ref: torch.Tensor, out: torch.Tensor) -> float:
    """10 log10(|ref|^2 / |ref - out|^2) in dB (inf when equal)."""
    ref, out = ref.detach().double().flatten(), out.detach().double().flatten()
    noise = float(((ref - out) ** 2).sum())
    return float("inf") if noise == 0.0 else 10.0 * float(torch.log10((ref ** 2).sum() / noise))


def _flat_out(y) -> torch.Tensor:
    leaves = [t.flatten().float() for t in torch.utils._pytree.tree_leaves(y)
              if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return torch.cat(leaves)


AUTO_GAP_DB, AUTO_ABS_DB = 12.0, 35.0
AUTO_RULE = (f"float where quantizing the node alone gives an output SQNR more than "
             f"{AUTO_GAP_DB:g} dB under the median node's and under {AUTO_ABS_DB:g} dB "
             "(ops without weights; linears too on transformers)")


_WEIGHT_OPS = ("conv", "linear", "embedding")


def auto_float(rows: list[tuple], already: list[str], *, weights: bool) -> list[tuple]:
    """The rows (module, op, node, sqnr_db alone; sorted, worst first) `float_policy="auto"`
    keeps float: the outliers of the sensitivity ranking, never a node that costs little.
    Candidates are the ops without weights (residual adds, attention scores and masks,
    LayerNorm/softmax inputs) and, with `weights` (transformers), linears too (one reading GELU
    outliers); a conv net's convs and linears stay int8 (its accuracy bars hold with them)."""
    vals = sorted(r[3] for r in rows)
    if len(vals) < 3:
        return []
    median = vals[len(vals) // 2]
    return [r for r in rows if r[2] not in already
            and (weights or not r[1].startswith(_WEIGHT_OPS))
            and r[3] < min(median - AUTO_GAP_DB, AUTO_ABS_DB)]


@dataclass(frozen=True)
class Sensitivity(Pass):
    """Measure per-layer quantization SQNR; keep the most sensitive layers float (keep_float / guard)."""

    name: ClassVar[str] = "quant_sensitivity"
    config: Any = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        if not (cfg.sensitivity or cfg.keep_float or cfg.guard_metric is not None) \
                and distributed.world() is not None:
            # float_policy="auto" alone: each rank would rank nodes on its own shard and the
            # ranks' IRs could differ; under a process group every node stays quantized
            return PassResult(gm, False, {"skipped": "float_policy='auto' under a process group"})
        obs = observer_nodes(gm)
        mods = list({id(m): m for _, m in obs}.values())
        layers = [n for n in gm.graph.nodes
                  if (a := get_record(n, QuantAnnotation)) is not None and a.inputs]
        batches = [b for _, b in calibration_batches(ctx, cfg, required=True)][:2]
        if not batches:
            raise CalibrationError("sensitivity analysis needs at least one calibration batch")
        for m in mods:
            m.observing, m.fake_quant = False, False

        def run_all():
            with torch.no_grad():
                return torch.cat([_flat_out(gm(*b)) for b in batches])

        def set_fq(names: set[str] | None):
            for m in mods:
                m.fake_quant = names is None or bool(m.consumers & names)

        try:
            ref = run_all()
            rows = []
            for layer in layers:
                set_fq({layer.name})
                rows.append((module_path(layer), str(layer.target).replace("aten.", ""),
                             layer.name, sqnr_db(ref, run_all())))
                set_fq(set())
            rows.sort(key=lambda r: r[3])
            set_fq(None)
            full = sqnr_db(ref, run_all())
            floated: list[str] = [r[2] for r in rows[:cfg.keep_float]]
            auto = []
            if getattr(cfg, "float_policy", "off") == "auto":
                transformer = is_transformer(gm)
                auto = auto_float(rows, floated, weights=transformer)
                floated += [r[2] for r in auto]
            guard = None
            if cfg.guard_metric is not None:
                guard = self._guard(gm, cfg, rows, floated, mods, set_fq)
        finally:
            for m in mods:
                m.fake_quant = False
        by_name = {n.name: n for n in gm.graph.nodes}
        for name in floated:
            n = by_name[name]
            drop_record(n, QuantAnnotation)
        if auto:
            set_fq_names = {r[2] for r in rows} - set(floated)
            try:
                for m in mods:
                    m.fake_quant = bool(m.consumers & set_fq_names) and not (
                        m.consumers & set(floated) and not (m.consumers - set(floated)) & set_fq_names)
                after = sqnr_db(ref, run_all())
            finally:
                for m in mods:
                    m.fake_quant = False
            ctx.report["quant_float_nodes"] = [
                {"module": r[0], "op": r[1], "node": r[2], "cost_db": round(r[3], 2)} for r in auto]
            ctx.report["quant_float_policy"] = {"all_quantized_sqnr_db": round(full, 2),
                                                "after_sqnr_db": round(after, 2),
                                                "rule": AUTO_RULE}
        ctx.report["quant_sensitivity"] = [
            {"module": r[0], "op": r[1], "node": r[2], "sqnr_db": round(r[3], 2)} for r in rows]
        ctx.report["quant_guard"] = {"all_quantized_sqnr_db": round(full, 2),
                                     "float_layers": [by_name[n].name for n in floated],
                                     "float_modules": [module_path(by_name[n]) for n in floated],
                                     **(guard or {})}
        return PassResult(gm, bool(floated), {"layers": len(rows), "float": len(floated),
                                              "auto_float": len(auto),
                                              "all_quantized_sqnr_db": round(full, 2)})

    @staticmethod
    def _guard(gm, cfg, rows, floated, mods, set_fq):
        quantized = {r[2] for r in rows}

        def metric(float_names: list[str]) -> float:
            set_fq(quantized - set(float_names))
            # an observer shared with a float layer must stay float too: keep it off
            for m in mods:
                if m.consumers & set(float_names) and not (m.consumers - set(float_names)) & quantized:
                    m.fake_quant = False
            return float(cfg.guard_metric(gm))

        set_fq(set())
        fp32 = float(cfg.guard_metric(gm))
        trace = [(len(floated), metric(floated))]
        for r in rows[len(floated):]:
            if fp32 - trace[-1][1] <= cfg.guard_budget or len(floated) >= cfg.guard_max_float:
                break
            floated.append(r[2])
            trace.append((len(floated), metric(floated)))
        set_fq(None)
        return {"fp32_metric": fp32, "metric": trace[-1][1], "budget": cfg.guard_budget,
                "within_budget": fp32 - trace[-1][1] <= cfg.guard_budget,
                "trace": [{"float_layers": k, "metric": v} for k, v in trace]}
