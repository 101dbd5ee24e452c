"""fx IR -> ONNX through torch.onnx's exporter: our Q/DQ translations and ORT-form rewrites."""
from .export import ExportedOnnx, export_onnx, flat_module, has_vnni

__all__ = ["ExportedOnnx", "export_onnx", "flat_module", "has_vnni"]
