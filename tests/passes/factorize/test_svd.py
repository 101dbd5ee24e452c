"""SVD factorization of linear and constant-weight matmul: exactness, error vs rank, whitening, skips."""
import pytest
import torch

import fxpress
from fxpress.errors import CalibrationError, PassError

from ._util import aten, apply, capture, check_records, ops


class Lin(torch.nn.Module):
    def __init__(self, w: torch.Tensor, mm_w: torch.Tensor | None = None):
        super().__init__()
        self.fc = torch.nn.Linear(w.shape[1], w.shape[0])
        with torch.no_grad():
            self.fc.weight.copy_(w)
        self.proj = torch.nn.Parameter(mm_w) if mm_w is not None else None

    def forward(self, x):
        y = self.fc(x)
        if self.proj is not None:
            y = y @ self.proj                 # matmul with a constant weight: factorized
            y = y + (y @ y.transpose(-1, -2)).sum(-1, keepdim=True)  # activation matmul: left alone
        return y


def low_rank(out_f, in_f, r, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_f, r, generator=g) @ torch.randn(r, in_f, generator=g) / r


def test_exact_low_rank_linear_and_matmul():
    w, p = low_rank(32, 48, 5), low_rank(32, 24, 3, seed=1)
    m, x = Lin(w, p), torch.randn(2, 7, 48)
    gm = capture(m, x)
    before = ops(gm)
    out, st = apply(gm, fxpress.LowRank(method="svd", energy=1.0), (x,))
    assert st["factorized"] == 2 and st["skipped"] == []
    assert st["layers"]["fc"]["rank"] == (5,)
    assert sorted(v["rank"] for v in st["layers"].values()) == [(3,), (5,)]
    assert all(v["rel_error"] < 1e-5 for v in st["layers"].values())
    # structure: the linear became two, the constant matmul became two, the activation matmul stayed
    after = ops(out)
    assert after[aten.linear.default] == before[aten.linear.default] + 1
    assert after[aten.matmul.default] == before[aten.matmul.default] + 1
    params = dict(out.named_parameters())
    assert params["fc.lowrank_v"].shape == (5, 48) and params["fc.lowrank_u"].shape == (32, 5)
    assert params["proj_lowrank_v"].shape == (32, 3) and params["proj_lowrank_u"].shape == (3, 24)
    assert "fc.weight" not in params and "proj" not in params and "fc.bias" in params
    check_records(out, "svd", "fc", 2)
    y0, y1 = gm(x), out(x)
    assert y1.shape == y0.shape
    torch.testing.assert_close(y1, y0, rtol=1e-4, atol=1e-4)


def test_error_falls_as_rank_grows():
    torch.manual_seed(0)
    m, x = Lin(torch.randn(40, 64)), torch.randn(8, 64)
    gm = capture(m, x)
    errs, out_errs = [], []
    for r in (2, 4, 8, 16):
        out, st = apply(gm, fxpress.LowRank(method="svd", rank=r), (x,))
        errs.append(st["layers"]["fc"]["rel_error"])
        out_errs.append(float((out(x) - gm(x)).detach().norm() / gm(x).detach().norm()))
        assert out(x).shape == gm(x).shape
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    assert all(a > b for a, b in zip(out_errs, out_errs[1:])), out_errs


def test_energy_picks_rank_from_spectrum():
    # squared spectrum fractions 0.5, 0.3, 0.15, 0.05 (+ zeros)
    q1, _ = torch.linalg.qr(torch.randn(30, 30, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))
    s = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64).sqrt() * 10
    w = (q1[:, :4] * s) @ q2[:, :4].T
    m, x = Lin(w.float()), torch.randn(4, 40)
    gm = capture(m, x)
    for energy, rank in ((0.45, 1), (0.75, 2), (0.9, 3), (0.97, 4)):
        _, st = apply(gm, fxpress.LowRank(method="svd", energy=energy), (x,))
        assert st["layers"]["fc"]["rank"] == (rank,), (energy, st)


def test_budget_and_vbmf():
    g = torch.Generator().manual_seed(3)
    w = low_rank(60, 80, 6) + 0.01 * torch.randn(60, 80, generator=g)
    m, x = Lin(w), torch.randn(4, 80)
    gm = capture(m, x)
    _, st = apply(gm, fxpress.LowRank(method="svd", budget=0.5), (x,))
    macs0, macs1 = st["layers"]["fc"]["macs"]
    assert st["layers"]["fc"]["rank"] == ((60 * 80 // 2) // 140,) and macs1 <= macs0 / 2
    _, st = apply(gm, fxpress.LowRank(method="svd", vbmf=True), (x,))
    assert st["layers"]["fc"]["rank"] == (6,)  # EVBMF separates the 6 signal directions from noise


def test_whitening_lowers_output_error_at_same_rank():
    g = torch.Generator().manual_seed(0)
    # inputs with a strongly uneven covariance: a few directions carry most of the signal
    mix = torch.randn(64, 64, generator=g) * torch.logspace(0, -2, 64)[:, None]
    data = [(torch.randn(32, 64, generator=g) @ mix,) for _ in range(8)]
    held_out = [torch.randn(32, 64, generator=g) @ mix for _ in range(4)]
    m = Lin(torch.randn(48, 64, generator=g))
    gm = capture(m, data[0][0])
    ref = torch.cat([gm(h) for h in held_out]).detach()
    err = {}
    for whiten in (False, True):
        out, st = apply(gm, fxpress.LowRank(method="svd", rank=8, whiten=whiten), data[0], calibration=data)
        assert st["layers"]["fc"]["rank"] == (8,)
        y = torch.cat([out(h) for h in held_out]).detach()
        err[whiten] = float((y - ref).norm() / ref.norm())
    assert err[True] < 0.7 * err[False], err  # measured 0.44 vs 0.73


def test_whitening_needs_calibration():
    m, x = Lin(torch.randn(8, 16)), torch.randn(2, 16)
    with pytest.raises(PassError) as e:
        apply(capture(m, x), fxpress.LowRank(method="svd", rank=2, whiten=True), (x,))
    assert isinstance(e.value.cause, CalibrationError)


def test_skips_with_reasons():
    m, x = Lin(torch.randn(32, 48)), torch.randn(2, 48)
    gm = capture(m, x)
    for rank, why in ((40, "larger than the matrix allows"), (30, "not cheaper")):
        out, st = apply(gm, fxpress.LowRank(method="svd", rank=rank), (x,))
        assert st["factorized"] == 0 and len(st["skipped"]) == 1
        assert st["skipped"][0].startswith("fc: ") and why in st["skipped"][0], st["skipped"]
        assert ops(out) == ops(gm)


def test_compress_report_and_user_model_untouched():
    m, x = Lin(low_rank(32, 48, 4)), torch.randn(3, 48)
    w0 = m.fc.weight.detach().clone()
    cm = fxpress.compress(m, (x,), fxpress.LowRank(method="svd", energy=0.95))
    assert torch.equal(m.fc.weight, w0)
    assert cm.report["lowrank_svd"]["layers"]["fc"]["rank"] == (4,)
    assert "fc" in cm.report.sections["lowrank"]["svd"]["layers"]
    torch.testing.assert_close(cm(x), m(x), rtol=1e-4, atol=1e-4)


def test_verify_speed_keeps_a_measured_win():
    m, x = Lin(low_rank(1024, 1024, 8)), torch.randn(64, 1024)
    _, st = apply(capture(m, x), fxpress.LowRank(method="svd", rank=8, verify_speed=True), (x,))
    assert st["factorized"] == 1, st["skipped"]  # 64x fewer MACs: measurably faster
