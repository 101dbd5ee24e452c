"""Offline distillation: a frozen teacher trains the student (Hinton KD + FitNets hints + attention).

    stats = distill_offline(student_gm, teacher, batches, schedule=Schedule(epochs=5),
                            hints=["features.3"], attention=["features.3"])

The student is trained in place. Intermediate features come from taps (extra graph
outputs, see taps.py) on both networks; a hint point may name different nodes in
each (``"s_point=t_point"``). Where the student is a pruned copy of the teacher, the
hint adapter starts as the channel-selection matrix the pruning pass recorded.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from ...errors import InputError
from .losses import HintAdapter, attention_loss, hint_loss, kd_loss, kept_channels
from .taps import ensure_graph, resolve_tap, runner, tap
from .trainer import (
    Schedule,
    cross_entropy,
    data_parallel,
    first_output,
    gradient_sync,
    num_inputs,
    reiterable,
    run_epochs,
    split_batch,
    trainable_parameters,
    training_mode,
)

__all__ = ["distill_offline", "parse_pairs"]


def parse_pairs(points: Iterable[str | tuple[str, str]]) -> list[tuple[str, str]]:
    """Hint/attention points as (student_point, teacher_point); "a=b" or ("a", "b") or "a" (same)."""
    out = []
    for p in points:
        if isinstance(p, (tuple, list)):
            if len(p) != 2:
                raise InputError(f"a tap pair is (student_point, teacher_point), got {p!r}")
            out.append((str(p[0]), str(p[1])))
        elif "=" in p:
            s, t = p.split("=", 1)
            out.append((s.strip(), t.strip()))
        else:
            out.append((p, p))
    return out


def _features(out: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    logits, feats = out
    return first_output(logits), feats


def distill_offline(student: torch.nn.Module, teacher: torch.nn.Module, data: Any, *,
                    schedule: Schedule | None = None, temperature: float = 4.0, alpha: float = 0.9,
                    hints: Sequence = (), hint_weight: float = 1.0,
                    attention: Sequence = (), attention_weight: float = 100.0,
                    kept: dict[str, Sequence[int]] | None = None, progress: Callable | None = None) -> dict[str, Any]:
    """Train `student` in place to match the frozen `teacher`; returns per-epoch loss history.

    loss = alpha·KD(T) + (1-alpha)·CE(labels) + hint_weight·Σ hint + attention_weight·Σ AT;
    without labels in the batches the KD term has weight 1. `kept` maps a student hint point
    to the teacher channels its channels were selected from, where no pruning record says so.
    """
    schedule = schedule or Schedule()
    student, group = data_parallel(student)
    data = reiterable(data)
    n_in = num_inputs(student)
    first_inputs, _ = split_batch(next(iter(data)), n_in)
    hint_pairs, at_pairs = parse_pairs(hints), parse_pairs(attention)
    s_points = list(dict.fromkeys([s for s, _ in hint_pairs + at_pairs]))
    t_points = list(dict.fromkeys([t for _, t in hint_pairs + at_pairs]))

    adapters = torch.nn.ModuleDict()
    adapter_init: dict[str, str] = {}
    with training_mode([teacher], False):
        if s_points:
            s_gm = ensure_graph(student, first_inputs)
            s_run = tap(s_gm, s_points)
            t_run = tap(ensure_graph(teacher, first_inputs), t_points)
            with torch.no_grad():
                _, s_f = _features(s_run(*first_inputs))
                _, t_f = _features(t_run(*first_inputs))
            for i, (sp, tp) in enumerate(hint_pairs):
                cs, ct = s_f[sp].shape[1], t_f[tp].shape[1]
                sel = (kept or {}).get(sp)
                sel = tuple(sel) if sel is not None else kept_channels(s_gm, resolve_tap(s_gm, sp), ct)
                if sel is not None and len(sel) == cs and ct > max(sel, default=-1):
                    adapters[str(i)] = HintAdapter.from_selection(sel, ct)
                    adapter_init[sp] = "selection"
                else:
                    adapters[str(i)] = HintAdapter(cs, ct)
                    adapter_init[sp] = "identity" if cs == ct else "random"
        else:
            s_run, t_run = runner(student), runner(teacher)

        params = trainable_parameters(student, adapters)
        opt = schedule.make_optimizer(params)
        sync = gradient_sync(group, params, fresh=[adapters])

        def step(inputs: tuple, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
            with torch.no_grad():
                t_out = t_run(*inputs)
            s_out = s_run(*inputs)
            if s_points:
                (s_logits, s_feats), (t_logits, t_feats) = _features(s_out), _features(t_out)
            else:
                s_logits, t_logits = first_output(s_out), first_output(t_out)
            kd = kd_loss(s_logits, t_logits, temperature)
            terms = {"kd": kd}
            if labels is not None:
                terms["ce"] = cross_entropy(s_logits, labels)
                loss = alpha * kd + (1.0 - alpha) * terms["ce"]
            else:
                loss = kd
            if hint_pairs:
                terms["hint"] = sum(hint_loss(adapters[str(i)](s_feats[sp]), t_feats[tp])
                                    for i, (sp, tp) in enumerate(hint_pairs))
                loss = loss + hint_weight * terms["hint"]
            if at_pairs:
                terms["attention"] = sum(attention_loss(s_feats[sp], t_feats[tp]) for sp, tp in at_pairs)
                loss = loss + attention_weight * terms["attention"]
            terms["loss"] = loss
            return terms

        with training_mode([student], True):
            history = run_epochs(step, [opt], data, schedule, n_in, progress=progress,
                                 desc="distill[offline]", after_backward=sync)
    return {"mode": "offline", "epochs": len(history), "history": history,
            "adapter_init": adapter_init}
