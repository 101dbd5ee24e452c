"""The state of dependency analysis: channel-element ids per node, unions, blocks, fixups.

A node's `info` is a list with one entry per dim of its value: an int64 array of
channel-element ids (-1 where an index belongs to no prunable channel) or None when
the dim carries no channels. Rules union ids (same channel) or block them (the size
of that dim may not change), and record *fixups*: shape constants (view sizes, split
sizes, conv groups, head counts) to recompute after pruning.
"""
from __future__ import annotations


import numpy as np
import torch
import torch.fx as fx

from ...ir.meta import module_path

__all__ = ["Builder", "Multi", "shape", "arg", "has_ids", "tensor_args", "where"]

aten = torch.ops.aten


class Multi(list):
    """Info of a node whose value is a tuple/list of tensors (split, max_pool_with_indices)."""


def shape(n) -> tuple[int, ...] | None:
    v = n.meta.get("val") if isinstance(n, fx.Node) else None
    if isinstance(v, torch.Tensor):
        try:
            return tuple(int(s) for s in v.shape)
        except TypeError:  # symbolic size
            return None
    return None


def arg(n: fx.Node, i: int, name: str, default=None):
    if len(n.args) > i:
        return n.args[i]
    return n.kwargs.get(name, default)


class Builder:
    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.next_id = 0
        self.ea: list[np.ndarray] = []
        self.eb: list[np.ndarray] = []
        self.blocked: dict[int, str] = {}
        self.info: dict[fx.Node, list | Multi | None] = {}
        self.param_ids: dict[fx.Node, list] = {}
        self.roles: dict[tuple[str, int], str] = {}
        self.fixups: list[tuple] = []
        self.events: list[tuple[str, np.ndarray]] = []
        self.unresolved: list[str] = []

    # -- ids ------------------------------------------------------------------------
    def fresh(self, k: int) -> np.ndarray:
        a = np.arange(self.next_id, self.next_id + k, dtype=np.int64)
        self.next_id += k
        return a

    def union(self, a: np.ndarray, b: np.ndarray, where: str) -> None:
        if a.shape != b.shape:
            self.block(a, where)
            self.block(b, where)
            return
        both = (a >= 0) & (b >= 0)
        self.ea.append(a[both])
        self.eb.append(b[both])
        self.block(a[(a >= 0) & (b < 0)], where)
        self.block(b[(b >= 0) & (a < 0)], where)

    def block(self, ids, reason: str) -> None:
        if ids is None:
            return
        for i in np.unique(np.asarray(ids)).tolist():
            if i >= 0 and i not in self.blocked:
                self.blocked[i] = reason

    def block_info(self, info, reason: str) -> None:
        if isinstance(info, Multi):
            for x in info:
                self.block_info(x, reason)
        elif info:
            for a in info:
                self.block(a, reason)

    def event(self, n: fx.Node, kind: str, arrs) -> None:
        arrs = [a for a in arrs if a is not None]
        if arrs:
            self.events.append((f"{kind}@{module_path(n) if module_path(n) != n.name else n.name}",
                                np.concatenate([a.ravel() for a in arrs])))

    def shape(self, x) -> tuple[int, ...] | None:
        s = shape(x)
        if s is None and isinstance(x, fx.Node) and x.op == "get_attr":
            t = _fetch(self.gm, str(x.target))
            s = tuple(t.shape) if isinstance(t, torch.Tensor) else None
        return s

    def get(self, x) -> list | Multi | None:
        if not isinstance(x, fx.Node):
            return None
        i = self.info.get(x)
        if i is None:
            s = self.shape(x)
            return [None] * len(s) if s is not None else None
        return i

    # -- traversal ------------------------------------------------------------------
    def visit(self, n: fx.Node, rules: dict) -> None:
        if n.op == "get_attr":
            t = _fetch(self.gm, str(n.target))
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not t.is_sparse:
                ids = [self.fresh(s) if s > 1 else None for s in t.shape]
                self.param_ids[n] = ids
                self.info[n] = list(ids)
            return
        if n.op == "placeholder":
            s = shape(n)
            self.info[n] = [None] * len(s) if s is not None else None
            return
        if n.op == "output":
            for leaf in torch.utils._pytree.tree_leaves(n.args):
                if isinstance(leaf, fx.Node):
                    self.block_info(self.get(leaf), "model output")
            return
        if n.op != "call_function":
            self._unknown(n, f"{n.op} {n.target}")
            return
        rule = rules.get(n.target)
        if rule is None:
            if any(has_ids(self.get(a)) for a in tensor_args(n)):
                self._unknown(n, str(n.target))
            else:
                s = shape(n)
                self.info[n] = [None] * len(s) if s is not None else None
            return
        try:
            self.info[n] = rule(self, n)
        except Exception as e:  # a rule that cannot read this node: keep its channels whole
            self._unknown(n, f"{n.target} ({type(e).__name__}: {e})")

    def _unknown(self, n: fx.Node, op: str) -> None:
        reason = f"unresolved: no coupling rule for {op} at {n.name} ({module_path(n)})"
        hit = False
        for a in tensor_args(n):
            i = self.get(a)
            if has_ids(i):
                hit = True
                self.block_info(i, reason)
        if hit:
            self.unresolved.append(reason.split(": ", 1)[1])
        s = shape(n)
        self.info[n] = [None] * len(s) if s is not None else None

    # -- results --------------------------------------------------------------------
    def components(self) -> np.ndarray:
        """Connected components of the union edges: hook roots to the smaller label, then jump."""
        n = self.next_id
        lab = np.arange(n, dtype=np.int64)
        if not self.ea:
            return lab
        a, b = np.concatenate(self.ea), np.concatenate(self.eb)
        while True:
            la, lb = lab[a], lab[b]
            if (la == lb).all():
                break
            m = np.minimum(la, lb)
            np.minimum.at(lab, la, m)
            np.minimum.at(lab, lb, m)
            while True:
                nxt = lab[lab]
                if (nxt == lab).all():
                    break
                lab = nxt
        return np.unique(lab, return_inverse=True)[1].astype(np.int64)

    def blocked_by_component(self, labels: np.ndarray) -> dict[int, str]:
        out: dict[int, str] = {}
        # unresolved couplings win over ordinary reasons so the report names them
        for i, why in sorted(self.blocked.items(), key=lambda kv: not kv[1].startswith("unresolved")):
            out.setdefault(int(labels[i]), why)
        return out

    def notes_by_component(self, labels: np.ndarray) -> dict[int, set]:
        out: dict[int, set] = {}
        for name, ids in self.events:
            for c in np.unique(labels[ids[ids >= 0]]).tolist():
                out.setdefault(c, set()).add(name)
        return out

    def relabel(self, payload, labels):
        if isinstance(payload, np.ndarray):
            return np.where(payload >= 0, labels[np.maximum(payload, 0)], -1)
        if isinstance(payload, (list, tuple)):
            return type(payload)(self.relabel(p, labels) for p in payload)
        return payload


def _fetch(gm, target: str):
    obj = gm
    for p in target.split("."):
        obj = getattr(obj, p, None)
        if obj is None:
            return None
    return obj


def has_ids(info) -> bool:
    if isinstance(info, Multi):
        return any(has_ids(x) for x in info)
    return bool(info) and any(a is not None and (a >= 0).any() for a in info)


def tensor_args(n: fx.Node) -> list[fx.Node]:
    return [a for a in torch.utils._pytree.tree_leaves((n.args, n.kwargs)) if isinstance(a, fx.Node)]


def where(n: fx.Node) -> str:
    return f"{n.target} at {n.name} ({module_path(n)})"
