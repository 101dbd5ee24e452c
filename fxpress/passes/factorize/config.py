"""LowRank: the recipe entry that factorizes linear / matmul / conv nodes into chains of smaller ops.

    fxpress.LowRank(method="svd", energy=0.9)               # linear, matmul(x, W): W ~ U.V
    fxpress.LowRank(method="svd", rank=64, whiten=True)     # activation-aware (SVD-LLM), needs calibration
    fxpress.LowRank(method="tucker", budget=0.5)            # conv: 1x1 -> kxk core -> 1x1 at half the MACs
    fxpress.LowRank(method="cp", rank=32)                   # conv: 1x1 -> kx1 dw -> 1xk dw -> 1x1
    fxpress.LowRank(method="tt", tt_order=3, energy=0.95)   # linear: tensor-train cores, reshapes + mm

Rank selection: give at most one of `rank`, `energy`, `budget`, `vbmf=True`; with none,
`energy=0.9`. A layer whose factorized form needs at least the dense MACs (or, with
`verify_speed=True`, runs no faster when measured) is left alone and listed in the
report's `skipped` with the reason.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ...errors import RecipeError
from ...registry import check_choice, check_range, recipe_entry
from ..base import Pass, RecipeEntry

__all__ = ["LowRank", "METHODS"]

METHODS = ("svd", "tucker", "cp", "tt")


def _positive_ints(field: str, value, max_len: int | None = None) -> tuple[int, ...] | int:
    items = value if isinstance(value, (tuple, list)) else (value,)
    if not items or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in items):
        raise RecipeError("an explicit rank is a positive integer (or a tuple of them)",
                          field=field, value=value)
    if max_len is not None and isinstance(value, (tuple, list)) and len(items) > max_len:
        raise RecipeError(f"takes at most {max_len} ranks here", field=field, value=value)
    return tuple(items) if isinstance(value, (tuple, list)) else value


@recipe_entry
@dataclass(frozen=True)
class LowRank(RecipeEntry):
    """Factorize weights into chains of smaller real ops (never a reconstructed dense weight)."""

    name: ClassVar[str] = "lowrank"
    method: str = "svd"
    rank: int | tuple[int, ...] | None = None   # tucker: r or (r_out, r_in); tt: bond-rank cap
    energy: float | None = None                 # keep this fraction of the squared spectrum
    budget: float | None = None                 # factorized cost <= budget * dense cost
    budget_on: str = "macs"                     # macs | params
    budget_scope: str = "layer"                 # layer: each layer; model: the whole graph's MACs
    vbmf: bool = False                          # empirical VBMF ranks (Kim et al. 2016)
    whiten: bool = False                        # svd only: activation-aware, from ctx.calibration
    calib_batches: int = 16
    include: tuple[str, ...] = ()               # fnmatch patterns on module paths ("encoder.*.dense")
    exclude: tuple[str, ...] = ()
    verify_speed: bool = False                  # also require a measured (eager) speed-up
    tt_order: int = 3                           # tt: number of cores
    tt_shape: tuple | None = None               # tt: ((o1, .., od), (i1, .., id)); default balanced
    cp_iters: int = 300                         # cp: ALS sweeps at most
    max_memory_mb: int = 1024                   # cp: bound on the ALS working set per layer

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        for f in ("include", "exclude"):
            v = getattr(self, f)
            if isinstance(v, str):
                v = (v,)
            object.__setattr__(self, f, tuple(v))
        chosen = [f for f in ("rank", "energy", "budget") if getattr(self, f) is not None]
        chosen += ["vbmf"] if self.vbmf else []
        if len(chosen) > 1:
            raise RecipeError("give one rank rule", field=chosen[1], value=getattr(self, chosen[1]),
                              accepted=["rank", "energy", "budget", "vbmf"])
        if not chosen:
            object.__setattr__(self, "energy", 0.9)
        if self.rank is not None:
            max_len = {"tucker": 2, "tt": None}.get(self.method, 1)
            object.__setattr__(self, "rank", _positive_ints("rank", self.rank, max_len))
            if isinstance(self.rank, tuple) and len(self.rank) == 1:
                object.__setattr__(self, "rank", self.rank[0])
        if self.energy is not None:
            check_range("energy", self.energy, 0.0, 1.0, lo_open=True)
        if self.budget is not None:
            check_range("budget", self.budget, 0.0, 1.0, lo_open=True)
        check_choice("budget_on", self.budget_on, ("macs", "params"))
        check_choice("budget_scope", self.budget_scope, ("layer", "model"))
        if self.budget_scope == "model" and self.budget_on != "macs":
            raise RecipeError("a model-wide budget counts MACs", field="budget_on", value=self.budget_on,
                              accepted=["macs"])
        if self.whiten and self.method != "svd":
            raise RecipeError("whitening is for method='svd'", field="whiten", value=True)
        check_range("calib_batches", self.calib_batches, 1)
        check_range("tt_order", self.tt_order, 2, 8)
        if self.tt_shape is not None:
            shp = self.tt_shape
            if (not isinstance(shp, (tuple, list)) or len(shp) != 2
                    or len(shp[0]) != len(shp[1]) or len(shp[0]) < 2):
                raise RecipeError("tt_shape is ((o1, .., od), (i1, .., id)) with d >= 2",
                                  field="tt_shape", value=shp)
            _positive_ints("tt_shape", tuple(shp[0]) + tuple(shp[1]))
            object.__setattr__(self, "tt_shape", (tuple(shp[0]), tuple(shp[1])))
            object.__setattr__(self, "tt_order", len(shp[0]))
        if self.method == "tt" and isinstance(self.rank, tuple) and len(self.rank) != self.tt_order - 1:
            raise RecipeError(f"tt takes one rank per bond: {self.tt_order - 1} for tt_order={self.tt_order}",
                              field="rank", value=self.rank)
        check_range("cp_iters", self.cp_iters, 1)
        check_range("max_memory_mb", self.max_memory_mb, 1)

    def passes(self) -> list[Pass]:
        from .cp import CPFactorize
        from .svd import SVDFactorize
        from .tensor_train import TTFactorize
        from .tucker import TuckerFactorize
        cls = {"svd": SVDFactorize, "tucker": TuckerFactorize, "cp": CPFactorize, "tt": TTFactorize}
        return [cls[self.method](self)]
