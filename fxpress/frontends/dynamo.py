"""The torch.compile entry: a Dynamo graph (torch-level fx) -> the fxpress IR.

torch.compile hands a backend ``(gm, example_inputs)``; the inputs are the flattened
user inputs (and possibly lifted parameters). We re-export that graph module, which
is plain straight-line Python, to the same ATen training IR `capture` produces.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from .common import finish_ir
from .export import _capture_error

__all__ = ["from_dynamo_graph"]


def from_dynamo_graph(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Convert the graph a torch.compile backend receives into the fxpress IR."""
    from torch._guards import detect_fake_mode

    inputs = list(example_inputs)
    fake_mode = detect_fake_mode(inputs)
    if fake_mode is not None:  # backends may get fake tensors: make real ones of the same kind
        inputs = [torch.zeros(x.shape, dtype=x.dtype) if isinstance(x, torch.Tensor) else x
                  for x in inputs]
    try:
        ep = torch.export.export(gm, tuple(inputs), strict=False)
    except Exception as e:
        raise _capture_error(e, "export") from e
    return finish_ir(ep.module())
