"""Tucker-2 and CP factorization of conv2d: exactness on low-rank kernels, error vs rank, skips."""
import pytest
import torch

import fxpress
from fxpress.passes.factorize.common import one_thread
from fxpress.passes.factorize.cp import cp_als
from fxpress.passes.factorize.tucker import tucker2

from ._util import aten, apply, capture, check_records, ops


class Conv(torch.nn.Module):
    def __init__(self, w, stride=1, padding=0, dilation=1, groups=1, bias=True):
        super().__init__()
        o, i, kh, kw = w.shape
        self.conv = torch.nn.Conv2d(i * groups, o, (kh, kw), stride, padding, dilation, groups, bias=bias)
        with torch.no_grad():
            self.conv.weight.copy_(w)

    def forward(self, x):
        return torch.relu(self.conv(x))


def tucker_weight(o, i, kh, kw, r_out, r_in, seed=0):
    g = torch.Generator().manual_seed(seed)
    core = torch.randn(r_out, r_in, kh, kw, generator=g)
    return torch.einsum("rskl,or,is->oikl", core, torch.randn(o, r_out, generator=g), torch.randn(i, r_in, generator=g)) / 4


def cp_weight(o, i, kh, kw, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.einsum("or,ir,kr,lr->oikl", *(torch.randn(d, r, generator=g) for d in (o, i, kh, kw))) / r


def test_tucker_exact_on_tucker_kernel():
    w = tucker_weight(24, 16, 3, 3, 5, 4)
    m, x = Conv(w, stride=2, padding=1, dilation=1), torch.randn(2, 16, 12, 12)
    gm = capture(m, x)
    out, st = apply(gm, fxpress.LowRank(method="tucker", rank=(5, 4)), (x,))
    layer = st["layers"]["conv"]
    assert layer["rank"] == (5, 4) and layer["rel_error"] < 1e-5
    assert ops(out)[aten.conv2d.default] == 3
    p = dict(out.named_parameters())
    assert p["conv.lowrank_in"].shape == (4, 16, 1, 1) and p["conv.lowrank_core"].shape == (5, 4, 3, 3)
    assert p["conv.lowrank_out"].shape == (24, 5, 1, 1) and "conv.weight" not in p
    check_records(out, "tucker", "conv", 3)
    assert out(x).shape == gm(x).shape
    torch.testing.assert_close(out(x), gm(x), rtol=1e-4, atol=1e-4)


def test_cp_exact_on_cp_kernel_with_stride_padding_dilation():
    w = cp_weight(16, 12, 3, 5, 6)
    m, x = Conv(w, stride=(2, 1), padding=(1, 2), dilation=(1, 2)), torch.randn(2, 12, 11, 13)
    gm = capture(m, x)
    out, st = apply(gm, fxpress.LowRank(method="cp", rank=6), (x,))
    assert st["layers"]["conv"]["rel_error"] < 1e-5, st
    convs = [n for n in out.graph.nodes if n.target is aten.conv2d.default]
    assert len(convs) == 4
    assert [n.args[6] for n in convs] == [1, 6, 6, 1]  # two depthwise convs between two 1x1 convs
    assert [tuple(n.args[1].meta["val"].shape) for n in convs] == [(6, 12, 1, 1), (6, 1, 3, 1), (6, 1, 1, 5), (16, 6, 1, 1)]
    check_records(out, "cp", "conv", 4)
    torch.testing.assert_close(out(x), gm(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,ranks", [("tucker", [(2, 2), (4, 4), (8, 8), (12, 12)]),
                                          ("cp", [2, 6, 12, 24])])
def test_error_falls_as_rank_grows(method, ranks):
    m, x = Conv(torch.randn(32, 16, 3, 3)), torch.randn(1, 16, 8, 8)
    gm = capture(m, x)
    errs = []
    for r in ranks:
        out, st = apply(gm, fxpress.LowRank(method=method, rank=r, cp_iters=60), (x,))
        errs.append(st["layers"]["conv"]["rel_error"])
        assert out(x).shape == gm(x).shape
    assert all(a > b for a, b in zip(errs, errs[1:])), errs


def test_budget_halves_macs_and_vbmf_finds_tucker_ranks():
    g = torch.Generator().manual_seed(0)
    w = tucker_weight(48, 32, 3, 3, 6, 5) + 0.002 * torch.randn(48, 32, 3, 3, generator=g)
    m, x = Conv(w, padding=1), torch.randn(1, 32, 8, 8)
    gm = capture(m, x)
    for method in ("tucker", "cp"):
        _, st = apply(gm, fxpress.LowRank(method=method, budget=0.5), (x,))
        before, after = st["layers"]["conv"]["macs"]
        assert 0.4 * before < after <= 0.5 * before, (method, before, after)
    _, st = apply(gm, fxpress.LowRank(method="tucker", vbmf=True), (x,))
    assert st["layers"]["conv"]["rank"] == (6, 5)


def test_unsupported_layers_are_skipped_with_reasons():
    x = torch.randn(1, 16, 8, 8)
    grouped = capture(Conv(torch.randn(16, 4, 3, 3), groups=4), x)
    pointwise = capture(Conv(torch.randn(32, 16, 1, 1)), x)
    big = capture(Conv(torch.randn(32, 16, 3, 3)), x)
    wide = capture(Conv(torch.randn(128, 16, 5, 5)), x)
    cases = [(grouped, fxpress.LowRank(method="cp", rank=4), "grouped conv (groups=4)"),
             (grouped, fxpress.LowRank(method="tucker", rank=2), "grouped conv (groups=4)"),
             (pointwise, fxpress.LowRank(method="cp", rank=4), "1x1 conv"),
             (big, fxpress.LowRank(method="tucker", rank=(40, 8)), "larger than the weight allows"),
             (big, fxpress.LowRank(method="cp", rank=200), "larger than the weight allows"),
             (wide, fxpress.LowRank(method="cp", rank=64, max_memory_mb=1), "working set"),
             (big, fxpress.LowRank(method="tucker", rank=(30, 16)), "not cheaper")]
    for gm, cfg, why in cases:
        out, st = apply(gm, cfg, (x,))
        assert st["factorized"] == 0 and why in st["skipped"][0], (cfg, st["skipped"])
        assert ops(out) == ops(gm)


def test_tucker_matches_tensorly_partial_tucker():
    tl = pytest.importorskip("tensorly")
    from tensorly.decomposition import partial_tucker
    tl.set_backend("pytorch")
    w = torch.randn(32, 24, 3, 3, dtype=torch.float64)
    core, u_out, u_in = tucker2(w, 8, 6)
    ours = torch.linalg.norm(w - torch.einsum("rskl,or,is->oikl", core, u_out, u_in)) / torch.linalg.norm(w)
    with one_thread():
        (tcore, factors), _ = partial_tucker(w, rank=[8, 6], modes=[0, 1], n_iter_max=20, init="svd")
    theirs = torch.linalg.norm(w - torch.einsum("rskl,or,is->oikl", tcore, *factors)) / torch.linalg.norm(w)
    assert float(ours) <= float(theirs) * (1 + 1e-4), (float(ours), float(theirs))


def test_cp_als_is_deterministic_and_stable():
    w = torch.randn(16, 8, 3, 3)
    (f1, e1), (f2, e2) = cp_als(w, 10, iters=60), cp_als(w, 10, iters=60)
    assert e1 == e2 and all(torch.equal(a, b) for a, b in zip(f1, f2))
    assert all(torch.isfinite(a).all() for a in f1) and 0 < e1 < 1
