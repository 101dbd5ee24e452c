"""Backends: turn the IR into something that runs (eager, Inductor, ONNX Runtime, TVM)."""
from .base import Backend, Lowered, get_backend, register_backend, available_backends

__all__ = ["Backend", "Lowered", "get_backend", "register_backend", "available_backends"]
