"""Online distillation: deep mutual learning of two or more peers trained together.

    stats = distill_online([student_a, student_b], labelled_batches, schedule=Schedule(epochs=5))

Each peer minimises CE(labels) + weight · mean_j KL(p_j ‖ p_self) over the other
peers' current (detached) predictions (Zhang et al., "Deep Mutual Learning", 2018).
All peers are trained in place.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ...errors import CalibrationError, InputError
from .losses import mutual_loss
from .taps import runner
from .trainer import (
    Schedule,
    cross_entropy,
    data_parallel,
    first_output,
    gradient_sync,
    num_inputs,
    reiterable,
    run_epochs,
    trainable_parameters,
    training_mode,
)

__all__ = ["distill_online"]


def distill_online(peers: Sequence[torch.nn.Module], data: Any, *, schedule: Schedule | None = None,
                   temperature: float = 1.0, mutual_weight: float = 1.0,
                   progress: Callable | None = None) -> dict[str, Any]:
    """Train every peer in place by mutual learning; returns per-epoch loss history.

    Needs class labels in the batches: without a supervised signal the peers can agree
    on anything and mutual learning collapses.
    """
    unwrapped = [data_parallel(p) for p in peers]
    peers = [m for m, _ in unwrapped]
    group = next((g for _, g in unwrapped if g is not None), None)
    if len(peers) < 2:
        raise InputError(f"online distillation needs at least two peers, got {len(peers)}")
    if len({id(p) for p in peers}) != len(peers):
        raise InputError("online distillation peers must be distinct modules")
    schedule = schedule or Schedule()
    data = reiterable(data)
    n_in = num_inputs(peers[0])

    # one optimiser over all peers: Adam's update is per parameter, so this is the same
    # as one optimiser per peer, and the detached peer targets keep the losses separate
    params = trainable_parameters(*peers)
    opt = schedule.make_optimizer(params)
    sync = gradient_sync(group, params, fresh=peers)

    runs = [runner(p) for p in peers]

    def step(inputs: tuple, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if labels is None:
            raise CalibrationError("online (mutual) distillation needs labelled batches (x, y)")
        logits = [first_output(r(*inputs)) for r in runs]
        terms: dict[str, torch.Tensor] = {}
        total = logits[0].new_zeros(())
        for i, z in enumerate(logits):
            ce = cross_entropy(z, labels)
            kl = mutual_loss(z, [o for j, o in enumerate(logits) if j != i], temperature)
            terms[f"ce{i}"], terms[f"kl{i}"] = ce, kl
            total = total + ce + mutual_weight * kl
        terms["loss"] = total
        return terms

    with training_mode(peers, True):
        history = run_epochs(step, [opt], data, schedule, n_in, progress=progress,
                             desc="distill[online]", after_backward=sync)
    return {"mode": "online", "peers": len(peers), "epochs": len(history), "history": history}
