"""Tensor-train factorization of linear: exact on TT weights, error vs rank, lowering shape, skips."""
import math

import torch

import fxpress
from fxpress.passes.factorize.tensor_train import split_dim, tt_macs

from ._util import aten, apply, capture, check_records, ops


class Lin(torch.nn.Module):
    def __init__(self, w):
        super().__init__()
        self.fc = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(w)

    def forward(self, x):
        return torch.tanh(self.fc(x))


def tt_weight(outs, ins, ranks, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = [1, *ranks, 1]
    cores = [torch.randn(r[k], outs[k], ins[k], r[k + 1], generator=g) for k in range(len(outs))]
    t = cores[0]
    for c in cores[1:]:
        t = torch.tensordot(t, c, dims=([t.dim() - 1], [0]))
    d = len(outs)
    t = t.squeeze(0).squeeze(-1).permute([2 * k for k in range(d)] + [2 * k + 1 for k in range(d)])
    return t.reshape(math.prod(outs), math.prod(ins)) / 4


def test_split_dim():
    assert split_dim(384, 3) == (8, 8, 6) and split_dim(64, 2) == (8, 8) and split_dim(13, 2) == (13, 1)


def test_tt_exact_on_tt_weight_with_leading_dims():
    outs, ins = (4, 3, 2), (2, 3, 4)
    w = tt_weight(outs, ins, (2, 3))
    m, x = Lin(w), torch.randn(2, 5, 24)  # (batch, tokens, features): leading dims kept
    gm = capture(m, x)
    out, st = apply(gm, fxpress.LowRank(method="tt", rank=(2, 3), tt_shape=(outs, ins)), (x,))
    layer = st["layers"]["fc"]
    assert layer["rank"] == (2, 3) and layer["rel_error"] < 1e-5
    c = ops(out)
    assert c[aten.mm.default] == 3 and c[aten.linear.default] == 0 and c[aten.add.Tensor] == 1
    assert set(c) - {aten.mm.default, aten.reshape.default, aten.permute.default, aten.add.Tensor,
                     aten.tanh.default} == set()
    assert layer["macs"][1] == tt_macs(10, outs, ins, (2, 3))
    check_records(out, "tt", "fc", 3)
    assert out(x).shape == gm(x).shape
    torch.testing.assert_close(out(x), gm(x), rtol=1e-4, atol=1e-4)


def test_error_falls_as_rank_grows_and_energy_budget():
    m, x = Lin(torch.randn(64, 64)), torch.randn(4, 64)
    gm = capture(m, x)
    errs = []
    for r in (1, 2, 3):  # rank 4 needs more MACs than the 64x64 dense
        out, st = apply(gm, fxpress.LowRank(method="tt", rank=r, tt_order=3), (x,))
        errs.append(st["layers"]["fc"]["rel_error"])
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    _, st = apply(gm, fxpress.LowRank(method="tt", tt_order=2, budget=0.5), (x,))
    before, after = st["layers"]["fc"]["macs"]
    assert after <= before / 2
    w = tt_weight((4, 4, 4), (4, 4, 4), (2, 2))
    _, st = apply(capture(Lin(w), x), fxpress.LowRank(method="tt", energy=0.999), (x,))
    assert st["layers"]["fc"]["rank"] == (2, 2)


def test_skips_with_reasons():
    x = torch.randn(2, 13)
    prime = capture(Lin(torch.randn(7, 13)), x)
    _, st = apply(prime, fxpress.LowRank(method="tt", rank=2), (x,))
    assert "too few prime factors" in st["skipped"][0]
    x = torch.randn(2, 64)
    gm = capture(Lin(torch.randn(64, 64)), x)
    for cfg, why in ((fxpress.LowRank(method="tt", rank=100), "larger than the TT bonds allow"),
                     (fxpress.LowRank(method="tt", tt_shape=((8, 4), (8, 8)), rank=2), "does not multiply"),
                     (fxpress.LowRank(method="tt", tt_order=2, rank=60), "not cheaper")):
        out, st = apply(gm, cfg, (x,))
        assert st["factorized"] == 0 and why in st["skipped"][0], st["skipped"]


def test_verify_speed_rejects_a_chain_of_tiny_ops():
    # fewer MACs on paper, but 17 tiny ops lose to one small matmul when measured
    x = torch.randn(1, 64)
    _, st = apply(capture(Lin(torch.randn(64, 64)), x),
                  fxpress.LowRank(method="tt", rank=2, verify_speed=True), (x,))
    assert st["factorized"] == 0 and "not faster" in st["skipped"][0], st
