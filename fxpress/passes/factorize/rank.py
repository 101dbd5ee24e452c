"""Rank selection: explicit rank, spectral-energy threshold, MAC/parameter budget, and EVBMF.

    energy_rank(s, 0.9)          # smallest r keeping 90% of sum(s**2)
    vbmf_rank(matrix)            # Nakajima et al. 2013 analytic empirical VBMF
    budget_rank(cost, 0.5, hi)   # largest r with cost(r) <= 0.5 * cost(dense)
"""
from __future__ import annotations

import math
from typing import Callable

import torch

__all__ = ["energy_rank", "vbmf_rank", "budget_rank", "budget_scale"]


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest r whose leading singular values hold `energy` of the total squared spectrum."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0) / total
    # a tolerance so that energy=1.0 keeps the numerically non-zero spectrum, not every value
    return int(torch.searchsorted(cum, torch.tensor(energy - 1e-12, dtype=cum.dtype)).item()) + 1


def budget_rank(cost: Callable[[int], float], budget: float, dense: float, hi: int) -> int:
    """Largest r in [1, hi] with cost(r) <= budget * dense (cost increasing in r); 0 if none."""
    lo, best = 1, 0
    while lo <= hi:
        mid = (lo + hi) // 2
        if cost(mid) <= budget * dense:
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def budget_scale(cost: Callable[[float], float], budget: float, dense: float, iters: int = 40) -> float:
    """Largest a in (0, 1] with cost(a) <= budget * dense (bisection; cost increasing in a)."""
    lo, hi = 0.0, 1.0
    if cost(1.0) <= budget * dense:
        return 1.0
    for _ in range(iters):
        mid = (lo + hi) / 2
        if cost(mid) <= budget * dense:
            lo = mid
        else:
            hi = mid
    return lo


def _tau(x: torch.Tensor, alpha: float) -> torch.Tensor:
    return 0.5 * (x - (1 + alpha) + torch.sqrt(torch.clamp((x - (1 + alpha)) ** 2 - 4 * alpha, min=0)))


def _evb_objective(sigma2: float, L: int, M: int, s: torch.Tensor, residual: float, xubar: float) -> float:
    H, alpha = s.numel(), L / M
    x = s ** 2 / (M * sigma2)
    z1, z2 = x[x > xubar], x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    obj = (torch.sum(z2 - torch.log(z2)) + torch.sum(z1 - tau_z1)
           + torch.sum(torch.log((tau_z1 + 1) / z1)) + alpha * torch.sum(torch.log(tau_z1 / alpha + 1)))
    return float(obj) + residual / (M * sigma2) + (L - H) * math.log(sigma2)


def _golden_min(f: Callable[[float], float], lo: float, hi: float, iters: int = 80) -> float:
    """Minimise f on [lo, hi] by golden-section search in log space (the bounds span decades)."""
    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(math.exp(d))
    return math.exp((a + b) / 2)


def vbmf_rank(y: torch.Tensor) -> int:
    """Rank that analytic empirical variational Bayesian matrix factorization keeps.

    Nakajima, Sugiyama, Babacan, Tomioka (JMLR 2013), the rule Kim et al. (2016) use to
    pick Tucker-2 ranks: estimate the noise variance by minimising the EVB free energy,
    then keep the singular values above the EVB threshold. At least 1.
    """
    y = y.double()
    if y.shape[0] > y.shape[1]:
        y = y.T
    L, M = y.shape
    s = torch.linalg.svdvals(y)
    H = L
    alpha = L / M
    tauubar = 2.5129 * math.sqrt(alpha)
    xubar = (1 + tauubar) * (1 + alpha / tauubar)
    residual = 0.0
    eH_ub = int(min(math.ceil(L / (1 + alpha)) - 1, H)) - 1
    upper = float((s ** 2).sum()) / (L * M)
    tail = s[eH_ub + 1:] if eH_ub + 1 < H else s[-1:]
    lower = max(float(s[min(eH_ub + 1, H - 1)] ** 2) / (M * xubar), float((tail ** 2).mean()) / M)
    lower = max(lower, upper * 1e-12, 1e-300)
    if upper <= lower:
        sigma2 = upper
    else:
        sigma2 = _golden_min(lambda v: _evb_objective(v, L, M, s, residual, xubar), lower, upper)
    threshold = math.sqrt(M * sigma2 * (1 + tauubar) * (1 + alpha / tauubar))
    return max(1, int((s > threshold).sum()))
