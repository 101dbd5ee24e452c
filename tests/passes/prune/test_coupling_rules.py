"""Coupling rules for the op forms unseen HF families use: a matmul against a weight (Falcon's
``x @ W.T``), index into a table (rotary positions), stack (Mamba, GPT-J), repeat_interleave
(GPT-J's rotary), reshape_as (LeViT), baddbmm (BLOOM); gather is kept whole with its reason."""
from __future__ import annotations

import torch
from torch import nn

import fxpress
from fxpress.passes.analysis.dependency import analyze

from ._util import plan_and_prune, zeroed_copy


class _Coupled(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.w1 = nn.Parameter(torch.randn(32, 16) / 4)   # used as x @ w1.T (no nn.Linear)
        self.rep = nn.Linear(16, 16)
        self.register_buffer("table", torch.randn(10, 32))
        self.out = nn.Linear(32, 8)
        self.bias = nn.Parameter(torch.randn(32))

    def forward(self, x, pos):
        h = x @ self.w1.t()                                   # matmul with a weight
        h = h * self.table[pos]                               # index (one index tensor)
        h = h + self.rep(x).repeat_interleave(2, dim=-1)      # repeat_interleave
        h = torch.stack([h, torch.relu(h)], 0).sum(0)         # stack
        h = (h + self.bias).reshape_as(h)                     # reshape_as
        return self.out(h)


class _Gathered(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x, idx):
        return self.b(torch.gather(self.a(x), 1, idx))


def _inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, 16, generator=g), torch.randint(0, 10, (2, 5), generator=g)


def test_unseen_forms_couple_and_prune_exactly():
    x, pos = _inputs()
    gm = fxpress.capture(_Coupled().eval(), (x, pos))
    dep = analyze(gm)
    assert dep.unresolved == [], dep.unresolved
    assert any("w1" in str(g) for g in dep.groups), str(dep)  # the matmul's weight is a layer
    ref = gm(x, pos)
    dep, pruned = plan_and_prune(gm, (x, pos), 0.5)
    assert pruned.sum() > 0
    assert gm.w1.shape[0] < 32 and gm.rep.weight.shape[0] < 16 and gm.table.shape[1] == gm.w1.shape[0]
    # the pruned graph computes what the unpruned one does with those channels zeroed
    z = zeroed_copy(fxpress.capture(_Coupled().eval(), (x, pos)), dep, pruned)
    torch.testing.assert_close(gm(x, pos), z(x, pos), rtol=1e-5, atol=1e-5)
    assert ref.shape == gm(x, pos).shape


def test_baddbmm_couples_like_matmul():
    class _B(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.q, self.k, self.o = nn.Linear(8, 16), nn.Linear(8, 16), nn.Linear(5, 4)

        def forward(self, x, alibi):
            s = torch.baddbmm(alibi, self.q(x), self.k(x).transpose(1, 2))
            return self.o(s)
    x, alibi = torch.randn(2, 5, 8), torch.randn(2, 1, 5)
    gm = fxpress.capture(_B().eval(), (x, alibi))
    dep = analyze(gm)
    assert dep.unresolved == []
    assert any("q.out" in g.name for g in dep.groups), str(dep)
    dep, pruned = plan_and_prune(gm, (x, alibi), 0.5)
    assert gm.q.weight.shape[0] == gm.k.weight.shape[0] < 16
    z = zeroed_copy(fxpress.capture(_B().eval(), (x, alibi)), dep, pruned)
    torch.testing.assert_close(gm(x, alibi), z(x, alibi), rtol=1e-5, atol=1e-5)


def test_gather_is_kept_whole_with_its_reason():
    x, idx = torch.randn(2, 8), torch.randint(0, 16, (2, 16))
    gm = fxpress.capture(_Gathered().eval(), (x, idx))
    dep = analyze(gm)
    assert dep.unresolved == []
    assert any(k.startswith("gather reads data-chosen positions") for k in dep.unprunable), dep.unprunable
