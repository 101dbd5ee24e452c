"""Recipe entries of the pruning family: ChannelPruning (structured) and MagnitudeSparsity.

    fxpress.ChannelPruning(ratio=0.5, importance="l2", scope="global", round_to=8)
    fxpress.ChannelPruning(ratio=0.7, schedule="iterative", steps=5, curve="cubic")
    fxpress.MagnitudeSparsity(sparsity=0.5, pattern="2:4")
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import RecipeError
from ...registry import check_choice, check_range, recipe_entry
from ..base import RecipeEntry
from .importance import IMPORTANCES

__all__ = ["ChannelPruning", "MagnitudeSparsity"]


def _check_patterns(name: str, value) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise RecipeError("must be a list of module names or glob patterns", field=name, value=value)
    return tuple(value)


@recipe_entry
@dataclass(frozen=True)
class ChannelPruning(RecipeEntry):
    """Remove `ratio` of the channels of every prunable group (scope local) or overall (global).

    `round_to` keeps channel counts multiples of 8/16 so kernels stay aligned (kept counts
    rounded `round_mode`="down" as Torch-Pruning does, or "nearest"/"up"); no group
    loses more than `max_ratio` (or its entry in `caps`, a {module glob: ratio} map) and
    none is pruned to zero. `exclude` lists modules (globs) kept whole; the model's
    outputs (the classifier's logits) are always kept. `verify_speed` times each pruned
    group on `speed_backend` and undoes removals that made it slower.
    """

    name: ClassVar[str] = "channel_pruning"
    ratio: float = 0.5
    importance: str = "l2"
    scope: str = "global"
    round_to: int = 8
    round_mode: str = "down"
    max_ratio: float = 0.9
    caps: dict | None = None
    exclude: tuple[str, ...] = ()
    schedule: str = "one_shot"
    steps: int = 1
    curve: str = "linear"
    taylor_batches: int = 4
    verify_speed: bool = False
    speed_backend: str = "eager"
    seed: int = 0

    def __post_init__(self):
        check_range("ratio", self.ratio, 0, 1, lo_open=True, hi_open=True)
        check_choice("importance", self.importance, IMPORTANCES)
        check_choice("scope", self.scope, ("global", "local"))
        if not isinstance(self.round_to, int) or isinstance(self.round_to, bool):
            raise RecipeError("must be an integer", field="round_to", value=self.round_to)
        check_range("round_to", self.round_to, 1, 256)
        check_choice("round_mode", self.round_mode, ("down", "nearest", "up"))
        check_range("max_ratio", self.max_ratio, 0, 1, lo_open=True, hi_open=True)
        if self.caps is not None:
            if not isinstance(self.caps, dict):
                raise RecipeError("must be a {module glob: max ratio} map", field="caps", value=self.caps)
            for k, v in self.caps.items():
                check_range(f"caps[{k!r}]", v, 0, 1, hi_open=True)
        object.__setattr__(self, "exclude", _check_patterns("exclude", self.exclude))
        check_choice("schedule", self.schedule, ("one_shot", "iterative"))
        if not isinstance(self.steps, int) or self.steps < 1 or (self.schedule == "one_shot" and self.steps != 1):
            raise RecipeError("one_shot takes steps=1; iterative takes steps >= 1",
                              field="steps", value=self.steps)
        check_choice("curve", self.curve, ("linear", "cubic"))
        check_range("taylor_batches", self.taylor_batches, 1, 1000)
        check_choice("verify_speed", self.verify_speed, (True, False))
        check_choice("speed_backend", self.speed_backend, ("eager", "inductor"))

    def passes(self):
        from .schedule import PruneChannels
        return [PruneChannels(config=self)]


@recipe_entry
@dataclass(frozen=True)
class MagnitudeSparsity(RecipeEntry):
    """Zero the smallest weights of conv/linear layers: unstructured or 2:4, local or global.

    The masks are recorded in the IR (SparsityMask on each layer). `lower` says what
    then runs them: "dense" keeps dense kernels; "auto" measures, per layer, whether a
    sparse kernel (2:4 semi-structured on CUDA, CSR on CPU) beats dense at the layer's
    density and uses it only where it does (the report says which and why).
    """

    name: ClassVar[str] = "magnitude_sparsity"
    sparsity: float = 0.5
    pattern: str = "unstructured"
    scope: str = "local"
    exclude: tuple[str, ...] = ()
    lower: str = "dense"
    min_params: int = 0

    def __post_init__(self):
        check_range("sparsity", self.sparsity, 0, 1, lo_open=True, hi_open=True)
        check_choice("pattern", self.pattern, ("unstructured", "2:4"))
        check_choice("scope", self.scope, ("local", "global"))
        object.__setattr__(self, "exclude", _check_patterns("exclude", self.exclude))
        check_choice("lower", self.lower, ("dense", "auto"))
        if self.pattern == "2:4" and self.sparsity != 0.5:
            raise RecipeError("2:4 sparsity is exactly 0.5", field="sparsity", value=self.sparsity,
                              accepted=[0.5])
        check_range("min_params", self.min_params, 0)

    def passes(self):
        from .magnitude import SparsifyWeights
        from .semi_structured import LowerSparse
        ps = [SparsifyWeights(config=self)]
        if self.lower == "auto":
            ps.append(LowerSparse())
        return ps
