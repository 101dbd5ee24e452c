"""Small models and reference quantized IRs (torchao PT2E, the contract's form) for backend tests."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from bench.peers import pt2e_quantize

__all__ = ["TinyResNet", "TinyMLP", "quantized", "batches"]


class TinyResNet(nn.Module):
    """conv-bn-relu, a residual block (conv -> add -> relu), maxpool, global avgpool, fc."""

    def __init__(self, c: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.bn = nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.stem(x))), 2)
        y = F.relu(self.conv1(x))
        x = F.relu(self.conv2(y) + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class TinyMLP(nn.Module):
    """Two linears over (batch, tokens, features): the transformer FFN shape."""

    def __init__(self, d: int = 32):
        super().__init__()
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def batches(shape, n: int = 4, seed: int = 0) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*shape, generator=g),) for _ in range(n)]


def quantized(model: nn.Module, shape, *, dynamic: bool = False):
    """(fp32 model, quantized IR, example inputs) with weights of a fixed seed."""
    torch.manual_seed(0)
    model = model.eval()
    data = batches(shape)
    return model, pt2e_quantize(model, data[0], data, dynamic=dynamic), data[0][0]
