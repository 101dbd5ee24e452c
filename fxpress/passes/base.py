"""Pass, PassResult and the context a pass run sees.

A pass is a frozen dataclass whose fields are its options and whose ``name`` is its
recipe/CLI name. ``run`` returns a PassResult; it may rewrite the graph module in
place (the manager hands it a module the user does not own) or return a new one.

    @dataclass(frozen=True)
    class DeadCodeElimination(Pass):
        name: ClassVar[str] = "dce"
        def run(self, gm, ctx):
            modified = gm.graph.eliminate_dead_code()
            gm.recompile()
            return PassResult(gm, modified, {"removed": ...})
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable

import torch.fx as fx

__all__ = ["Pass", "PassResult", "PassContext", "RecipeEntry"]


@dataclass
class PassResult:
    graph_module: fx.GraphModule
    modified: bool
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """What a pass may read besides the graph: inputs, data, the report being built.

    `calibration` is any iterable of input tuples; `finetune` is a callable
    ``finetune(module) -> None`` that trains a module in place (distillation and
    iterative schedules plug in here). `original` is the user's model (read only).
    `report` collects extra sections beside per-pass stats (e.g. sensitivity).
    """

    example_inputs: tuple = ()
    calibration: Iterable | None = None
    finetune: Callable | None = None
    original: Any = None
    device: str = "cpu"
    debug: bool = False
    report: dict[str, Any] = field(default_factory=dict)


class RecipeEntry:
    """Anything that can stand in a Recipe: a pass, or a config that expands to passes.

    Subclasses are frozen dataclasses with a ClassVar ``name``; ``passes()`` returns the
    passes the entry stands for, in order.
    """

    name: ClassVar[str] = ""

    def passes(self) -> list["Pass"]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import fields
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


class Pass(RecipeEntry):
    """One rewrite or analysis over the IR.

    ``requires``: names of properties the pass needs established first (e.g. "shapes");
    ``ensures``: properties that hold after it (e.g. "bn_folded"). The manager checks
    ``requires`` against what earlier passes ensured and names what is missing.
    """

    requires: ClassVar[tuple[str, ...]] = ()
    ensures: ClassVar[tuple[str, ...]] = ()
    invalidates: ClassVar[tuple[str, ...]] = ()

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        raise NotImplementedError

    def passes(self) -> list["Pass"]:
        return [self]
