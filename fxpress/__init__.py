"""fxpress: a compression compiler for PyTorch.

    import fxpress
    cm = fxpress.compress(model, (x,), [fxpress.Quantize(mode="static")], calibration=batches)
    run = fxpress.lower(cm, backend="inductor", example_inputs=(x,))
"""
from .api import CompressedModel, compress, lower
from .configs import *  # noqa: F401,F403  (registers recipe entries)
from .errors import (CalibrationError, CaptureError, CoverageWarning, FxpressError, InputError,
                     LoweringError, PassError, RecipeError, UnsupportedOpError, VerificationError)
from .frontends import capture
from .passes.base import Pass, PassContext, PassResult
from .passes.cleanup import ConstantFold, DeadCodeElimination, FoldBatchNorm
from .passes.distill import Distill
from . import distill  # fxpress.distill.offline / online / self_distill (finetune factories)
from .passes.factorize import LowRank
from .passes.manager import PassManager
from .passes.prune import ChannelPruning, MagnitudeSparsity
from .passes.quant import Quantize, convert
from .passes.quant.weight_only import WeightOnly
from .recipe import Recipe
from .saving import load

__version__ = "0.1.0"

__all__ = [
    "Distill", "distill",
    "ChannelPruning", "MagnitudeSparsity",
    "Quantize", "convert", "WeightOnly",
    "capture", "compress", "lower", "CompressedModel", "Recipe", "Pass", "PassContext",
    "PassResult", "PassManager", "FoldBatchNorm", "DeadCodeElimination", "ConstantFold",
    "FxpressError", "CaptureError", "InputError", "RecipeError", "UnsupportedOpError",
    "PassError", "VerificationError", "CalibrationError", "LoweringError", "CoverageWarning",
    "LowRank", "load",
]
