"""Every Python block of README.md runs as written, in order, in one namespace.

A block that needs more than the fast suite has says so in an HTML comment right above it:
``<!-- readme-test: needs PKG (why); slow -->``. Such a block runs in the slow test (after the
blocks before it), skipped with the package's name when that package is missing; every other
block runs in the fast test. A block cannot be skipped silently: an unmarked block that fails
fails the fast test."""
from __future__ import annotations

import importlib.util
import os
import re
import sys
import types
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[2] / "README.md"
_BLOCK = re.compile(r"(?:<!-- readme-test: (?P<mark>[^>]*?) -->\n)?```python\n(?P<code>.*?)```", re.S)


def _blocks() -> list[tuple[int, str, str | None]]:
    text = README.read_text()
    return [(text[:m.start()].count("\n") + 1, m.group("code"), m.group("mark"))
            for m in _BLOCK.finditer(text)]


def _needs(mark: str | None) -> list[str]:
    return re.findall(r"needs (\w+)", mark or "")


def _run(blocks, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # blocks write files (recipe.yaml, *.fxp, *.onnx)
    module = types.ModuleType("__readme__")  # a real module: dataclasses look their class up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    ns = module.__dict__
    for line, code, _ in blocks:
        try:
            exec(compile(code, f"README.md:{line}", "exec"), ns)
        except Exception as e:  # name the block: the traceback's file is README.md:<line>
            raise AssertionError(f"README.md block at line {line} failed: {type(e).__name__}: {e}") from e


def test_readme_has_python_blocks_and_marks_name_their_needs():
    blocks = _blocks()
    assert len(blocks) >= 4
    for line, _, mark in blocks:
        if mark is not None:
            assert _needs(mark) and "slow" in mark, f"README.md:{line}: a mark names needs and 'slow'"


def test_readme_fast_blocks_run(tmp_path, monkeypatch):
    monkeypatch.setenv("FXPRESS_PROGRESS", os.environ.get("FXPRESS_PROGRESS", "0"))  # undone after
    _run([b for b in _blocks() if b[2] is None], tmp_path, monkeypatch)
    assert (tmp_path / "recipe.yaml").exists() and (tmp_path / "tour_int8.onnx").exists()


@pytest.mark.slow
def test_readme_every_block_runs(tmp_path, monkeypatch):
    blocks = _blocks()
    for pkg in {p for _, _, mark in blocks for p in _needs(mark)}:
        if importlib.util.find_spec(pkg) is None:
            pytest.skip(f"README block needs {pkg}, not installed")
    _run(blocks, tmp_path, monkeypatch)
    assert (tmp_path / "minilm_int8.onnx").exists()
