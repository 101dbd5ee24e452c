"""Recipe: an ordered list of pass configs, written in Python or YAML.

    recipe = fxpress.Recipe([fxpress.ChannelPruning(ratio=0.5), fxpress.Quantize(mode="static")])
    recipe.save("r.yaml")
    fxpress.Recipe.load("r.yaml") == recipe

YAML form: a list whose items are ``{entry_name: {option: value}}`` (or a bare name),
optionally under a top-level ``passes:`` key.
"""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable

from .errors import RecipeError
from .passes.base import Pass, RecipeEntry

__all__ = ["Recipe", "recipe_entry", "known_entries", "check_choice", "check_range"]

_REGISTRY: dict[str, type[RecipeEntry]] = {}


def recipe_entry(cls: type[RecipeEntry]) -> type[RecipeEntry]:
    """Class decorator: make `cls` available in recipes under `cls.name`."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} needs a ClassVar `name`")
    _REGISTRY[cls.name] = cls
    return cls


def known_entries() -> dict[str, type[RecipeEntry]]:
    from . import configs  # noqa: F401  (imports every module that registers entries)
    return dict(_REGISTRY)


def check_choice(field: str, value: Any, accepted: Iterable[Any]) -> None:
    """Raise RecipeError naming `field` unless `value` is one of `accepted`."""
    accepted = list(accepted)
    if value not in accepted:
        raise RecipeError("invalid value", field=field, value=value, accepted=accepted)


def check_range(field: str, value: Any, lo: float | None = None, hi: float | None = None,
                *, lo_open: bool = False, hi_open: bool = False) -> None:
    """Raise RecipeError naming `field` unless lo <= value <= hi (open ends when asked)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError("must be a number", field=field, value=value)
    bad = (lo is not None and (value <= lo if lo_open else value < lo)) or \
          (hi is not None and (value >= hi if hi_open else value > hi))
    if bad:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        raise RecipeError(f"must be in {lb}{lo}, {hi}{rb}", field=field, value=value)


class Recipe:
    """An ordered list of recipe entries (pass configs)."""

    def __init__(self, entries: Iterable[RecipeEntry] = ()):
        self.entries: list[RecipeEntry] = []
        for i, e in enumerate(entries):
            if not isinstance(e, RecipeEntry):
                raise RecipeError(f"entry {i} is a {type(e).__name__}, not a pass config",
                                  field=f"entries[{i}]", value=e,
                                  accepted=sorted(known_entries()))
            self.entries.append(e)

    # -- construction ------------------------------------------------------------
    @classmethod
    def coerce(cls, recipe: Any) -> "Recipe":
        """Accept a Recipe, a list of configs or dicts, one config, or a YAML/JSON path."""
        if isinstance(recipe, Recipe):
            return recipe
        if isinstance(recipe, RecipeEntry):
            return cls([recipe])
        if isinstance(recipe, (str, os.PathLike)):
            return cls.load(recipe)
        if isinstance(recipe, (list, tuple)):
            return cls.from_list(list(recipe))
        if recipe is None:
            return cls([])
        raise RecipeError("a recipe is a Recipe, a list of configs, one config or a YAML path",
                          field="recipe", value=type(recipe).__name__)

    @classmethod
    def from_list(cls, items: list[Any]) -> "Recipe":
        known = known_entries()
        out: list[RecipeEntry] = []
        for i, item in enumerate(items):
            if isinstance(item, RecipeEntry):
                out.append(item)
                continue
            if isinstance(item, str):
                name, opts = item, {}
            elif isinstance(item, dict) and isinstance(item.get("name"), str):  # {name: x, opt: v}
                opts = dict(item)
                name = opts.pop("name")
            elif isinstance(item, dict) and len(item) == 1:  # {x: {opt: v}}
                (name, opts), = item.items()
                opts = opts or {}
            else:
                raise RecipeError(f"recipe item {i} must be a name or {{name: {{options}}}}",
                                  field=f"passes[{i}]", value=item)
            if not isinstance(opts, dict):
                raise RecipeError(f"options of recipe item {i} ({name!r}) must be a mapping",
                                  field=f"passes[{i}]", value=opts)
            if name not in known:
                raise RecipeError(f"unknown recipe entry {name!r} (item {i})", field=f"passes[{i}]",
                                  value=name, accepted=sorted(known))
            entry_cls = known[name]
            valid = {f.name for f in dataclasses.fields(entry_cls) if f.init}
            unknown = set(opts) - valid
            if unknown:
                raise RecipeError(f"unknown option(s) {sorted(unknown)} for {name!r}",
                                  field=f"{name}.{sorted(unknown)[0]}", value=opts[sorted(unknown)[0]],
                                  accepted=sorted(valid))
            try:
                out.append(entry_cls(**opts))
            except RecipeError:
                raise
            except TypeError as e:
                raise RecipeError(f"bad options for {name!r}: {e}", field=name, value=opts) from e
        return cls(out)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Recipe":
        import yaml
        p = Path(path)
        if not p.is_file():
            raise RecipeError("recipe file not found", field="path", value=str(p))
        try:
            data = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"{p}: not valid YAML/JSON: {e}", field="path", value=str(p)) from e
        if isinstance(data, dict) and "passes" in data:
            data = data["passes"]
        if not isinstance(data, list):
            raise RecipeError(f"{p}: a recipe is a list of passes (or {{passes: [...]}})",
                              field="path", value=str(p))
        return cls.from_list(data)

    # -- output ---------------------------------------------------------------------
    def to_list(self) -> list[dict[str, Any]]:
        return [{e.name: _plain(e.to_dict())} for e in self.entries]

    def save(self, path: str | os.PathLike) -> Path:
        import yaml
        from .utils import atomic_write_text
        return atomic_write_text(path, yaml.safe_dump({"passes": self.to_list()}, sort_keys=False))

    def passes(self) -> list[Pass]:
        return [p for e in self.entries for p in e.passes()]

    def __iter__(self):
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Recipe) and self.to_list() == other.to_list()

    def __repr__(self) -> str:
        return f"Recipe({self.entries!r})"


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
