"""Eager backend: run the IR graph module as plain PyTorch (reference numerics)."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..utils import atomic_write
from .base import Lowered, flat_graph

__all__ = ["compile_eager", "EagerLowered", "export_program"]


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
        dims kept) and fxpress's signature / pytree specs as an extra file; load with
        ``fxpress.load`` (the model's calling convention) or ``torch.export.load`` (flat)."""
        import json

        from ..saving import check_suffix, quiet_torch
        from .artefacts import spec_metadata
        path = check_suffix(path, "eager")
        ep = export_program(self.flat, self.signature, self._out_spec, self.example_inputs)
        extra = {"fxpress.json": json.dumps(spec_metadata(self))}
        with quiet_torch():
            return atomic_write(path, lambda tmp: torch.export.save(ep, tmp, extra_files=extra))


def export_program(flat: fx.GraphModule, signature, out_spec, example_inputs: tuple):
    """torch.export of a flat IR graph (``base.flat_graph``) keeping the signature's dynamic dims;
    a one-output model returns its tensor, not a 1-tuple. What the eager backend saves and what
    AOTInductor compiles."""
    from torch.fx.experimental import _config as fx_config

    from ..saving import quiet_torch
    single = out_spec is None or out_spec.is_leaf()
    dims = signature.export_dynamic_shapes()
    # a one-tensor model returns a tensor (the wrapper's *args is one argument to export)
    module, dims = (_First(flat), (dims,)) if single else (flat, dims)
    with fx_config.patch(backed_size_oblivious=True), quiet_torch():
        return torch.export.export(module, tuple(example_inputs), strict=False, dynamic_shapes=dims)


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
