"""MagnitudeSparsity: unstructured (local/global) and 2:4 masks in the IR; measured sparse lowering."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxpress
from fxpress.errors import RecipeError
from fxpress.ir.meta import SparsityMask, get_record
from fxpress.passes.prune.magnitude import mask_2_4
from fxpress.passes.prune.semi_structured import csr_crossover, csr_linear


class _MLP(nn.Module):
    def __init__(self, d=256, h=512):
        super().__init__()
        self.fc1 = nn.Linear(d, h)
        self.fc2 = nn.Linear(h, d)
        self.head = nn.Linear(d, 10)
        with torch.no_grad():  # different scales per layer, so global and local thresholds differ
            self.fc2.weight.mul_(4.0)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _masks(cm):
    return {n.name: get_record(n, SparsityMask) for n in cm.graph_module.graph.nodes
            if get_record(n, SparsityMask) is not None}


@pytest.mark.parametrize("scope", ["local", "global"])
def test_unstructured_masks_recorded_and_applied(scope):
    torch.manual_seed(0)
    m = _MLP().eval()
    x = torch.randn(4, 256)
    cm = fxpress.compress(m, (x,), fxpress.MagnitudeSparsity(sparsity=0.7, scope=scope))
    masks = _masks(cm)
    assert len(masks) == 3
    gm = cm.graph_module
    total = sum(r.mask.numel() for r in masks.values())
    zeros = sum(int((~r.mask).sum()) for r in masks.values())
    assert zeros / total == pytest.approx(0.7, abs=0.01)
    for r in masks.values():
        w = gm.get_parameter(r.param)
        assert torch.equal(w == 0, ~r.mask) or bool((w[~r.mask] == 0).all())
        assert r.validate() == []
    dens = {r.param: r.density for r in masks.values()}
    if scope == "local":
        assert all(d == pytest.approx(0.3, abs=0.01) for d in dens.values())
    else:  # the 4x-larger fc2 keeps more of its weights under one global threshold
        assert dens["fc2.weight"] > 0.5 > dens["fc1.weight"]
    # numerics: the graph computes with the masked weights
    ref = torch.relu(x @ gm.fc1.weight.T + gm.fc1.bias)
    ref = torch.relu(ref @ gm.fc2.weight.T + gm.fc2.bias) @ gm.head.weight.T + gm.head.bias
    torch.testing.assert_close(cm(x), ref, atol=1e-4, rtol=1e-4)


def test_2_4_pattern():
    torch.manual_seed(0)
    m = _MLP().eval()
    x = torch.randn(4, 256)
    cm = fxpress.compress(m, (x,), fxpress.MagnitudeSparsity(sparsity=0.5, pattern="2:4"))
    for r in _masks(cm).values():
        groups = r.mask.reshape(-1, 4).sum(-1)
        assert bool((groups == 2).all())
        w = cm.graph_module.get_parameter(r.param)
        kept = w.abs().reshape(-1, 4)
        # the two kept weights are the two largest of each group of 4
        dropped_max = torch.where(r.mask.reshape(-1, 4), torch.zeros_like(kept), kept).max(-1).values
        assert bool((dropped_max == 0).all())
    assert mask_2_4(torch.tensor([[0.1, -3.0, 2.0, 0.5]])).tolist() == [[False, True, True, False]]
    with pytest.raises(RecipeError):
        fxpress.MagnitudeSparsity(sparsity=0.7, pattern="2:4")
    with pytest.raises(RecipeError) as e:
        fxpress.MagnitudeSparsity(sparsity=1.0)
    assert e.value.field == "sparsity"


def test_csr_linear_matches_dense():
    torch.manual_seed(0)
    w = torch.randn(64, 32) * (torch.rand(64, 32) < 0.1)
    x, b = torch.randn(3, 5, 32), torch.randn(64)
    torch.testing.assert_close(csr_linear(x, w.to_sparse_csr(), b), torch.nn.functional.linear(x, w, b))


def test_cpu_lowering_uses_csr_only_where_measured_faster():
    torch.manual_seed(0)
    m = _MLP(d=256, h=512).eval()
    x = torch.randn(1, 256)
    for sparsity in (0.5, 0.99):
        cm = fxpress.compress(m, (x,), fxpress.MagnitudeSparsity(sparsity=sparsity, lower="auto"))
        text = cm.report.sections["sparse_lowering"]
        st = cm.report["lower_sparse"]
        lines = text.splitlines()
        assert len(lines) == 3 and all(("dense kept" in ln) or ("CSR (" in ln) for ln in lines)
        assert all("ms" in ln for ln in lines)  # each decision states its measurement
        n_csr = sum(1 for n in cm.graph_module.graph.nodes if n.target is csr_linear)
        assert n_csr == st["sparse_layers"]
        y_dense = fxpress.compress(m, (x,), fxpress.MagnitudeSparsity(sparsity=sparsity))(x)
        torch.testing.assert_close(cm(x), y_dense, atol=1e-4, rtol=1e-4)
        if sparsity == 0.5:
            assert n_csr == 0, text  # CSR never beats a dense GEMM at half density on CPU


def test_crossover_measurement_is_a_density_or_none():
    d = csr_crossover(256, 256, 1, densities=(0.5, 0.01))
    assert d in (0.5, 0.01, None)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="2:4 semi-structured kernels need CUDA (sm80+)")
def test_2_4_semi_structured_on_cuda():
    torch.manual_seed(0)
    m = _MLP(d=256, h=512).eval().half().cuda()
    x = torch.randn(64, 256, dtype=torch.half, device="cuda")
    dense = fxpress.compress(m, (x,), fxpress.MagnitudeSparsity(pattern="2:4"))
    from fxpress.passes.base import PassContext
    from fxpress.passes.prune.semi_structured import LowerSparse
    gm = dense.graph_module
    y0 = gm(x)
    res = LowerSparse().run(gm, PassContext(example_inputs=(x,), device="cuda"))
    assert res.stats["sparse_layers"] >= 2
    from torch.sparse import SparseSemiStructuredTensor
    assert isinstance(gm.fc1.weight, SparseSemiStructuredTensor)
    torch.testing.assert_close(gm(x), y0, atol=2e-2, rtol=2e-2)
