"""Static int8 on real labels: a small CNN trained here on Fashion-MNIST (Debian's
dataset-fashion-mnist), scored on the 10k test images, fp32 vs fxpress int8 (IR and ORT)."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from fxpress.examples import accuracy, train_epochs
from fxpress.real import FASHION_MNIST_DIR, fashion_mnist

pytestmark = pytest.mark.skipif(not (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
                                reason=f"Fashion-MNIST not installed at {FASHION_MNIST_DIR} "
                                       "(apt install dataset-fashion-mnist)")


class FashionCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32 * 7 * 7, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
        x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
        return self.fc(torch.flatten(x, 1))


@pytest.fixture(scope="module")
def trained():
    xtr, ytr = fashion_mnist("train")
    xte, yte = fashion_mnist("t10k")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = FashionCNN()
        train_epochs(model, xtr[:12000], ytr[:12000], epochs=1, batch=128)
    calib = [(xtr[30000 + i:30000 + i + 64],) for i in range(0, 256, 64)]
    cm = fxpress.compress(model, (xte[:100],), fxpress.Quantize(mode="static"), calibration=calib)
    return model, cm, xte, yte


def test_data_shape():
    x, y = fashion_mnist("t10k")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,) and 0 <= float(x.min()) < float(x.max()) <= 1
    assert sorted(y.unique().tolist()) == list(range(10))


def test_static_int8_within_half_a_point(trained):
    """fp32 learns the task (> 80 % in one short epoch); int8 IR within 0.5 pt on all 10k."""
    model, cm, xte, yte = trained
    fp32 = accuracy(model, xte, yte, batch=500)
    int8 = accuracy(cm, xte, yte, batch=500)
    assert fp32 > 0.80, fp32
    assert abs(fp32 - int8) <= 0.005, (fp32, int8)


def test_static_int8_on_ort(trained):
    """The ORT lowering (QLinearConv kernels) scores the same 10k within 0.5 pt of fp32."""
    pytest.importorskip("onnxruntime")
    model, cm, xte, yte = trained
    run = fxpress.lower(cm, backend="onnxruntime", example_inputs=(xte[:500],))
    assert run.report["kernels"].get("QLinearConv", 0) == 2
    fp32 = accuracy(model, xte, yte, batch=500)
    assert abs(fp32 - accuracy(run, xte, yte, batch=500)) <= 0.005
