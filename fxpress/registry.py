"""The recipe-entry registry: the name -> config-class table and the option checks.

Pass families import this module (never ``fxpress.recipe``) so that registering an
entry does not import the recipe loader, which in turn imports every family; the
loader (``fxpress.recipe``) only reads the table.

    @recipe_entry
    @dataclass(frozen=True)
    class Dce(Pass):
        name: ClassVar[str] = "dce"
        ratio: float = 0.5
        def __post_init__(self):
            check_range("ratio", self.ratio, 0.0, 1.0)

    registered()["dce"] is Dce
"""
from __future__ import annotations

import dataclasses
import difflib
import functools
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from .errors import RecipeError
from .passes.base import RecipeEntry

__all__ = ["check_choice", "check_range", "recipe_entry", "registered", "unknown_option"]

# Filled at import time by @recipe_entry; read through registered() only.
_REGISTRY: dict[str, type[RecipeEntry]] = {}


def recipe_entry(cls: type[RecipeEntry]) -> type[RecipeEntry]:
    """Class decorator: make `cls` available in recipes under `cls.name`; an unknown keyword
    (``Quantize(moed="static")``) is a RecipeError naming it, the accepted ones and the closest."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a ClassVar `name`")
    _REGISTRY[cls.name] = cls
    if dataclasses.is_dataclass(cls):
        init = cls.__init__

        @functools.wraps(init)
        def checked_init(self, *args, **kwargs):
            unknown = [k for k in kwargs if k not in _options(type(self))]
            if unknown:
                raise unknown_option(type(self).__name__, unknown[0], kwargs[unknown[0]],
                                     _options(type(self)))
            init(self, *args, **kwargs)
        cls.__init__ = checked_init
    return cls


def _options(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init]


def unknown_option(owner: str, name: str, value: Any, accepted: Iterable[str]) -> RecipeError:
    """The RecipeError for an option `owner` does not have, with a did-you-mean."""
    accepted = list(accepted)
    close = difflib.get_close_matches(name, accepted, n=1, cutoff=0.6)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return RecipeError(f"unknown option {name!r} for {owner}{hint}", field=name, value=value,
                       accepted=accepted)


def registered() -> Mapping[str, type[RecipeEntry]]:
    """A read-only view of the entries registered so far (imports nothing).

    ``fxpress.recipe.known_entries()`` first imports every family, then reads this.
    """
    return MappingProxyType(_REGISTRY)


def check_choice(field: str, value: Any, accepted: Iterable[Any]) -> None:
    """Raise RecipeError naming `field` unless `value` is one of `accepted`.

        check_choice("mode", "static", ("static", "dynamic"))   # passes
    """
    accepted = list(accepted)
    if value not in accepted:
        raise RecipeError("invalid value", field=field, value=value, accepted=accepted)


def check_range(field: str, value: Any, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise RecipeError naming `field` unless lo <= value <= hi (open ends when asked).

        check_range("ratio", 0.5, 0.0, 1.0, hi_open=True)       # passes
    """
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError("must be a number", field=field, value=value)
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
          (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise RecipeError(f"must be in {lb}{lo}, {hi}{rb}", field=field, value=value)
