"""Least-squares refit of the 1x1 convs that read pruned channels (passes/prune/reconstruct.py)."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import RecipeError
from fxpress.passes.prune.reconstruct import reconstruct


class _Twin(torch.nn.Module):
    """conv1's channels 4-7 are 0.5x channels 0-3 (relu is positively homogeneous): what pruning
    removes is an exact linear function of what it keeps."""

    def __init__(self, bn: bool):
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        with torch.no_grad():
            self.conv1.weight[4:] = 0.5 * self.conv1.weight[:4]
            self.conv1.bias[4:] = 0.5 * self.conv1.bias[:4]
        self.conv2 = torch.nn.Conv2d(8, 6, 1, bias=not bn)
        self.bn = torch.nn.BatchNorm2d(6) if bn else torch.nn.Identity()
        if bn:
            with torch.no_grad():
                self.bn.running_mean.uniform_(-1, 1)
                self.bn.running_var.uniform_(0.5, 2)

    def forward(self, x):
        return self.bn(self.conv2(torch.relu(self.conv1(x))))


def _pruned(model, x):
    return fxpress.compress(model, (x[:1],), fxpress.ChannelPruning(ratio=0.5, importance="l2",
                                                                    scope="local", round_to=1))


@pytest.mark.parametrize("bn", [False, True])
def test_refit_recovers_exactly_what_a_linear_fit_can(bn):
    model = _Twin(bn).eval()
    x = torch.randn(64, 3, 8, 8)
    cm = _pruned(model, x)
    assert dict(cm.graph_module.named_parameters())["conv1.weight"].shape[0] == 4   # the twins went
    with torch.no_grad():
        ref, before = model(x), cm(x)
    rel = lambda a: float((a - ref).pow(2).sum() / (ref - ref.mean()).pow(2).sum())
    assert rel(before) > 0.005                 # pruning alone is lossy (measured 0.046, bn: 0.010)
    st = reconstruct(cm.graph_module, model, [(x[i:i + 16],) for i in range(0, 64, 16)], ["conv2"],
                     ridge=1e-9)  # (the default 1e-3 shrinks: held-out error ~1e-3)
    with torch.no_grad():
        after = cm(x)
    assert st["conv2"]["err_before"] > 0.005 and st["conv2"]["err_after"] < 1e-6, st
    assert rel(after) < 1e-6, rel(after)                                     # measured ~1e-13
    # held-out inputs too: the fit is the exact map, not a fit to the batches
    x2 = torch.randn(8, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(cm(x2), model(x2), rtol=1e-4, atol=1e-4)
    assert model.conv1.weight.shape[0] == 8                                  # the teacher untouched


def test_refit_rejects_what_it_cannot_fit():
    model = _Twin(False).eval()
    x = torch.randn(8, 3, 8, 8)
    cm = _pruned(model, x)
    with pytest.raises(RecipeError, match="not a 1x1 conv"):
        reconstruct(cm.graph_module, model, [(x,)], ["conv1"])
    with pytest.raises(RecipeError, match="no conv2d of module 'nope'"):
        reconstruct(cm.graph_module, model, [(x,)], ["nope"])
    from fxpress.errors import CalibrationError
    with pytest.raises(CalibrationError):
        reconstruct(cm.graph_module, model, [], ["conv2"])
