"""A DigitsCNN trained on sklearn's real 8x8 digits, cached per test session (a few seconds).

    from tests.digits import trained_digits_cnn, digits_data, accuracy
    model = trained_digits_cnn()              # eval mode; train a copy if you change it
    (xtr, ytr), (xte, yte) = digits_data()
    accuracy(model, xte, yte)                 # ~0.98

Fixed seeds and a fixed split: every engineer's tests see the same model and numbers.
"""
from __future__ import annotations

import copy
import functools

import torch

import fxpress.examples as _examples

from .models import digits_cnn, seeded

__all__ = ["digits_data", "trained_digits_cnn", "accuracy", "batches", "train_epochs"]


def _data():
    return _examples._data()


def digits_data():
    """((x_train, y_train), (x_test, y_test)): 1,400 / 397 images, (N, 1, 8, 8) in [0, 1]."""
    return _examples.digits_data()


def batches(x: torch.Tensor, size: int = 50, limit: int | None = None):
    """Calibration-style list of (x_batch,) tuples."""
    out = [(x[i:i + size],) for i in range(0, len(x), size)]
    return out[:limit] if limit else out


accuracy = _examples.accuracy  # top-1 in fixed-size chunks (captured IRs have a static batch)


def train_epochs(model, x, y, *, epochs: int, lr: float = 1e-2, batch: int = 64, seed: int = 0,
                 optimizer: str = "adam") -> None:
    """Plain minibatch training in place (the user's own loop, as QAT tests use it)."""
    _examples.train_epochs(model, x, y, epochs=epochs, lr=lr, batch=batch, seed=seed,
                           optimizer=optimizer)


@functools.lru_cache(maxsize=1)
def _trained():
    (xtr, ytr), _ = _data()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a net this small only loses to thread hand-offs on a busy box
    try:
        with seeded(0):
            model = digits_cnn(width=16, seed=0)
            train_epochs(model, xtr, ytr, epochs=6, lr=3e-3)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def trained_digits_cnn():
    """A fresh copy of the session's trained DigitsCNN (eval mode); ~98% test accuracy."""
    return copy.deepcopy(_trained())
