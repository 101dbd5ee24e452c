"""Pruning: structured channel removal over dependency groups, magnitude / 2:4 sparsity, schedules."""
from .config import ChannelPruning, MagnitudeSparsity
from .schedule import PruneChannels, step_ratios

__all__ = ["ChannelPruning", "MagnitudeSparsity", "PruneChannels", "step_ratios"]
