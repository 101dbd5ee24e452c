"""IR verifier: graph lint, attributes present, no dangling parameters, shapes, records.

    problems = verify(gm, raise_on_error=False)   # [] when the IR is well-formed
    verify(gm)                                    # raises VerificationError listing them
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..errors import VerificationError
from .meta import META_KEY, Record

__all__ = ["verify"]


def _has_attr(gm: fx.GraphModule, target: str) -> bool:
    obj = gm
    for p in str(target).split("."):
        if not hasattr(obj, p):
            return False
        obj = getattr(obj, p)
    return True


def verify(gm: fx.GraphModule, *, check_shapes: bool = True, raise_on_error: bool = True) -> list[str]:
    problems: list[str] = []
    try:
        gm.graph.lint()
    except Exception as e:  # lint raises RuntimeError with the offending node in the text
        problems.append(f"graph lint: {e}")
    read = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            read.add(str(n.target))
            if not _has_attr(gm, n.target):
                problems.append(f"node {n.name!r} reads missing attribute {n.target!r}")
        if n.op == "call_module" and not _has_attr(gm, n.target):
            problems.append(f"node {n.name!r} calls missing module {n.target!r}")
        for key, rec in n.meta.get(META_KEY, {}).items():
            if not isinstance(rec, Record):
                problems.append(f"node {n.name!r}: meta[{META_KEY!r}][{key!r}] is a "
                                f"{type(rec).__name__}, not a typed record")
                continue
            problems += [f"node {n.name!r}: {p}" for p in rec.validate()]
    modules_called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    for name, _ in gm.named_parameters():
        owner = name.rpartition(".")[0]
        if name not in read and not any(owner == c or owner.startswith(c + ".") for c in modules_called):
            problems.append(f"parameter {name!r} is not read by any node (dangling)")
    if check_shapes and not problems:
        problems += _check_shapes(gm)
    if problems and raise_on_error:
        raise VerificationError(problems)
    return problems


def _check_shapes(gm: fx.GraphModule) -> list[str]:
    """Re-propagate shapes and compare with the recorded ones (where recorded)."""
    from ..passes.analysis.shape_prop import placeholder_examples, propagate_shapes
    recorded = {n.name: n.meta.get("val") for n in gm.graph.nodes}
    if any(not isinstance(v, torch.Tensor) for n, v in
           ((n, recorded[n.name]) for n in gm.graph.nodes if n.op == "placeholder")):
        return []
    probe = fx.GraphModule(gm, gm.graph)  # shares params; keeps gm's own meta untouched
    gm.graph.owning_module = gm  # the probe took ownership of the shared graph: give it back
    saved = {n.name: n.meta.get("val") for n in probe.graph.nodes}
    try:
        propagate_shapes(probe, placeholder_examples(gm))
    except Exception as e:
        return [f"shape propagation failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"]
    problems = []
    for n in probe.graph.nodes:
        old, new = saved.get(n.name), n.meta.get("val")
        if isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor) and tuple(old.shape) != tuple(new.shape):
            problems.append(f"node {n.name!r}: recorded shape {tuple(old.shape)} but computes {tuple(new.shape)}")
        n.meta["val"] = old  # probe shares Node objects with gm: restore
    return problems
