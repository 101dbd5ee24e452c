"""Frontends: turn a user's model (or a graph torch.compile hands us) into the IR."""
from .export import capture, check_inputs
from .dynamo import from_dynamo_graph

__all__ = ["capture", "check_inputs", "from_dynamo_graph"]
