"""Per-group scale search for weight-only quantization: the clipping ratio of each group's range
that minimises its (optionally importance-weighted) rounding error.

Min/max scales spend the grid on a group's extreme weights; shrinking the range by a factor
``f`` in ``[min_ratio, 1]`` clips those few and rounds the rest finer. Each group keeps the
``f`` (of ``grid + 1`` evenly spaced) with the smallest ``sum_j h_j (w_j - dq(w_j))^2``, where
``h`` is a per-input-channel importance (GPTQ's Hessian diagonal ``mean x_j^2``: the error a
column adds to the layer output) or 1 (plain weight MSE, llama.cpp's ``make_qx_quants`` idea).

    scale, zp = search_qparams(grouped(w, 128), 4, symmetric=False, importance=grouped(h[None], 128))
"""
from __future__ import annotations

import torch

from .weight_only import group_qparams, qrange

__all__ = ["search_qparams", "SCALE_SEARCHES", "qparams"]

SCALE_SEARCHES = ("minmax", "mse")


def search_qparams(wg: torch.Tensor, bits: int, symmetric: bool, *,
                   importance: torch.Tensor | None = None, grid: int = 20,
                   min_ratio: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) per row of `wg` [..., g] (as `group_qparams`), each row's range shrunk
    by the factor that minimises its importance-weighted squared rounding error.

    `importance` broadcasts against `wg` (e.g. [1, G, g] per input channel); ratio 1 (min/max) is
    always a candidate, so the error is never above min/max's."""
    qmin, qmax = qrange(bits)
    best_err = best_s = best_z = None
    for i in range(grid + 1):
        f = 1.0 - (1.0 - min_ratio) * i / grid
        s, z = group_qparams(wg * f, bits, symmetric)
        zf = z.float()[..., None]
        dq = ((torch.round(wg / s[..., None]) + zf).clamp(qmin, qmax) - zf) * s[..., None]
        e = (dq - wg).pow(2)
        if importance is not None:
            e = e * importance
        e = e.sum(-1)
        if best_err is None:
            best_err, best_s, best_z = e, s, z
            continue
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


def qparams(wg: torch.Tensor, bits: int, symmetric: bool, search: str = "minmax",
            importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`group_qparams` ("minmax") or `search_qparams` ("mse") of groups `wg` [..., g]."""
    if search == "minmax":
        return group_qparams(wg, bits, symmetric)
    return search_qparams(wg, bits, symmetric, importance=importance)
