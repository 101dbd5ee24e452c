"""Imports every module that registers recipe entries (keeps `known_entries()` complete).

Each line pulls in one family of passes; add a line when you add a family.
"""
from .passes.cleanup import ConstantFold, DeadCodeElimination, FoldBatchNorm  # noqa: F401
from .passes.analysis import CostAnalysis, ShapeProp  # noqa: F401
from .passes.factorize import LowRank  # noqa: F401
from .passes.quant import Quantize  # noqa: F401
from .passes.quant.weight_only import WeightOnly  # noqa: F401
from .passes.prune import ChannelPruning, MagnitudeSparsity  # noqa: F401
from .passes.distill import Distill  # noqa: F401
