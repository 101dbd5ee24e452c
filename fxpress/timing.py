"""Latency measurement shared by the demo and the benches: warm up, then median of N runs."""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

__all__ = ["median_ms", "interleaved_medians", "interleaved_times", "block_times", "block_medians"]


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


def interleaved_times(fns: dict[str, Callable], args: Sequence, *, rounds: int = 20,
                      warmup: int = 3, per_round: int = 0) -> dict[str, list[float]]:
    """Seconds per timed call of each runner, in interleaved, rotated rounds so load hits every
    runner alike. `per_round` 0: each visit is one timed call (right after another runner:
    its caches and thread pool cold); N: one untimed re-warm call, then N timed (steady state,
    as a model called repeatedly; bench/run.py's and bench/llm.py's --per-round)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for n in names:
            for _ in range(warmup):
                fns[n](*args)
        for i in range(rounds):
            for n in names[i % len(names):] + names[:i % len(names)]:
                if per_round > 0:
                    fns[n](*args)  # re-warm: the previous runner had the cores and caches
                for _ in range(max(per_round, 1)):
                    t = time.perf_counter()
                    fns[n](*args)
                    times[n].append(time.perf_counter() - t)
    return times


def interleaved_medians(fns: dict[str, Callable], args: Sequence, *, rounds: int = 20,
                        warmup: int = 3, per_round: int = 0) -> dict[str, float]:
    """Median ms per runner over `interleaved_times`."""
    times = interleaved_times(fns, args, rounds=rounds, warmup=warmup, per_round=per_round)
    return {n: 1e3 * statistics.median(v) for n, v in times.items()}


def block_times(fns: dict[str, Callable], args: Sequence, *, rounds: int, warm: int = 3, timed: int = 5,
                pause_s: float = 0.05) -> dict[str, list[float]]:
    """Seconds per timed call, in rounds of per-runner blocks (rotated order): a pause (the
    previous runtime's pool threads stop spinning), `warm` untimed calls, `timed` timed ones.
    On 2 vCPUs ORT sessions at their defaults spin after each run, so call-by-call interleaving
    reads them 2-3x slow; blocks measure each runner's steady state (issue 24)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for i in range(rounds):
            for n in names[i % len(names):] + names[:i % len(names)]:
                time.sleep(pause_s)
                for _ in range(warm):
                    fns[n](*args)
                for _ in range(timed):
                    t = time.perf_counter()
                    fns[n](*args)
                    times[n].append(time.perf_counter() - t)
    return times


def block_medians(fns: dict[str, Callable], args: Sequence, *, rounds: int, warm: int = 3,
                  timed: int = 5) -> dict[str, float]:
    """Median ms per runner over `block_times`."""
    times = block_times(fns, args, rounds=rounds, warm=warm, timed=timed)
    return {n: 1e3 * statistics.median(v) for n, v in times.items()}
