"""Recipe files: every unreadable file is a RecipeError naming it; the registry moved, old names stay."""
from __future__ import annotations

import os

import pytest

import fxpress
from fxpress.errors import RecipeError
from fxpress.recipe import Recipe


def _raises_naming(path, match: str) -> RecipeError:
    with pytest.raises(RecipeError, match=match) as ei:
        Recipe.load(path)
    assert str(path) in str(ei.value)  # the message names the file
    assert ei.value.field == "path" and ei.value.value == str(path)
    return ei.value


def test_random_bytes_and_invalid_utf8(tmp_path):
    p = tmp_path / "noise.yaml"
    p.write_bytes(bytes(range(256)) * 4)  # 0x80.. are not UTF-8 start bytes
    err = _raises_naming(p, r"invalid UTF-8 at byte 128")
    assert isinstance(err.__cause__, UnicodeDecodeError)
    q = tmp_path / "latin1.yaml"
    q.write_bytes("- quantize: {mode: 'st\xe4tic'}\n".encode("latin-1"))
    _raises_naming(q, "not a text recipe file")
    # Through compress's coercion too (a str is a path).
    with pytest.raises(RecipeError, match="noise.yaml"):
        Recipe.coerce(str(p))


@pytest.mark.parametrize("name, content, match", [
    ("bad.yaml", b"passes:\n  - quantize: {mode: static\n", "not valid YAML/JSON"),
    ("bad.json", b'{"passes": [{"quantize": {"mode": "static"}]', "not valid YAML/JSON"),
    ("nul.yaml", b"- dce\x00\n", "not valid YAML/JSON"),  # UTF-8, but YAML refuses control chars
    ("scalar.yaml", b"42\n", "a recipe is a list of passes.*not a int"),
    ("empty.yaml", b"", "recipe file is empty"),
    ("comment.yaml", b"# nothing yet\n", "recipe file is empty"),
])
def test_bad_syntax_or_shape(tmp_path, name, content, match):
    p = tmp_path / name
    p.write_bytes(content)
    _raises_naming(p, match)


def test_directory_missing_and_unreadable(tmp_path):
    _raises_naming(tmp_path, "is a directory")
    _raises_naming(tmp_path / "nope.yaml", "recipe file not found")
    p = tmp_path / "secret.yaml"
    p.write_text("- dce\n")
    p.chmod(0)
    try:
        if os.access(p, os.R_OK):  # root reads anything: the permission case cannot arise
            assert Recipe.load(p) == Recipe([fxpress.DeadCodeElimination()])
        else:
            _raises_naming(p, "cannot read recipe file")
    finally:
        p.chmod(0o600)


def test_bad_entries_name_the_file(tmp_path):
    e = tmp_path / "entry.json"
    e.write_text('[{"no_such_pass": {}}]')
    with pytest.raises(RecipeError, match=r"entry.json: unknown recipe entry 'no_such_pass'") as ei:
        Recipe.load(e)
    assert ei.value.field == "passes[0]" and "dce" in ei.value.accepted  # details kept


def test_valid_json_yaml_and_bom_load(tmp_path):
    want = Recipe([fxpress.DeadCodeElimination(), fxpress.Quantize(mode="dynamic")])
    j = tmp_path / "r.json"
    j.write_text('{"passes": ["dce", {"quantize": {"mode": "dynamic"}}]}')
    assert Recipe.load(j) == want
    b = tmp_path / "bom.yaml"
    b.write_bytes(b"\xef\xbb\xbf- dce\n- quantize: {mode: dynamic}\n")  # editors' UTF-8 BOM
    assert Recipe.load(b) == want
    saved = want.save(tmp_path / "out.yaml")
    assert Recipe.load(saved) == want


def test_registry_names_still_importable_from_recipe():
    from fxpress import recipe, registry
    assert recipe.recipe_entry is registry.recipe_entry
    assert recipe.check_choice is registry.check_choice
    assert recipe.check_range is registry.check_range
    assert set(recipe.known_entries()) == set(registry.registered())
    assert {"quantize", "channel_pruning", "lowrank", "dce", "distill"} <= set(recipe.known_entries())
    with pytest.raises(RecipeError, match="field: ratio=2"):
        registry.check_range("ratio", 2, 0.0, 1.0)
    with pytest.raises(TypeError):
        registry.registered()["x"] = object  # read-only view
