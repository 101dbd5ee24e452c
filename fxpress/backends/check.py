"""The lowering's self-check: the artefact must compute what its IR computes.

    run = fxpress.lower(cm, "onnxruntime")      # runs the example through the IR and the artefact
    run.report["check"]                         # {"sqnr_db": 61.2, "threshold_db": 20.0, ...}
    fxpress.lower(cm, "tvm", check=False)       # skip it; check=30.0 sets another threshold

One call of each on the example. Below the threshold, `LoweringError` names the first node
(graph order) where they part: the IR is lowered once more with every float compute node as an
extra output (only on failure) and each is compared with the IR's own value.
"""
from __future__ import annotations

import math
import time
from typing import Any, Sequence

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from ..errors import LoweringError
from ..ir.meta import module_path
from .compare import sqnr

__all__ = ["DEFAULT_DB", "check_lowered", "output_sqnr", "first_divergence", "lowered_summary"]

DEFAULT_DB = 20.0


def _ir_outputs(gm: fx.GraphModule, flat_inputs: Sequence, taps: Sequence[fx.Node] = ()) -> tuple:
    """Flat outputs of the IR on flat inputs (and the values of `taps`), on the CPU."""
    vals: dict[str, torch.Tensor] = {}
    want = {n.name for n in taps}

    class _Run(fx.Interpreter):
        def run_node(self, n):
            r = super().run_node(n)
            if n.name in want and isinstance(r, torch.Tensor):
                vals[n.name] = r.detach()
            return r

    args = [a.cpu() if isinstance(a, torch.Tensor) else a for a in flat_inputs]
    with torch.no_grad():
        out = _Run(gm).run(*args)
    return tuple(pytree.tree_leaves(out)), vals


def output_sqnr(ref: Sequence, got: Sequence) -> list[float]:
    """SQNR (dB) of each floating output of `got` against `ref`; -inf for a wrong shape or a
    non-finite value where the other side has another one."""
    out = []
    for r, g in zip(ref, got):
        if not isinstance(r, torch.Tensor) or not r.is_floating_point() or r.numel() == 0:
            continue
        g = torch.as_tensor(g).detach().cpu()
        if tuple(g.shape) != tuple(r.shape):
            out.append(-math.inf)
            continue
        r, g = r.detach().cpu().double(), g.double()
        fin = torch.isfinite(r) & torch.isfinite(g)
        both = ~torch.isfinite(r) & ~torch.isfinite(g) & ((r == g) | (r.isnan() & g.isnan()))
        if bool((~fin & ~both).any()):
            out.append(-math.inf)
            continue
        out.append(sqnr(r[fin], g[fin]) if bool(fin.any()) else math.inf)
    return out


def _tap_nodes(flat: fx.GraphModule) -> list[fx.Node]:
    from .onnx.qdq import QUANT_OPS
    out_args = set(pytree.tree_leaves(flat.graph.output_node().args))
    live: set[fx.Node] = set()  # nodes that depend on an input (not constant subgraphs)
    taps = []
    for n in flat.graph.nodes:
        if n.op == "placeholder":
            live.add(n)
        elif n.op == "call_function" and any(a in live for a in n.all_input_nodes):
            live.add(n)
            v = n.meta.get("val")
            if n.target not in QUANT_OPS and isinstance(v, torch.Tensor) and v.is_floating_point() \
                    and n not in out_args:
                taps.append(n)
    return taps


def first_divergence(gm: fx.GraphModule, flat_inputs: Sequence, compile_fn, threshold: float,
                     **options) -> tuple[fx.Node | None, float, str]:
    """(first node below `threshold` dB, its dB, a note): lowers a copy of `gm` with every float
    compute node as an extra output and compares each with the IR's value."""
    from .base import flat_graph
    flat = flat_graph(gm)
    taps = _tap_nodes(flat)
    if not taps:
        return None, math.nan, "no intermediate node to compare"
    out = flat.graph.output_node()
    n_out = len(out.args[0])
    out.args = (tuple(out.args[0]) + tuple(taps),)
    flat.recompile()
    try:
        probe = compile_fn(flat, tuple(flat_inputs), **options)
        got = list(probe.run_flat(list(flat_inputs)))[n_out:]
    except Exception as e:  # the probe is a diagnosis: its failure must not hide the finding
        return None, math.nan, f"could not lower the probe with intermediate outputs: {type(e).__name__}: {e}"
    _, ref = _ir_outputs(flat, flat_inputs, taps)
    worst: tuple[fx.Node | None, float] = (None, math.inf)
    for n, g in zip(taps, got):
        if n.name not in ref:
            continue
        db = min(output_sqnr([ref[n.name]], [g]) or [math.inf])
        if db < threshold:
            return n, db, ""
        if db < worst[1]:
            worst = (n, db)
    return worst[0], worst[1], "no intermediate node is below the threshold; the worst is named"


def check_lowered(lowered: Any, gm: fx.GraphModule, flat_inputs: Sequence, *, backend: str,
                  compile_fn, check: bool | float = True, device: str = "cpu", **options) -> Any:
    """Run the example through `gm` and `lowered` once; record ``report["check"]``; raise
    LoweringError naming the first node where they part when below the threshold."""
    if check is False or check is None:
        lowered.report["check"] = {"skipped": True}
        return lowered
    threshold = DEFAULT_DB if check is True else float(check)
    t0 = time.perf_counter()
    ref, _ = _ir_outputs(gm, flat_inputs)
    t1 = time.perf_counter()
    got = list(lowered.run_flat(list(flat_inputs)))
    t2 = time.perf_counter()
    dbs = output_sqnr(ref, got)
    db = min(dbs) if dbs else math.inf
    lowered.report["check"] = {"sqnr_db": round(db, 2) if math.isfinite(db) else db,
                               "per_output_db": [round(d, 2) if math.isfinite(d) else d for d in dbs],
                               "threshold_db": threshold, "ir_ms": round(1e3 * (t1 - t0), 3),
                               "artefact_ms": round(1e3 * (t2 - t1), 3)}
    if len(got) != len(ref):
        raise LoweringError(f"{backend} lowering returns {len(got)} outputs, its IR {len(ref)}")
    if db >= threshold:
        return lowered
    worst = dbs.index(db)
    node, node_db, note = first_divergence(gm, flat_inputs, compile_fn, threshold, device=device,
                                           **options)
    where = "" if node is None else (
        f"; first node where they part: {node.name!r} ({node.target}, module "
        f"{module_path(node) or '<top>'!r}) at {node_db:.1f} dB")
    err = LoweringError(
        f"the {backend} lowering disagrees with its IR on the example: output {worst} at "
        f"{db:.1f} dB < {threshold:g} dB{where}" + (f" ({note})" if note else "") +
        "; fxpress.lower(..., check=False) returns it anyway")
    err.node_name = node.name if node is not None else None
    err.sqnr_db = db
    raise err


def lowered_summary(lowered: Any, repeats: int = 5) -> str:
    """Lines for ``run.summary()``: the compressed model's summary, the check and the latency."""
    from ..coverage import summary_text
    from ..timing import median_ms
    args = getattr(lowered, "_example", None)
    if args is not None:
        lowered._latency_ms = median_ms(lambda *a: lowered.run_flat(list(a)), args,
                                        runs=repeats, warmup=1)
    cm = getattr(lowered, "_compressed", None)
    if cm is not None:
        return summary_text(cm, lowered)
    chk = lowered.report.get("check", {})
    lines = [f"lowered to {lowered.backend}"]
    if "sqnr_db" in chk:
        lines.append(f"{chk['sqnr_db']:.1f} dB vs the IR on the example")
    if getattr(lowered, "_latency_ms", None) is not None:
        lines.append(f"latency (example, median of {repeats}): {lowered._latency_ms:.3f} ms")
    return "\n".join(lines)


def lower_checked(model: Any, gm: fx.GraphModule, backend: str, flat_inputs: tuple, *,
                  device: str = "cpu", check: bool | float = True, **options) -> Any:
    """`fxpress.lower`'s last step: compile `gm` on `backend`, then `check_lowered` it."""
    from .base import get_backend
    compile_fn = get_backend(backend)
    lowered = compile_fn(gm, flat_inputs, device=device, **options)
    lowered._example = tuple(flat_inputs)
    if hasattr(model, "report") and hasattr(model, "graph_module"):
        lowered._compressed = model
    if not hasattr(lowered, "run_flat") or not isinstance(getattr(lowered, "report", None), dict):
        return lowered
    return check_lowered(lowered, gm, flat_inputs, backend=backend, compile_fn=compile_fn,
                         check=check, device=device, **options)
