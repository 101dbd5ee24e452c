"""The latency service: time candidate forms of one layer on the target backend, cached.

Decisions that trade speed (int8 vs float, dense vs factorized, dense vs sparse) are
measured, not guessed (DESIGN.md). A pass describes each candidate form of one layer by a
builder returning ``(fn, args)``; the service times it with its timer and caches the answer
keyed by (op, shapes, dtype, ISA feature key, backend, form): in memory, and in one JSON file
(``<cache_dir>/latency.json``, written atomically) so a second compress of the same model on
the same machine times nothing.

    svc = LatencyService("inductor")
    ms = svc.compare("aten.conv2d", [(1, 64, 56, 56), (64, 64, 3, 3)], "float32",
                     {"float": build_float, "int8": build_int8})
    # {'float': 0.41, 'int8': 0.23}; svc.timed counts the builders actually run

A timer is any ``timer({form: LatencyKey}, {form: builder}) -> {form: ms}``; the default
builds every candidate and times them in interleaved rounds (a shared machine's load hits
each form alike). Tests pass a fake one: its builders are never called, so nothing compiles.
"""
from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

__all__ = ["LatencyKey", "LatencyService", "default_timer", "concrete_shape", "BACKENDS"]

BACKENDS = ("inductor", "onnxruntime", "eager", "tvm")
Builder = Callable[[], tuple[Callable, tuple]]
_FILE_LOCK = threading.Lock()


@dataclass(frozen=True)
class LatencyKey:
    """What one timing is of: an op of given shapes/dtype in one form, on one ISA and backend."""

    op: str                          # "aten.conv2d.default"
    shapes: tuple                    # ((1, 64, 56, 56), (64, 64, 3, 3), ...) plus op options
    dtype: str                       # "float32"
    isa: str                         # fxpress.passes.quant.weight_form.feature_key(host)
    backend: str                     # inductor | onnxruntime | eager | tvm
    form: str                        # "float" | "int8" | "dense" | "factorized" | "sparse" ...

    def text(self) -> str:
        """The JSON cache key (stable across processes)."""
        return json.dumps(asdict(self), sort_keys=True, default=str)


def concrete_shape(shape: Sequence) -> tuple[int, ...]:
    """A shape with dynamic (symbolic) dims at the size they were captured with (else 1)."""
    import torch
    out = []
    for d in shape:
        if isinstance(d, torch.SymInt):
            hint = getattr(d.node, "hint", None)
            d = int(hint) if hint is not None else 1
        out.append(int(d))
    return tuple(out)


def _freeze(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x


def default_timer(keys: Mapping[str, LatencyKey], builders: Mapping[str, Builder], *,
                  rounds: int = 30) -> dict[str, float]:
    """Build every candidate, then {form: median ms} over interleaved, rotated rounds."""
    from .timing import interleaved_medians
    built = {f: builders[f]() for f in keys}
    args = {f: a for f, (_, a) in built.items()}
    fns = {f: (lambda fn=fn, a=args[f]: fn(*a)) for f, (fn, _) in built.items()}
    return interleaved_medians(fns, (), rounds=rounds, warmup=3)


class LatencyService:
    """Timed, cached answers to "which form of this layer is faster on `backend` here?".

    `cache_dir`: where latency.json lives (default ``fxpress.examples.cache_dir()``, i.e.
    $FXPRESS_CACHE or ~/.cache/fxpress); ``False`` keeps the cache in memory only.
    `features`: the host record (default ``fxpress.hw.host()``): its ISA key is in every key.
    """

    def __init__(self, backend: str = "inductor", *, timer: Callable | None = None,
                 cache_dir: str | Path | bool | None = None, features: Any = None):
        from .errors import RecipeError
        if backend not in BACKENDS:
            raise RecipeError("unknown latency backend", field="latency_backend", value=backend,
                              accepted=list(BACKENDS))
        from .passes.quant.weight_form import feature_key, host_features
        self.backend = backend
        self.isa = feature_key(features if features is not None else host_features())
        self.timer = timer or default_timer
        if cache_dir is None:
            from .examples import cache_dir as _default_dir
            cache_dir = _default_dir()
        self.path = None if cache_dir is False else Path(cache_dir) / "latency.json"
        self._memory: dict[str, float] = self._load()
        self.timed = 0      # timings actually run (not served from a cache)
        self.hits = 0

    def _load(self) -> dict[str, float]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a cache that cannot be read is re-measured, never trusted
        return {k: float(v) for k, v in data.items() if isinstance(v, (int, float))}

    def _store(self, entries: dict[str, float]) -> None:
        self._memory.update(entries)
        if self.path is None:
            return
        from .utils import atomic_write_text
        with _FILE_LOCK:  # merge with what another service wrote meanwhile, then replace
            merged = {**self._load(), **self._memory}
            atomic_write_text(self.path, json.dumps(merged, indent=0, sort_keys=True))

    def key(self, op: str, shapes: Sequence, dtype: str, form: str) -> LatencyKey:
        return LatencyKey(str(op), _freeze(shapes), str(dtype), self.isa, self.backend, form)

    def compare(self, op: str, shapes: Sequence, dtype: str,
                forms: Mapping[str, Builder]) -> dict[str, float]:
        """{form: ms} for every candidate form of one layer: cached ones read, the rest timed.

        Forms are timed together (interleaved) whenever any is missing, so the ratio between
        them comes from one measurement.
        """
        keys = {f: self.key(op, shapes, dtype, f) for f in forms}
        if all(k.text() in self._memory for k in keys.values()):
            self.hits += len(keys)
            return {f: self._memory[k.text()] for f, k in keys.items()}
        ms = {f: float(v) for f, v in self.timer(keys, dict(forms)).items()}
        self.timed += len(keys)
        self._store({keys[f].text(): v for f, v in ms.items()})
        return {f: ms[f] for f in forms}

    def fastest(self, op: str, shapes: Sequence, dtype: str, forms: Mapping[str, Builder],
                *, default: str) -> tuple[str, dict[str, float]]:
        """(the fastest form, {form: ms}); ties go to `default` (the form that needs no change)."""
        ms = self.compare(op, shapes, dtype, forms)
        best = min(ms, key=lambda f: (ms[f], f != default))
        return best, ms
