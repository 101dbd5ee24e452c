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
import torch.nn.functional as F

from .models import digits_cnn, seeded

__all__ = ["digits_data", "trained_digits_cnn", "accuracy", "batches", "train_epochs"]


@functools.lru_cache(maxsize=1)
def _data():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    g = torch.Generator().manual_seed(0)
    perm = torch.randperm(len(y), generator=g)
    x, y = x[perm], y[perm]
    n_train = 1400
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def digits_data():
    """((x_train, y_train), (x_test, y_test)): 1,400 / 397 images, (N, 1, 8, 8) in [0, 1]."""
    (a, b), (c, d) = _data()
    return (a.clone(), b.clone()), (c.clone(), d.clone())


def batches(x: torch.Tensor, size: int = 50, limit: int | None = None):
    """Calibration-style list of (x_batch,) tuples."""
    out = [(x[i:i + size],) for i in range(0, len(x), size)]
    return out[:limit] if limit else out


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int | None = 50) -> float:
    """Top-1 accuracy; in fixed-size chunks (last one padded) since captured IRs have a static batch."""
    if batch is None:
        return float((model(x).argmax(-1) == y).float().mean())
    preds = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        n = len(xb)
        if n < batch:
            xb = torch.cat([xb, xb[-1:].expand(batch - n, *xb.shape[1:])])
        preds.append(model(xb)[:n].argmax(-1))
    return float((torch.cat(preds) == y).float().mean())


def train_epochs(model, x, y, *, epochs: int, lr: float = 1e-2, batch: int = 64, seed: int = 0,
                 optimizer: str = "adam") -> None:
    """Plain minibatch training in place (the user's own loop, as QAT tests use it)."""
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch + 1, batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()


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
