"""Small helpers shared across the package: atomic writes, input normalisation."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = ["atomic_write_text", "atomic_write", "as_input_tuple", "iter_batches"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto `path`: readers never see a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def as_input_tuple(inputs: Any) -> tuple:
    """A single tensor becomes a 1-tuple; lists become tuples."""
    if isinstance(inputs, torch.Tensor):
        return (inputs,)
    if isinstance(inputs, list):
        return tuple(inputs)
    if isinstance(inputs, tuple):
        return inputs
    if isinstance(inputs, dict):
        raise TypeError("pass keyword inputs as example_kwargs, not a dict of example inputs")
    return (inputs,)


def iter_batches(batches: Iterable | None) -> Iterable[tuple]:
    """Iterate any iterable of batches as input tuples (DataLoader (x, y) pairs included)."""
    if batches is None:
        return
    for b in batches:
        yield as_input_tuple(b)
