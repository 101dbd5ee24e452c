"""Distillation as `finetune` callables for compress(), pruning schedules and QAT.

    teacher = model                                   # the original, frozen
    ft = fxpress.distill.offline(teacher, train_batches, epochs=3, temperature=4.0)
    cm = fxpress.compress(model, (x,), [fxpress.ChannelPruning(ratio=0.5)], finetune=ft)

Each factory returns ``finetune(module) -> dict`` that trains `module` in place (a
CompressedModel, an IR GraphModule or an eager module) and returns its loss history.
In a recipe, use ``fxpress.Distill(mode="offline" | "online" | "self")`` instead.
"""
from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .passes.distill.offline import distill_offline
from .passes.distill.online import distill_online
from .passes.distill.self_distill import distill_self
from .passes.distill.taps import runner
from .passes.distill.trainer import Schedule, first_output, num_inputs, split_batch

__all__ = ["accuracy", "offline", "online", "self_distill"]


def _schedule(epochs: int, lr: float, optimizer: str, max_steps: int | None) -> Schedule:
    return Schedule(epochs=epochs, lr=lr, optimizer=optimizer, max_steps=max_steps)


def offline(teacher: torch.nn.Module, data: Any, *, epochs: int = 3, lr: float = 1e-3,
            optimizer: str = "adam", max_steps: int | None = None, temperature: float = 4.0,
            alpha: float = 0.9, hints: Sequence = (), hint_weight: float = 1.0,
            attention: Sequence = (), attention_weight: float = 100.0,
            kept: dict | None = None) -> Callable[[torch.nn.Module], dict]:
    """finetune(student): Hinton KD from the frozen `teacher` (+ FitNets hints, attention transfer).

    The teacher is never modified (it runs in eval mode, without gradients).
    """
    sched = _schedule(epochs, lr, optimizer, max_steps)

    def finetune(module: torch.nn.Module) -> dict:
        return distill_offline(module, teacher, data, schedule=sched, temperature=temperature,
                               alpha=alpha, hints=hints, hint_weight=hint_weight,
                               attention=attention, attention_weight=attention_weight, kept=kept)
    return finetune


def online(peers: Sequence[torch.nn.Module], data: Any, *, epochs: int = 3, lr: float = 1e-3,
           optimizer: str = "adam", max_steps: int | None = None, temperature: float = 1.0,
           mutual_weight: float = 1.0, copy_peers: bool = False) -> Callable[[torch.nn.Module], dict]:
    """finetune(student): deep mutual learning of the student with `peers` (trained too).

    With ``copy_peers=True`` the peers are deep-copied first so the caller's peers stay as given.
    """
    sched = _schedule(epochs, lr, optimizer, max_steps)

    def finetune(module: torch.nn.Module) -> dict:
        others = [copy.deepcopy(p) for p in peers] if copy_peers else list(peers)
        return distill_online([module, *others], data, schedule=sched, temperature=temperature,
                              mutual_weight=mutual_weight)
    return finetune


def self_distill(data: Any, *, exits: Sequence[str] = (), epochs: int = 3, lr: float = 1e-3,
                 optimizer: str = "adam", max_steps: int | None = None, temperature: float = 3.0,
                 alpha: float = 0.3, feature_weight: float = 0.03) -> Callable[[torch.nn.Module], dict]:
    """finetune(model): Be-Your-Own-Teacher training with auxiliary exits at `exits` (dropped after)."""
    sched = _schedule(epochs, lr, optimizer, max_steps)

    def finetune(module: torch.nn.Module) -> dict:
        return distill_self(module, data, exits=exits, schedule=sched, temperature=temperature,
                            alpha=alpha, feature_weight=feature_weight).stats()
    return finetune


@torch.no_grad()
def accuracy(model: Any, data: Any) -> float:
    """Top-1 accuracy in [0, 1] of `model` (any callable) over labelled batches (x, y)."""
    n_in = num_inputs(model) if isinstance(model, torch.nn.Module) else None
    if isinstance(model, torch.nn.Module):
        model = runner(model)
    correct = total = 0
    for batch in data:
        inputs, labels = split_batch(batch, n_in)
        if labels is None:
            from .errors import CalibrationError
            raise CalibrationError("accuracy() needs labelled batches (x, y)")
        pred = first_output(model(*inputs)).argmax(-1)
        correct += int((pred == labels).sum())
        total += labels.numel()
    return correct / max(total, 1)
