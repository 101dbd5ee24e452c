"""Self distillation (Zhang et al., "Be Your Own Teacher", 2019): the deepest layers teach
auxiliary heads on shallow layers; the heads are dropped afterwards.

    result = distill_self(model, labelled_batches, exits=["features.2"], schedule=Schedule(epochs=5))
    result.exit_logits(x)["features.2"]     # the shallow exit, while the heads still exist

The shallow feature maps reach the heads through taps (extra graph outputs), so the
trained network itself never holds a head: dropping `result` removes them.
Each exit i minimises (1-alpha)·CE(q_i, y) + alpha·KD(q_i, q_deep; T) + feature_weight·
‖f_i - f_deep‖²; the deep classifier minimises CE(q_deep, y).

BYOT trains the whole network with its exits from scratch: pass the eager model in train
mode (it is exported as it is, batch-norm on batch statistics). A graph module (a
compressed model) is fine-tuned with its batch-norm frozen, as every distillation mode does.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ...errors import CalibrationError, InputError
from .losses import kd_loss
from .taps import ensure_graph, resolve_tap, tap, tap_candidates
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

__all__ = ["ExitHead", "SelfDistillResult", "auto_exits", "deep_feature_node", "distill_self"]


class ExitHead(torch.nn.Module):
    """3×3 conv bottleneck -> ReLU -> 2×2 average pool -> linear to the deep feature's width ->
    ReLU -> linear classifier.

    The 2×2 pool keeps coarse layout (a global pool of shallow features is nearly
    blind to it); the feature before the classifier has the deep feature's width so
    the feature term can compare them.
    """

    def __init__(self, in_channels: int, width: int, num_classes: int, bottleneck: int = 32):
        super().__init__()
        self.bottleneck = torch.nn.Conv2d(in_channels, bottleneck, 3, padding=1)
        self.project = torch.nn.Linear(4 * bottleneck, width)
        self.fc = torch.nn.Linear(width, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(F.relu(self.bottleneck(x)), 2)
        return F.relu(self.project(x.flatten(1)))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(x)
        return self.fc(f), f


def deep_feature_node(gm: fx.GraphModule) -> fx.Node:
    """The input of the last classifier (the last aten.linear): the deepest feature."""
    linears = [n for n in gm.graph.nodes if n.op == "call_function"
               and n.target is torch.ops.aten.linear.default]
    if not linears:
        raise InputError("self distillation needs a classifier: no aten.linear in the graph")
    return linears[-1].args[0]


def auto_exits(gm: fx.GraphModule, count: int = 2) -> list[str]:
    """Module paths of `count` evenly spaced 4-D feature maps before the last one."""
    maps: list[str] = []
    seen: set[str] = set()
    for path in tap_candidates(gm):
        node = resolve_tap(gm, path)
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == 4 and node.name not in seen:
            seen.add(node.name)
            maps.append(path)
    maps = maps[:-1]  # the deepest map feeds the deep classifier itself
    if not maps:
        raise InputError("self distillation found no shallow 4-D feature map to attach a head to; "
                         "name exits explicitly")
    count = min(count, len(maps))
    return [maps[round((i + 1) * len(maps) / (count + 1)) - 1] for i in range(count)]


@dataclass
class SelfDistillResult:
    """The trained model plus (until dropped) the tapped graph and the exit heads."""

    model: torch.nn.Module
    tapped: fx.GraphModule
    heads: torch.nn.ModuleDict
    exits: list[str]
    history: list[dict[str, float]] = field(default_factory=list)
    example_inputs: tuple = ()
    _eval_tapped: fx.GraphModule | None = field(default=None, repr=False)

    def _inference_graph(self) -> fx.GraphModule:
        """The tapped graph to evaluate with.

        An eager model trained from scratch is exported in train mode (batch-norm on batch
        statistics, updating its running stats); evaluating that graph would normalise by
        the evaluation batch and move the running stats. So an eager model is re-exported
        once in eval mode (sharing its parameters and buffers) and tapped at the same exits.
        """
        if isinstance(self.model, fx.GraphModule) or \
                isinstance(getattr(self.model, "graph_module", None), fx.GraphModule):
            return self.tapped
        if self._eval_tapped is None:
            with training_mode([self.model], False):
                gm = ensure_graph(self.model, self.example_inputs)
            self._eval_tapped = tap(gm, self.exits)
        return self._eval_tapped

    @torch.no_grad()
    def exit_logits(self, *inputs) -> dict[str, torch.Tensor]:
        """{exit: logits, ..., "final": logits} for a batch, with the model in inference mode."""
        out, feats = self._inference_graph()(*inputs)
        res = {e: self.heads[str(i)](feats[e])[0] for i, e in enumerate(self.exits)}
        res["final"] = first_output(out)
        return res

    def stats(self) -> dict[str, Any]:
        return {"mode": "self", "exits": list(self.exits), "epochs": len(self.history),
                "history": self.history}


def distill_self(model: torch.nn.Module, data: Any, *, exits: Sequence[str] = (),
                 schedule: Schedule | None = None, temperature: float = 3.0, alpha: float = 0.3,
                 feature_weight: float = 0.03, progress: Callable | None = None) -> SelfDistillResult:
    """Train `model` in place with auxiliary exit heads taught by its own deepest layers."""
    schedule = schedule or Schedule()
    model, group = data_parallel(model)
    data = reiterable(data)
    n_in = num_inputs(model)
    first_inputs, first_labels = split_batch(next(iter(data)), n_in)
    if first_labels is None:
        raise CalibrationError("self distillation needs labelled batches (x, y)")
    gm = ensure_graph(model, first_inputs)
    exits = list(exits) or auto_exits(gm)
    deep = deep_feature_node(gm).name
    tapped = tap(gm, exits + [deep])
    with torch.no_grad():
        out, feats = tapped(*first_inputs)
    num_classes = first_output(out).shape[-1]
    width = feats[deep].shape[1]
    heads = torch.nn.ModuleDict()
    for i, e in enumerate(exits):
        if feats[e].dim() != 4:
            raise InputError(f"exit {e!r} is not a 4-D feature map: {tuple(feats[e].shape)}")
        heads[str(i)] = ExitHead(feats[e].shape[1], width, num_classes)
    params = trainable_parameters(model, heads)
    opt = schedule.make_optimizer(params)
    sync = gradient_sync(group, params, fresh=[heads])

    def step(inputs: tuple, labels: torch.Tensor | None) -> dict[str, torch.Tensor]:
        if labels is None:
            raise CalibrationError("self distillation needs labelled batches (x, y)")
        out, feats = tapped(*inputs)
        q_deep = first_output(out)
        f_deep = feats[deep].flatten(1).detach()
        terms = {"ce_deep": cross_entropy(q_deep, labels)}
        loss = terms["ce_deep"]
        for i, e in enumerate(exits):
            q, f = heads[str(i)](feats[e])
            ce, kd = cross_entropy(q, labels), kd_loss(q, q_deep.detach(), temperature)
            feat = F.mse_loss(f, f_deep)
            terms[f"ce_{e}"], terms[f"kd_{e}"] = ce, kd
            loss = loss + (1.0 - alpha) * ce + alpha * kd + feature_weight * feat
        terms["loss"] = loss
        return terms

    with training_mode([model, heads], True):
        history = run_epochs(step, [opt], data, schedule, n_in, progress=progress,
                             desc="distill[self]", after_backward=sync)
    return SelfDistillResult(model, tapped, heads, exits, history, tuple(first_inputs))
