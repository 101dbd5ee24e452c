"""Example workloads on real data with no download, used by `fxpress demo` and the tests.

    model = trained_digits_cnn()                    # trains once (seconds), then loads from cache
    (xtr, ytr), (xte, yte) = digits_data()           # sklearn's 1,797 real 8x8 digit images
    accuracy(model, xte, yte)                        # ~0.98
"""
from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils import atomic_write

__all__ = ["DigitsCNN", "digits_data", "train_epochs", "accuracy", "trained_digits_cnn", "cache_dir"]


def cache_dir() -> Path:
    """$FXPRESS_CACHE, else $XDG_CACHE_HOME/fxpress, else ~/.cache/fxpress."""
    root = os.environ.get("FXPRESS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "fxpress")
    return Path(root)


class DigitsCNN(nn.Module):
    """A small CNN for sklearn's 8x8 digits: (N, 1, 8, 8) -> 10 logits."""

    def __init__(self, width: int = 16, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * 4 * 4, 64)
        self.fc2 = nn.Linear(64, num_classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(torch.relu(self.bn2(self.conv2(x))))
        return self.fc2(torch.relu(self.fc1(torch.flatten(x, 1))))


@functools.lru_cache(maxsize=1)
def _data():
    from sklearn.datasets import load_digits
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[perm], y[perm]
    return (x[:1400], y[:1400]), (x[1400:], y[1400:])


def digits_data():
    """((x_train, y_train), (x_test, y_test)): 1,400 / 397 images, (N, 1, 8, 8) in [0, 1]."""
    (a, b), (c, d) = _data()
    return (a.clone(), b.clone()), (c.clone(), d.clone())


def train_epochs(model: nn.Module, x, y, *, epochs: int, lr: float = 3e-3, batch: int = 64,
                 seed: int = 0, progress: bool = False, optimizer: str = "adam") -> nn.Module:
    """Plain minibatch training (Adam, or SGD with momentum 0.9) in place; returns the model in
    eval mode."""
    opt = (torch.optim.Adam(model.parameters(), lr=lr) if optimizer == "adam"
           else torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9))
    g = torch.Generator().manual_seed(seed)
    model.train()
    it = range(epochs)
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc="train digits", unit="epoch", leave=False)
    for _ in it:
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y) - batch + 1, batch):
            idx = perm[i:i + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model, x: torch.Tensor, y: torch.Tensor, batch: int = 50) -> float:
    """Top-1 accuracy in fixed-size chunks (the last padded): captured IRs have a static batch."""
    preds = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        n = len(xb)
        if n < batch:
            xb = torch.cat([xb, xb[-1:].expand(batch - n, *xb.shape[1:])])
        preds.append(model(xb)[:n].argmax(-1))
    return float((torch.cat(preds) == y).float().mean())


def trained_digits_cnn(width: int = 16, epochs: int = 8, *, use_cache: bool = True,
                       progress: bool = False) -> DigitsCNN:
    """The DigitsCNN trained on the fixed split (seed 0), loaded from the cache when present."""
    path = cache_dir() / f"digits_cnn_w{width}_e{epochs}.pt"
    model = DigitsCNN(width)
    if use_cache and path.is_file():
        try:
            model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            return model.eval()
        except Exception:  # a stale or corrupt cache file: retrain and overwrite it
            pass
    (xtr, ytr), _ = _data()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = DigitsCNN(width)
        train_epochs(model, xtr, ytr, epochs=epochs, progress=progress)
    if use_cache:
        sd = copy.deepcopy(model.state_dict())
        atomic_write(path, lambda tmp: torch.save(sd, tmp))
    return model.eval()
