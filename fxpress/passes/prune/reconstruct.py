"""Least-squares reconstruction of the convs that consume pruned channels (He et al. 2017, ThiNet).

After channel pruning a 1x1 conv whose input lost channels (a MobileNet/EfficientNet block's
projection) still holds its old weights for the channels it kept. Refit them instead: on a few
batches, solve  min_W,b ||X_s W + b - Y_t||^2 + ridge·||W||^2  where X_s is the pruned student's
input to that conv and Y_t the unpruned teacher's output of it. The convs are refit in graph
order, each on the student's inputs after the earlier refits (errors do not accumulate). The
intercept b goes where the graph can hold it: the conv's bias, else the running mean of a
batch_norm that reads the conv (bn(y + b) = bn with running_mean - b).

    stats = reconstruct(student_gm, teacher, batches, ["_blocks.9._project_conv", ...])

The student is changed in place; the teacher is not.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import fx

from ...errors import CalibrationError, RecipeError
from ...ir.meta import lineage
from ...utils import iter_batches
from ..distill.taps import ensure_graph, tap, view

__all__ = ["reconstruct"]


def _conv_node(gm: fx.GraphModule, module: str) -> fx.Node:
    for n in gm.graph.nodes:
        lin = lineage(n)
        if n.op == "call_function" and "conv2d" in str(n.target) and lin and lin.module_path == module:
            return n
    raise RecipeError(f"reconstruct: no conv2d of module {module!r} in the graph",
                      field="modules", value=module)


def _param(gm: fx.GraphModule, node: fx.Node | None) -> torch.Tensor | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    obj = gm
    for p in node.target.split("."):
        obj = getattr(obj, p)
    return obj


def _rows(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N·H·W, C) in float64."""
    return t.detach().double().movedim(1, -1).reshape(-1, t.shape[1])


def _collect(run: torch.nn.Module, batches: list[tuple], points: Sequence[str]) -> dict[str, torch.Tensor]:
    acc: dict[str, list[torch.Tensor]] = {p: [] for p in points}
    with torch.no_grad():
        for b in batches:
            feats = run(*b)[1]
            for p in points:
                acc[p].append(_rows(feats[p]))
    return {p: torch.cat(v) for p, v in acc.items()}


def _solve(x: torch.Tensor, y: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """W (C_in, C_out), b (C_out) of the ridge regression of y on [x, 1] (intercept unpenalized)."""
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    gram = xc.T @ xc
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    w = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), xc.T @ yc)
    return w, my - mx @ w


def reconstruct(student: torch.nn.Module, teacher: torch.nn.Module, batches: Iterable,
                modules: Sequence[str], *, ridge: float = 1e-3) -> dict[str, dict[str, float]]:
    """Refit the 1x1 convs `modules` (user module paths) of the pruned `student` graph to the
    `teacher`'s outputs of the same convs on `batches`; returns per module the relative squared
    error of the conv's output before and after the refit."""
    gm = ensure_graph(student, None)
    data = list(iter_batches(batches))
    if not data:
        raise CalibrationError("reconstruct needs at least one batch of inputs")
    t_gm = ensure_graph(teacher, data[0])
    s_convs = {m: _conv_node(gm, m) for m in modules}
    t_convs = {m: _conv_node(t_gm, m) for m in modules}
    for m, n in s_convs.items():
        w = _param(gm, n.args[1])
        if w is None or w.shape[-2:] != (1, 1) or (len(n.args) > 6 and n.args[6] != 1):
            raise RecipeError(f"reconstruct: {m!r} is not a 1x1 conv with its weight in the graph",
                              field="modules", value=m)
    targets = _collect(tap(view(t_gm), [t_convs[m].name for m in modules]), data,
                       [t_convs[m].name for m in modules])
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    order = sorted(modules, key=lambda m: pos[s_convs[m]])
    stats: dict[str, dict[str, float]] = {}
    for m in order:
        node = s_convs[m]
        x_name = node.args[0].name
        got = _collect(tap(view(gm), [x_name, node.name]), data, [x_name, node.name])
        x, y, before = got[x_name], targets[t_convs[m].name], got[node.name]
        w, b = _solve(x, y, ridge)
        after = x @ w + b
        denom = float(y.pow(2).sum()) or 1.0
        stats[m] = {"err_before": float((before - y).pow(2).sum()) / denom,
                    "err_after": float((after - y).pow(2).sum()) / denom}
        weight = _param(gm, node.args[1])
        bias = _param(gm, node.args[2]) if len(node.args) > 2 else None
        mean = None
        if bias is None:  # where the intercept goes, found before anything is written
            bn = [u for u in node.users if "batch_norm" in str(u.target)]
            mean = _param(gm, bn[0].args[3]) if len(bn) == 1 and len(bn[0].args) > 3 else None
            if mean is None:
                raise RecipeError(f"reconstruct: {m!r} has no bias and no batch_norm to hold "
                                  "the intercept", field="modules", value=m)
        with torch.no_grad():
            weight.copy_(w.T.reshape(weight.shape).to(weight.dtype))
            if bias is not None:
                bias.copy_(b.to(bias.dtype))
            else:
                mean.sub_(b.to(mean.dtype))
    return stats
