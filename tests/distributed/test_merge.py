"""The merge rules behind sharded calibration, in one process (no process group needed):
observers fed two round-robin shards and merged equal one observer fed everything."""
import pytest
import torch

from fxpress import distributed
from fxpress.passes.quant.config import parse_spec
from fxpress.passes.quant.observers import (
    EntropyObserver,
    HistogramObserver,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    MSEObserver,
    PerChannelMinMaxObserver,
    _rebinned,
)


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.relu(torch.randn(50, 64, generator=g) * (1 + 0.3 * i)) ** 1.5 for i in range(8)]


def _sharded(cls, xs, shards=2, **kw):
    spec = parse_spec("uint8-per-tensor-affine", weight=False, observer="minmax")
    one, parts = cls(spec, "x", **kw), [cls(spec, "x", **kw) for _ in range(shards)]
    for i, x in enumerate(xs):
        one.batch_index = i
        one(x)
    for r, part in enumerate(parts):
        for i, x in enumerate(xs[r::shards]):
            part.batch_index = i                    # local index, as Calibrate sets it
            part(x)
    merged = cls(spec, "x", **kw)
    merged.merge([p.dist_state() for p in parts])
    return one, merged


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver])
def test_exact_merges_are_bit_identical(cls):
    one, merged = _sharded(cls, _batches())
    assert torch.equal(one.min_val, merged.min_val) and torch.equal(one.max_val, merged.max_val)
    assert merged.num_batches == 8
    assert all(torch.equal(a, b) for a, b in zip(one.qparams(), merged.qparams()))


@pytest.mark.parametrize("cls", [HistogramObserver, MSEObserver, EntropyObserver])
def test_histogram_merges_within_one_percent(cls):
    one, merged = _sharded(cls, _batches())
    assert float(merged.hist.sum()) == pytest.approx(float(one.hist.sum()))  # no count lost
    s1, s2 = one.qparams()[0], merged.qparams()[0]
    assert abs(float(s2 / s1) - 1) <= 0.01


def test_empty_shard_contributes_nothing():
    spec = parse_spec("uint8-per-tensor-affine", weight=False, observer="histogram")
    one, empty = HistogramObserver(spec, "x"), HistogramObserver(spec, "x")
    for x in _batches()[:3]:
        one(x)
    both = HistogramObserver(spec, "x")
    both.merge([one.dist_state(), empty.dist_state()])
    assert torch.equal(both.hist, one.hist) and both.num_batches == 3
    assert torch.equal(both.qparams()[0], one.qparams()[0])
    # per-channel (weights): an empty rank's scalar placeholders never meet the real shapes
    pc_spec = parse_spec("int8-per-channel-symmetric", weight=True, observer="minmax")
    seen, unseen = PerChannelMinMaxObserver(pc_spec, "w"), PerChannelMinMaxObserver(pc_spec, "w")
    seen(torch.randn(4, 3))
    pc = PerChannelMinMaxObserver(pc_spec, "w")
    pc.merge([unseen.dist_state(), seen.dist_state()])
    assert torch.equal(pc.min_val, seen.min_val) and pc.num_batches == 1


def test_rebinning_keeps_counts_and_mass_position():
    h = torch.zeros(2048, dtype=torch.float64)
    h[100], h[2047] = 5.0, 3.0
    out = _rebinned(h, 0.0, 1.0, -1.0, 3.0)            # 4x wider span
    assert float(out.sum()) == 8.0
    centre = (out * torch.arange(2048)).sum() / out.sum()
    expect = (5 * (512 + 100 / 4) + 3 * (512 + 2047 / 4)) / 8
    assert abs(float(centre) - expect) < 1.0           # within a bin of where the mass was


def test_shard_round_robin_and_local():
    assert distributed.shard(range(5), distributed.World(1, 2)) == [1, 3]
    assert distributed.shard(range(5), distributed.World(0, 2)) == [0, 2, 4]
    assert distributed.shard([], distributed.World(1, 2)) == []
    with distributed.local():
        assert distributed.world() is None
        assert distributed.shard(range(3)) == [0, 1, 2]


def test_recipe_difference_names_the_field():
    a = [{"quantize": {"mode": "static", "observer": "histogram"}}]
    b = [{"quantize": {"mode": "static", "observer": "minmax"}}]
    assert distributed._first_difference(a, b, "passes") == \
        ("passes[0].quantize.observer", "histogram", "minmax")
    assert distributed._first_difference(a, a + b, "passes") == ("passes (length)", 1, 2)
    assert distributed._first_difference(a, [{"prune": {}}], "passes")[0] == "passes[0].quantize"
