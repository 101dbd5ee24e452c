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
        single = self._out_spec is None or self._out_spec.is_leaf()
        dims = self.signature.export_dynamic_shapes()
        # a one-tensor model returns a tensor (the wrapper's *args is one argument to export)
        module, dims = (_First(self.flat), (dims,)) if single else (self.flat, dims)
        with fx_config.patch(backed_size_oblivious=True):
            ep = torch.export.export(module, tuple(self.example_inputs), strict=False,
                                     dynamic_shapes=dims)
        return atomic_write(path, lambda tmp: torch.export.save(ep, tmp))


class _First(torch.nn.Module):
    def __init__(self, flat: fx.GraphModule):
        super().__init__()
        self.flat = flat

    def forward(self, *args):
        return self.flat(*args)[0]


def compile_eager(gm: fx.GraphModule, example_inputs: tuple, *, device: str = "cpu",
                  **options: Any) -> EagerLowered:
    if options:
        from ..errors import RecipeError
        raise RecipeError("eager backend takes no options", field=next(iter(options)),
                          value=options[next(iter(options))])
    return EagerLowered(gm.to(device), example_inputs)
