"""fx IR -> ONNX: our emitter (translation tables keyed by aten op objects)."""
from . import ops, qdq  # noqa: F401  (fill the translation table)
from .emitter import OPSET, TABLE, Emitter, emit_onnx, supported

__all__ = ["OPSET", "TABLE", "Emitter", "emit_onnx", "supported"]
