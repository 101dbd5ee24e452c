"""Distill: the recipe entry that fine-tunes the compressed graph by distillation.

    recipe = [fxpress.ChannelPruning(ratio=0.5), fxpress.Distill(mode="offline", epochs=3),
              fxpress.Quantize(mode="static")]
    cm = fxpress.compress(model, (x,), recipe, calibration=labelled_batches)

YAML: ``- distill: {mode: offline, epochs: 3, hints: [layer1, layer2]}``.

Data: ``data="calibration"`` trains on compress()'s calibration batches (``(x, y)``
batches carry labels; bare inputs give pure distillation); ``data="pkg.mod:fn"`` calls
``fn()`` for the batches. The teacher of mode="offline" is the user's original model,
frozen. mode="online" trains the graph mutually with ``peers - 1`` trainable copies of
the original model (dropped afterwards); mode="self" trains it with auxiliary exit
heads taught by its own deepest layer (dropped afterwards).
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import fx

from ...errors import CalibrationError, RecipeError
from ...registry import check_choice, check_range, recipe_entry
from ..base import Pass, PassContext, PassResult
from .offline import distill_offline
from .online import distill_online
from .self_distill import distill_self
from .trainer import Schedule

__all__ = ["Distill"]


def _as_tuple(obj: Any, name: str, value: Any) -> None:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RecipeError("must be a list of module paths or node names", field=name, value=value)
    object.__setattr__(obj, name, tuple(value))


@recipe_entry
@dataclass(frozen=True)
class Distill(Pass):
    """Fine-tune the graph in place by offline, online (mutual) or self distillation."""

    name: ClassVar[str] = "distill"
    mode: str = "offline"
    epochs: int = 3
    lr: float = 1e-3
    optimizer: str = "adam"
    lr_decay: str = "cosine"
    max_steps: int | None = None
    temperature: float | None = None  # None: 4 offline, 1 online (DML), 3 self (BYOT)
    alpha: float | None = None      # offline/self: weight of the soft term vs CE; None: 0.9 / 0.3
    hints: tuple[str, ...] = ()     # offline: FitNets hint points ("student=teacher" to differ)
    hint_weight: float = 1.0
    attention: tuple[str, ...] = ()  # offline: attention-transfer points
    attention_weight: float = 100.0
    peers: int = 2                  # online: number of networks trained together
    exits: tuple[str, ...] = ()     # self: where auxiliary heads attach (empty: automatic)
    feature_weight: float = 0.03    # self: weight of the exit-to-deep feature term
    data: str = "calibration"
    seed: int = 0

    def __post_init__(self):
        check_choice("mode", self.mode, ["offline", "online", "self"])
        # the schedule validates epochs / lr / optimizer / lr_decay / max_steps
        self.schedule()
        if self.temperature is not None:
            check_range("temperature", self.temperature, 0.0, 100.0, lo_open=True)
        if self.alpha is not None:
            check_range("alpha", self.alpha, 0.0, 1.0)
        check_range("hint_weight", self.hint_weight, 0.0)
        check_range("attention_weight", self.attention_weight, 0.0)
        check_range("peers", self.peers, 2, 16)
        check_range("feature_weight", self.feature_weight, 0.0)
        for f in ("hints", "attention", "exits"):
            _as_tuple(self, f, getattr(self, f))
        if self.mode != "offline" and (self.hints or self.attention):
            raise RecipeError("hints / attention apply to mode='offline' only", field="mode",
                              value=self.mode, accepted=["offline"])
        if self.data != "calibration" and ":" not in self.data:
            raise RecipeError("data is 'calibration' or 'package.module:function'", field="data",
                              value=self.data)

    # per-mode defaults: Hinton KD's T=4 / alpha=0.9 for a frozen teacher; DML's T=1; BYOT's
    # T=3 with alpha=0.3 (on digits, alpha=0.9 drops the shallow exit ~4 pt below plain deep
    # supervision, see bench/distill.py)
    _DEFAULTS: ClassVar[dict[str, tuple[float, float]]] = {
        "offline": (4.0, 0.9), "online": (1.0, 0.0), "self": (3.0, 0.3)}

    def resolved(self) -> tuple[float, float]:
        """(temperature, alpha) with the mode's defaults filled in."""
        t, a = self._DEFAULTS[self.mode]
        return (t if self.temperature is None else self.temperature,
                a if self.alpha is None else self.alpha)

    def schedule(self) -> Schedule:
        return Schedule(epochs=self.epochs, lr=self.lr, optimizer=self.optimizer,
                        lr_decay=self.lr_decay, max_steps=self.max_steps)

    def _data(self, ctx: PassContext) -> Any:
        if self.data == "calibration":
            if ctx.calibration is None:
                raise CalibrationError("Distill needs data: pass compress(..., calibration=batches) "
                                       "or Distill(data='package.module:function')")
            return ctx.calibration
        mod, _, fn = self.data.partition(":")
        try:
            return getattr(importlib.import_module(mod), fn)()
        except (ImportError, AttributeError) as e:
            raise RecipeError(f"cannot load distillation data: {e}", field="data", value=self.data) from e

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        data = self._data(ctx)
        with torch.random.fork_rng(devices=[]):  # reproducible without touching the caller's RNG
            torch.manual_seed(self.seed)
            stats = self._train(gm, ctx, data)
        history = stats.pop("history", [])
        if history:
            stats["loss_first_epoch"] = round(history[0]["loss"], 6)
            stats["loss_last_epoch"] = round(history[-1]["loss"], 6)
        ctx.report.setdefault("distill", []).append({"mode": self.mode, "history": history})
        return PassResult(gm, True, stats)

    def _train(self, gm: fx.GraphModule, ctx: PassContext, data: Any) -> dict[str, Any]:
        sched = self.schedule()
        temperature, alpha = self.resolved()
        if self.mode == "offline":
            if ctx.original is None:
                raise RecipeError("mode='offline' needs a teacher: the pass context has no original "
                                  "model (use compress(), or fxpress.distill.offline(teacher, ...))",
                                  field="mode", value=self.mode)
            return distill_offline(gm, ctx.original, data, schedule=sched,
                                   temperature=temperature, alpha=alpha, hints=self.hints,
                                   hint_weight=self.hint_weight, attention=self.attention,
                                   attention_weight=self.attention_weight)
        if self.mode == "online":
            if ctx.original is None:
                raise RecipeError("mode='online' trains the graph with copies of the original model; "
                                  "the pass context has none", field="mode", value=self.mode)
            peers = [_peer(ctx.original, i) for i in range(self.peers - 1)]
            return distill_online([gm, *peers], data, schedule=sched, temperature=temperature)
        res = distill_self(gm, data, exits=self.exits, schedule=sched, temperature=temperature,
                           alpha=alpha, feature_weight=self.feature_weight)
        return res.stats()


def _peer(original: torch.nn.Module, index: int) -> torch.nn.Module:
    """A trainable copy of the original model (the user's model itself is never touched).

    Copies beyond the first get a small weight perturbation: identical peers would see
    identical gradients and teach each other nothing.
    """
    peer = copy.deepcopy(original)
    if index > 0:
        g = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for p in peer.parameters():
                if p.is_floating_point() and p.numel() > 1:
                    p.add_(torch.randn(p.shape, generator=g) * 0.01 * p.std())
    return peer
