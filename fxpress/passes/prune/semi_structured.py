"""Sparse lowering: run masked linear layers on a sparse kernel only where it beats dense.

On CUDA, 2:4-masked linear weights become `torch.sparse.to_sparse_semi_structured`
tensors (cuSPARSELt / CUTLASS sparse tensor-core GEMMs; F.linear dispatches to them).
On CPU, a linear is rewritten to a CSR matmul only when a measurement at the layer's
own shape and density says CSR is faster; otherwise it stays dense and the report
says so, with the density below which CSR would win.

    cm = fxpress.compress(model, x, fxpress.MagnitudeSparsity(sparsity=0.95, lower="auto"))
    print(cm.report.sections["sparse_lowering"])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.fx as fx

from ...ir.meta import SparsityMask, get_record, lineage, module_path, set_record
from ...timing import median_ms
from ..base import Pass, PassContext, PassResult

__all__ = ["LowerSparse", "csr_linear", "csr_crossover", "time_fn", "to_semi_structured"]

aten = torch.ops.aten
_DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.02, 0.01)


def csr_linear(x: torch.Tensor, w_csr: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with a CSR weight: y = (W @ x^T)^T, batched over leading dims."""
    x2 = x.reshape(-1, x.shape[-1])
    y = torch.mm(w_csr, x2.t()).t()
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w_csr.shape[0])


def time_fn(fn, repeat: int = 10) -> float:
    """Median seconds of fn() after 3 warm-up calls."""
    return median_ms(fn, (), runs=repeat, warmup=3) / 1e3


def _dense_vs_csr(w: torch.Tensor, rows: int) -> tuple[float, float]:
    x = torch.randn(rows, w.shape[1], dtype=w.dtype)
    w_csr = w.to_sparse_csr()
    return (time_fn(lambda: torch.nn.functional.linear(x, w)),
            time_fn(lambda: csr_linear(x, w_csr)))


def csr_crossover(out_f: int, in_f: int, rows: int, densities=_DENSITIES) -> float | None:
    """The highest density (of those tried, descending) at which CSR beats dense for this shape."""
    g = torch.Generator().manual_seed(0)
    for d in densities:
        w = torch.randn(out_f, in_f, generator=g) * (torch.rand(out_f, in_f, generator=g) < d)
        dense, csr = _dense_vs_csr(w, rows)
        if csr < dense:
            return d
    return None


def to_semi_structured(gm: fx.GraphModule, target: str) -> None:
    """Replace a 2:4-masked weight by its semi-structured sparse form (CUDA, fp16/bf16)."""
    from torch.sparse import to_sparse_semi_structured
    owner, _, attr = target.rpartition(".")
    mod = gm.get_submodule(owner) if owner else gm
    w = getattr(mod, attr)
    mod.register_parameter(attr, torch.nn.Parameter(to_sparse_semi_structured(w.detach()),
                                                    requires_grad=False))


@dataclass(frozen=True)
class LowerSparse(Pass):
    """Move masked linear layers to a sparse kernel where measured faster; keep the rest dense."""

    name: ClassVar[str] = "lower_sparse"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        lines, used = [], 0
        cuda = str(ctx.device).startswith("cuda") and torch.cuda.is_available()
        cache: dict[tuple, float | None] = {}
        for n in list(gm.graph.nodes):
            rec = get_record(n, SparsityMask)
            if rec is None:
                continue
            name = module_path(n)
            if n.target is not aten.linear.default:
                lines.append(f"{name}: dense kept (no sparse conv kernel on this backend)")
                continue
            w = _param(gm, rec.param)
            if cuda:
                if rec.pattern != "2:4":
                    lines.append(f"{name}: dense kept (CUDA sparse tensor cores need 2:4)")
                    continue
                try:
                    to_semi_structured(gm, rec.param)
                except Exception as e:  # shape/dtype limits of the sparse GEMM
                    lines.append(f"{name}: dense kept ({type(e).__name__}: {str(e).splitlines()[0]})")
                    continue
                used += 1
                lines.append(f"{name}: 2:4 semi-structured")
                continue
            x = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
            rows = max(1, x.numel() // x.shape[-1]) if isinstance(x, torch.Tensor) else 1
            dense_s, csr_s = _dense_vs_csr(w.detach(), rows)
            key = (tuple(w.shape), rows)
            if key not in cache:
                cache[key] = csr_crossover(w.shape[0], w.shape[1], rows)
            cross = cache[key]
            cross_s = f"CSR wins below density {cross}" if cross else "CSR never wins down to density 0.01"
            if csr_s < dense_s:
                self._to_csr(gm, n, rec.param)
                used += 1
                lines.append(f"{name}: CSR (density {rec.density:.3f}; dense {dense_s * 1e3:.3f} ms, "
                             f"csr {csr_s * 1e3:.3f} ms; {cross_s})")
            else:
                lines.append(f"{name}: dense kept (density {rec.density:.3f}; dense {dense_s * 1e3:.3f} ms, "
                             f"csr {csr_s * 1e3:.3f} ms; {cross_s})")
        if used:
            gm.recompile()
        ctx.report["sparse_lowering"] = "\n".join(lines)
        return PassResult(gm, used > 0, {"sparse_layers": used, "dense_layers": len(lines) - used,
                                         "device": "cuda" if cuda else "cpu"})

    @staticmethod
    def _to_csr(gm: fx.GraphModule, n: fx.Node, target: str) -> None:
        w = _param(gm, target)
        owner, _, attr = target.rpartition(".")
        mod = gm.get_submodule(owner) if owner else gm
        delattr(mod, attr)
        mod.register_buffer(attr, w.detach().to_sparse_csr())
        args = list(n.args) + [None] * (3 - len(n.args))
        with gm.graph.inserting_after(n):
            new = gm.graph.call_function(csr_linear, (args[0], args[1], args[2]))
        new.meta = dict(n.meta)
        lin = lineage(n)
        if lin is not None:
            set_record(new, lin.derived("csr_linear"))
        n.replace_all_uses_with(new)
        gm.graph.erase_node(n)


def _param(gm, target):
    obj = gm
    for p in target.split("."):
        obj = getattr(obj, p)
    return obj
