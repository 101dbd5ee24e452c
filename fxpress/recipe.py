"""Recipe: an ordered list of pass configs, written in Python or YAML.

    recipe = fxpress.Recipe([fxpress.ChannelPruning(ratio=0.5), fxpress.Quantize(mode="static")])
    recipe.save("r.yaml")
    fxpress.Recipe.load("r.yaml") == recipe

YAML form: a list whose items are ``{entry_name: {option: value}}`` (or a bare name),
optionally under a top-level ``passes:`` key. JSON is YAML, so ``.json`` files load too.
A file that cannot be read as such (missing, a directory, not UTF-8, bad syntax) is a
``RecipeError`` naming the file.
"""
from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .errors import RecipeError
from .passes.base import Pass, RecipeEntry

# Re-exported: the table and the checks live in fxpress.registry so passes can use them
# without importing this loader.
from .registry import check_choice, check_range, recipe_entry, registered, unknown_option

__all__ = ["Recipe", "check_choice", "check_range", "known_entries", "recipe_entry"]


def known_entries() -> dict[str, type[RecipeEntry]]:
    """Every registered entry by recipe name.

    Complete without importing anything here: Python runs ``fxpress/__init__.py`` (which
    imports ``fxpress.configs``, hence every family) before any ``fxpress.*`` module, so
    by the time this can be called every entry has registered. Importing the families
    from here instead would close a circle recipe -> configs -> families -> recipe.

        "quantize" in known_entries()   # True
    """
    return dict(registered())


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
    def coerce(cls, recipe: Any) -> Recipe:
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
    def from_list(cls, items: list[Any]) -> Recipe:
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
                first = sorted(unknown)[0]
                err = unknown_option(repr(name), first, opts[first], sorted(valid))
                err.field = f"{name}.{first}"
                raise err
            try:
                out.append(entry_cls(**opts))
            except RecipeError:
                raise
            except TypeError as e:
                raise RecipeError(f"bad options for {name!r}: {e}", field=name, value=opts) from e
        return cls(out)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Recipe:
        """Read a YAML/JSON recipe file; every way it can be unreadable is a RecipeError naming it.

            Recipe.load("r.yaml")          # {passes: [{quantize: {mode: static}}]}
        """
        p = Path(path)
        data = _read_recipe_file(p)
        if isinstance(data, dict) and "passes" in data:
            data = data["passes"]
        if data is None:
            raise RecipeError(f"{p}: recipe file is empty", field="path", value=str(p))
        if not isinstance(data, list):
            raise RecipeError(f"{p}: a recipe is a list of passes (or {{passes: [...]}}), "
                              f"not a {type(data).__name__}", field="path", value=str(p))
        try:
            return cls.from_list(data)
        except RecipeError as e:
            # Same field/value/accepted, message prefixed with the file it came from.
            err = RecipeError(f"{p}: {e}")
            err.field, err.value, err.accepted = e.field, e.value, e.accepted
            raise err from e

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


def _read_recipe_file(p: Path) -> Any:
    """The parsed YAML/JSON of `p`, or a RecipeError that names `p` and why it is unreadable."""
    import yaml
    if p.is_dir():
        raise RecipeError(f"{p}: is a directory, not a recipe file", field="path", value=str(p))
    if not p.exists():
        raise RecipeError(f"{p}: recipe file not found", field="path", value=str(p))
    try:
        raw = p.read_bytes()
    except OSError as e:  # permissions, a FIFO gone, I/O errors
        raise RecipeError(f"{p}: cannot read recipe file: {e.strerror or e}",
                          field="path", value=str(p)) from e
    try:
        text = raw.decode("utf-8-sig")  # a BOM some editors write is not an error
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not a text recipe file (invalid UTF-8 at byte {e.start})",
                          field="path", value=str(p)) from e
    try:
        return yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise RecipeError(f"{p}: not valid YAML/JSON: {e}", field="path", value=str(p)) from e


def _plain(v: Any) -> Any:
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v
