from .dce import DeadCodeElimination, remove_unused_attributes
from .constant_fold import ConstantFold
from .bn_fold import FoldBatchNorm

__all__ = ["DeadCodeElimination", "remove_unused_attributes", "ConstantFold", "FoldBatchNorm"]
