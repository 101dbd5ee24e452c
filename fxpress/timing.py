"""Latency measurement shared by the demo and the benches: warm up, then median of N runs."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

__all__ = ["median_ms", "interleaved_medians"]


def median_ms(fn: Callable, args: Sequence, *, runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds, after `warmup` untimed calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn(*args)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def interleaved_medians(fns: dict[str, Callable], args: Sequence, *, rounds: int = 20,
                        warmup: int = 3) -> dict[str, float]:
    """Median ms per runner, timed in interleaved, rotated rounds so load hits every runner alike."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for n in names:
            for _ in range(warmup):
                fns[n](*args)
        for i in range(rounds):
            for n in names[i % len(names):] + names[:i % len(names)]:
                t = time.perf_counter()
                fns[n](*args)
                times[n].append(time.perf_counter() - t)
    return {n: 1e3 * statistics.median(v) for n, v in times.items()}
