"""Distillation: taps (intermediate nodes as graph outputs), losses, offline / online / self trainers.

    recipe = [fxpress.ChannelPruning(ratio=0.5), fxpress.Distill(mode="offline")]
    ft = fxpress.distill.offline(teacher, batches, epochs=3)   # a finetune= callable
"""
from .config import Distill
from .losses import (
                     HintAdapter,
                     attention_loss,
                     attention_map,
                     hint_loss,
                     kd_loss,
                     kept_channels,
                     mutual_loss,
)
from .offline import distill_offline
from .online import distill_online
from .self_distill import ExitHead, SelfDistillResult, distill_self
from .taps import resolve_tap, runner, tap, view
from .trainer import Schedule

__all__ = [
                     "Distill",
                     "ExitHead",
                     "HintAdapter",
                     "Schedule",
                     "SelfDistillResult",
                     "attention_loss",
                     "attention_map",
                     "distill_offline",
                     "distill_online",
                     "distill_self",
                     "hint_loss",
                     "kd_loss",
                     "kept_channels",
                     "mutual_loss",
                     "resolve_tap",
                     "runner",
                     "tap",
                     "view",
]
