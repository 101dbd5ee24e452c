"""Helpers for the factorization tests: run one LowRank config on a captured graph, count ops."""
from __future__ import annotations

import copy
from collections import Counter

import torch
import torch.fx as fx

import fxpress
from fxpress.ir.meta import Factorization, get_record, lineage
from fxpress.passes.base import PassContext
from fxpress.passes.manager import PassManager

aten = torch.ops.aten


def apply(gm: fx.GraphModule, cfg, inputs: tuple, calibration=None, debug: bool = True):
    """Run `cfg`'s passes on a copy of `gm` (debug: the verifier runs after each); (gm', stats)."""
    work = copy.deepcopy(gm)
    ctx = PassContext(example_inputs=inputs, calibration=calibration, debug=debug)
    out, report = PassManager(cfg.passes(), debug=debug).run(work, ctx)
    return out, report.passes[-1].stats


def ops(gm: fx.GraphModule) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def factor_nodes(gm: fx.GraphModule) -> list[tuple[fx.Node, Factorization]]:
    return [(n, get_record(n, Factorization)) for n in gm.graph.nodes if get_record(n, Factorization)]


def check_records(gm: fx.GraphModule, method: str, module: str, n_factors: int) -> None:
    """Each factor node carries a Factorization (index 0..n-1) and the replaced module's lineage."""
    fs = [(n, f) for n, f in factor_nodes(gm) if lineage(n).module_path == module]
    assert len(fs) == n_factors, fs
    assert sorted(f.factor_index for _, f in fs) == list(range(n_factors))
    for n, f in fs:
        assert f.method == method and f.num_factors == n_factors and not f.validate()
        assert lineage(n).original_op.startswith(f"lowrank:{method}")


def capture(model, x):
    return fxpress.capture(model.eval(), (x,))
