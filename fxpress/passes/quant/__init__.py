"""Quantization passes: annotate (policy), insert observers, calibrate, convert to Q/DQ, fold, QAT.

    cm = fxpress.compress(model, (x,), fxpress.Quantize(mode="static"), calibration=batches)
"""
from .annotate import AnnotateQuant
from .calibrate import Calibrate
from .config import Quantize, parse_spec
from .convert import ConvertToQDQ
from .fold import FoldQDQ
from .insert_observers import InsertObservers, observer_nodes
from .observers import (EntropyObserver, HistogramObserver, MinMaxObserver,
                        MovingAverageMinMaxObserver, MSEObserver, PerChannelMinMaxObserver,
                        make_observer, qparams_from_range)
from .qat import ConvertQAT, LearnableFakeQuantize, PrepareQAT, QATConvBn, convert
from .sensitivity import Sensitivity, sqnr_db

__all__ = [
    "Quantize", "parse_spec", "AnnotateQuant", "InsertObservers", "Calibrate", "ConvertToQDQ",
    "FoldQDQ", "PrepareQAT", "ConvertQAT", "Sensitivity", "QATConvBn", "LearnableFakeQuantize",
    "MinMaxObserver", "MovingAverageMinMaxObserver", "HistogramObserver", "MSEObserver",
    "EntropyObserver", "PerChannelMinMaxObserver", "make_observer", "qparams_from_range",
    "observer_nodes", "convert", "sqnr_db",
]
