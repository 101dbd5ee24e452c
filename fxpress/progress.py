"""Progress bars: one per long step, shown on a terminal, silenced for a scope on request.

A step that takes long (calibration) owns its bar; callers that want none (the CLI's
``--no-progress``) silence bars for a ``with`` block instead of wrapping the data in a
second bar of their own.

    for b in bar(batches, desc="calibrating", unit="batch"):
        ...
    with quiet():
        fxpress.compress(...)          # no bars inside, whatever stderr is
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

__all__ = ["bar", "quiet"]

# A ContextVar, not a module flag: silencing lasts for one `with` block (and thread/task).
_QUIET: ContextVar[bool] = ContextVar("fxpress_progress_quiet", default=False)


def bar(iterable: Iterable, *, desc: str, unit: str = "it") -> Iterable:
    """`iterable` behind a tqdm bar on stderr: shown only on a terminal and outside `quiet()`."""
    from tqdm.auto import tqdm
    # disable=None: tqdm itself hides the bar when stderr is not a terminal (tests, pipes).
    return tqdm(iterable, desc=desc, unit=unit, leave=False, disable=True if _QUIET.get() else None)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars from fxpress inside the block."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)
