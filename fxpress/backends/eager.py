"""Eager backend: run the IR graph module as plain PyTorch (reference numerics)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..utils import atomic_write
from .base import Lowered

__all__ = ["compile_eager", "EagerLowered"]


class EagerLowered(Lowered):
    backend = "eager"

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple):
        super().__init__(gm)
        self.gm = gm
        self.example_inputs = example_inputs

    def __call__(self, *args, **kwargs):
        with torch.no_grad():
            return self.gm(*args, **kwargs)

    def run_flat(self, flat_inputs):
        return torch.utils._pytree.tree_leaves(self.gm(*flat_inputs))

    def save(self, path) -> Any:
        """Write a torch.export program (.pt2) of the IR; load with torch.export.load."""
        ep = torch.export.export(self.gm, tuple(self.example_inputs), strict=False)
        return atomic_write(path, lambda tmp: torch.export.save(ep, tmp))


def compile_eager(gm: fx.GraphModule, example_inputs: tuple, *, device: str = "cpu",
                  **options: Any) -> EagerLowered:
    if options:
        from ..errors import RecipeError
        raise RecipeError("eager backend takes no options", field=next(iter(options)),
                          value=options[next(iter(options))])
    return EagerLowered(gm.to(device), example_inputs)
