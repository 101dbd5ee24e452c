"""Each observer against a range computed by hand; qparams formulas; bad data names the node."""
import pytest
import torch

from fxpress.errors import CalibrationError
from fxpress.ir.meta import QuantSpec
from fxpress.passes.quant.observers import (EntropyObserver, HistogramObserver, MinMaxObserver,
                                            MovingAverageMinMaxObserver, MSEObserver,
                                            PerChannelMinMaxObserver, qparams_from_range)

U8 = QuantSpec(dtype="uint8", symmetric=False)
S8 = QuantSpec(dtype="int8", symmetric=True, narrow_range=True)


def test_minmax_range_over_batches():
    obs = MinMaxObserver(U8, "x")
    obs(torch.tensor([0.5, -1.0, 2.0]))
    obs(torch.tensor([3.0, 0.0]))
    lo, hi = obs.range()
    assert (float(lo), float(hi)) == (-1.0, 3.0)
    scale, zp = obs.qparams()
    # affine uint8: scale = (3 - -1) / 255, zp = 0 - round(-1 / scale) = 64
    assert float(scale) == pytest.approx(4.0 / 255)
    assert int(zp) == 64


def test_moving_average_range_by_hand():
    obs = MovingAverageMinMaxObserver(U8, "x", averaging_constant=0.5)
    obs(torch.tensor([0.0, 2.0]))      # first batch: (0, 2)
    obs(torch.tensor([-2.0, 4.0]))     # (0 + .5 * (-2 - 0), 2 + .5 * (4 - 2)) = (-1, 3)
    lo, hi = obs.range()
    assert (float(lo), float(hi)) == (-1.0, 3.0)


def test_per_channel_minmax_and_symmetric_qparams():
    w = torch.tensor([[1.0, -2.0], [0.5, 0.25], [-4.0, 3.0]])
    obs = PerChannelMinMaxObserver(QuantSpec(dtype="int8", qscheme="per_channel", axis=0,
                                             symmetric=True, narrow_range=True), "w")
    obs(w)
    assert obs.min_val.tolist() == [-2.0, 0.25, -4.0]
    assert obs.max_val.tolist() == [1.0, 0.5, 3.0]
    scale, zp = obs.qparams()
    # symmetric narrow int8: scale = amax / 127, zero point 0
    assert torch.allclose(scale, torch.tensor([2.0, 0.5, 4.0]) / 127)
    assert zp.tolist() == [0, 0, 0]


def test_histogram_percentile_by_hand():
    x = torch.arange(10000, dtype=torch.float32)   # uniform 0..9999
    obs = HistogramObserver(U8, "x", percentile=99.0)
    obs(x[:5000])
    obs(x[5000:])                                   # the span grows: old counts are re-binned
    lo, hi = obs.range()
    # 0.5% cut from each tail: about 50 and 9950 (bin width ~4.9)
    assert float(lo) == pytest.approx(50, abs=12)
    assert float(hi) == pytest.approx(9950, abs=12)
    obs100 = HistogramObserver(U8, "x", percentile=100.0)
    obs100(x)
    assert [float(v) for v in obs100.range()] == [0.0, 9999.0]


def test_mse_clips_a_lone_outlier_and_keeps_a_uniform_range():
    g = torch.Generator().manual_seed(0)
    uni = torch.rand(100_000, generator=g) * 2 - 1
    obs = MSEObserver(S8, "x")
    obs(uni)
    lo, hi = obs.range()
    # no outlier: clipping only hurts, the best range is the full [-1, 1] (to 2%)
    assert float(hi) == pytest.approx(1.0, abs=0.02) and float(lo) == pytest.approx(-1.0, abs=0.02)
    obs2 = MSEObserver(S8, "x")
    obs2(torch.cat([uni, torch.tensor([100.0])]))
    _, hi2 = obs2.range()
    # one value at 100 among 1e5 uniform in [-1, 1], symmetric clip at c >= 1:
    # MSE(c) = (100 - c)^2 + 1e5 * (2c / 254)^2 / 12 = (100 - c)^2 + 0.517 c^2 -> c* = 100 / 1.517 = 66
    assert 58.0 <= float(hi2) <= 74.0


def test_entropy_threshold_for_gaussian_with_outliers():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(200_000, generator=g), torch.tensor([40.0, -40.0])])
    obs = EntropyObserver(S8, "x")
    obs(x)
    lo, hi = obs.range()
    # the KL threshold of N(0,1) at 8 bits lies within a few sigma, far below the outliers
    assert 2.0 <= float(hi) <= 8.0 and -8.0 <= float(lo) <= -2.0


def test_qparams_include_zero_and_positive_scale():
    s, z = qparams_from_range(torch.tensor(1.0), torch.tensor(3.0), U8)
    assert float(s) == pytest.approx(3.0 / 255) and int(z) == 0
    s, z = qparams_from_range(torch.tensor(0.0), torch.tensor(0.0), U8)
    assert float(s) > 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_names_the_node(bad):
    obs = MinMaxObserver(U8, "layer1_conv")
    with pytest.raises(CalibrationError, match="layer1_conv"):
        obs(torch.tensor([1.0, bad]))


def test_unseen_observer_refuses_to_invent_a_range():
    obs = HistogramObserver(U8, "fc")
    with pytest.raises(CalibrationError, match="fc"):
        obs.qparams()
