"""Real data: half the channels of a trained digits CNN removed, a few epochs of fine-tuning, <= 1 pt lost."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import fxpress
from tests.digits import accuracy, batches, digits_data, trained_digits_cnn

_BATCH = 50  # the captured IR has a static batch size


def _finetune(x, y, epochs: int = 3, lr: float = 2e-3):
    def finetune(gm):
        # a plain loop over the IR's own parameters (GraphModule.train() is not supported
        # by exported modules; its batch norms stay in inference form, as captured)
        opt = torch.optim.Adam(gm.parameters(), lr=lr)
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y) - _BATCH + 1, _BATCH):
                idx = perm[i:i + _BATCH]
                loss = F.cross_entropy(gm(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
    return finetune


def test_digits_half_channels_within_one_point():
    model = trained_digits_cnn()
    (xtr, ytr), (xte, yte) = digits_data()
    base = accuracy(model, xte, yte)
    cm = fxpress.compress(model, (xte[:_BATCH],),
                          fxpress.ChannelPruning(ratio=0.5, importance="taylor", scope="local", round_to=1),
                          calibration=batches(xtr, _BATCH, limit=4), finetune=_finetune(xtr, ytr))
    st = cm.report["prune_channels"]
    gm = cm.graph_module
    # 50% of every prunable layer's channels are gone: 16->8, 32->16, 64->32
    assert (gm.conv1.weight.shape[0], gm.conv2.weight.shape[0], gm.fc1.weight.shape[0]) == (8, 16, 32)
    assert st["channels_removed"] == 56
    assert st["macs_after"] < 0.3 * st["macs_before"]
    acc = accuracy(cm, xte, yte)
    assert acc >= base - 0.01, (base, acc)
