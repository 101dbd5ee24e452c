"""Small helpers shared across the package: atomic writes, input normalisation."""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = ["atomic_write_text", "atomic_write", "as_input_tuple", "iter_batches", "split_labels",
           "quiet_torch"]


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)`` then rename onto `path`: readers never see a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        if os.path.isfile(tmp):  # mkstemp makes it 0600: give it the mode open() would
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_folder(path: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Write a folder atomically: `fill(tmp)` writes into a temporary sibling, which then replaces
    `path` (nothing stale kept; on an error nothing of `path` changes)."""
    import shutil

    from .errors import InputError
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder", input_name="path")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        fill(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


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
    return (inputs,)  # a dict is one batch of keyword inputs (model(**enc)): the IR takes it whole


def split_labels(batch: Any, n_inputs: int | None) -> tuple[tuple, Any]:
    """(inputs, labels): a batch of ``n_inputs + 1`` items whose last is an integer tensor carries
    labels (a DataLoader's (x, y) pairs); anything else is all inputs."""
    b = as_input_tuple(batch)
    last = b[-1] if b else None
    is_label = isinstance(last, torch.Tensor) and not last.is_floating_point() \
        and not last.is_complex() and last.dtype != torch.bool
    if len(b) >= 2 and is_label and (n_inputs is None or len(b) == n_inputs + 1):
        return b[:-1], last
    return b, None


def iter_batches(batches: Iterable | None, n_inputs: int | None = None) -> Iterable[tuple]:
    """Iterate any iterable of batches as input tuples. With `n_inputs`, a trailing integer
    label tensor (DataLoader (x, y) pairs) is dropped."""
    if batches is None:
        return
    for b in batches:
        yield split_labels(b, n_inputs)[0] if n_inputs is not None else as_input_tuple(b)


# torch's notes about its own internals that reach a user through fxpress's calls (pytree
# deprecations, the quantized-tensor API notice, the ONNX exporter's registry): none of them is
# something the user wrote or can act on
_TORCH_NOISE = (r".*isinstance\(treespec, LeafSpec\).*", r".*quantized tensor creation functions.*",
                r".*To copy construct from a tensor.*", r".*TypedStorage is deprecated.*")
_TORCH_LOGGERS = ("torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core",
                  "torch._export", "torch.export",
                  # the exporter's optimizer: "Evaluation failed: cannot reshape ..." where a
                  # constant fold it tries does not apply (the graph is exported unfolded there)
                  "onnxscript.optimizer._constant_folding",
                  # importing transformers (a model load inside our call) pulls in torchao, which
                  # logs its missing CUDA kernels and registers pytree constants torch warns about
                  "torchao", "torchao.kernel.intmm", "torch.utils._pytree")


@contextlib.contextmanager
def quiet_torch():
    """Silence torch's deprecation chatter and exporter log lines for the duration of one of
    *our* calls into torch (compress, lower, save, load): scoped, never global. fxpress's own
    warnings, and the user's, still show."""
    loggers = [logging.getLogger(n) for n in _TORCH_LOGGERS]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch(\.|$)")
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch(\.|$)")
        for msg in _TORCH_NOISE:
            warnings.filterwarnings("ignore", message=msg)
        for lg in loggers:
            lg.setLevel(max(lg.level, logging.ERROR))
        try:
            yield
        finally:
            for lg, lv in zip(loggers, levels):
                lg.setLevel(lv)
