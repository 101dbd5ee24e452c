"""Eager backend: run the IR graph module as plain PyTorch (reference numerics)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..utils import atomic_write
from .base import Lowered, flat_graph

__all__ = ["compile_eager", "EagerLowered"]


class EagerLowered(Lowered):
    backend = "eager"

    def __init__(self, gm: fx.GraphModule, example_inputs: tuple):
        super().__init__(gm)
        self.gm = gm
        self.flat = flat_graph(gm)
        self.example_inputs = example_inputs

    def run_flat(self, flat_inputs):
        with torch.no_grad():
            return list(self.flat(*flat_inputs))

    def save(self, path) -> Any:
        """Write a torch.export program (.pt2) of the IR with its flat inputs and outputs (dynamic
        dims kept); load with torch.export.load."""
        from torch.fx.experimental import _config as fx_config
        with fx_config.patch(backed_size_oblivious=True):
            ep = torch.export.export(self.flat, tuple(self.example_inputs), strict=False,
                                     dynamic_shapes=self.signature.export_dynamic_shapes())
        return atomic_write(path, lambda tmp: torch.export.save(ep, tmp))


def compile_eager(gm: fx.GraphModule, example_inputs: tuple, *, device: str = "cpu",
                  **options: Any) -> EagerLowered:
    if options:
        from ..errors import RecipeError
        raise RecipeError("eager backend takes no options", field=next(iter(options)),
                          value=options[next(iter(options))])
    return EagerLowered(gm.to(device), example_inputs)
