"""Progress bars: one per long step, shown on a terminal, silenced for a scope on request.

A step that takes long (calibration) owns its bar; callers that want none (the CLI's
``--no-progress``) silence bars for a ``with`` block instead of wrapping the data in a
second bar of their own.

    for b in bar(batches, desc="calibrating", unit="batch"):
        ...
    with quiet():
        fxpress.compress(...)          # no bars inside, whatever stderr is
    with step("capturing"):            # one long step: its name and the time it has taken
        ...

``FXPRESS_PROGRESS=0`` turns every bar off; ``FXPRESS_PROGRESS=1`` shows them off a terminal too.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator
from contextvars import ContextVar

__all__ = ["bar", "quiet", "step"]

# A ContextVar, not a module flag: silencing lasts for one `with` block (and thread/task).
_QUIET: ContextVar[bool] = ContextVar("fxpress_progress_quiet", default=False)


def _disable() -> bool | None:
    """tqdm's `disable`: True inside `quiet()` or with FXPRESS_PROGRESS=0, False with
    FXPRESS_PROGRESS=1 (bars even off a terminal, e.g. CI logs), None otherwise: tqdm itself
    hides the bar when stderr is not a terminal (tests, pipes)."""
    if _QUIET.get():
        return True
    env = os.environ.get("FXPRESS_PROGRESS", "").strip()
    if env in ("0", "false", "off", "no"):
        return True
    if env in ("1", "true", "on", "yes"):
        return False
    return None


def bar(iterable: Iterable, *, desc: str, unit: str = "it", total: int | None = None) -> Iterable:
    """`iterable` behind a tqdm bar on stderr: shown only on a terminal and outside `quiet()`."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, unit=unit, leave=False, disable=_disable(), total=total)


@contextlib.contextmanager
def step(desc: str) -> Iterator[None]:
    """One long step without an iteration of its own (capture, export, a compile): a bar that
    shows the step's name and elapsed time while it runs, on the same terms as `bar`."""
    from tqdm.auto import tqdm
    with tqdm(total=1, desc=desc, leave=False, disable=_disable(),
              bar_format="{desc} {elapsed}") as t:
        yield
        t.update(1)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """No progress bars from fxpress inside the block."""
    token = _QUIET.set(True)
    try:
        yield
    finally:
        _QUIET.reset(token)
