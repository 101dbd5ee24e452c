"""TailMinMaxObserver (the static default on transformers) and the transformer rule it follows."""
from __future__ import annotations

import torch

from fxpress.ir.meta import QuantSpec
from fxpress.passes.quant.annotate import is_transformer
from fxpress.passes.quant.observers import MinMaxObserver, TailMinMaxObserver, make_observer

SPEC = QuantSpec(dtype="uint8", qscheme="per_tensor", symmetric=False, observer="minmax_tail")


def _samples(n: int, seed: int) -> torch.Tensor:
    """n samples of 64 values whose scale varies per sample (lognormal), as LeViT's do."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(0.5 * torch.randn(n, 1, generator=g))
    return scale * torch.randn(n, 64, generator=g)


def test_few_samples_widen_and_clip_less_of_unseen_data():
    calib, unseen = _samples(4, 0), _samples(2000, 1)
    tail, plain = TailMinMaxObserver(SPEC, "x"), MinMaxObserver(SPEC, "x")
    for b in calib.split(2):
        tail(b), plain(b)
    lo, hi = tail.range()
    assert float(hi) > 1.3 * float(plain.max_val) and float(lo) < 1.3 * float(plain.min_val)

    def clipped(lo, hi):
        return float(((unseen > hi) | (unseen < lo)).float().mean())

    # the widened range leaves at least 10x fewer unseen values outside it
    assert clipped(lo, hi) * 10 < clipped(plain.min_val, plain.max_val), (
        clipped(lo, hi), clipped(plain.min_val, plain.max_val))


def test_large_calibration_and_bounded_tensors_keep_min_max():
    obs = TailMinMaxObserver(SPEC, "x")
    for b in _samples(64, 2).split(8):          # 64 rows >= TAIL_ROWS: the observed range
        obs(b)
    assert torch.equal(torch.stack(obs.range()), torch.stack([obs.min_val, obs.max_val]))
    relu6 = TailMinMaxObserver(SPEC, "r")
    relu6(torch.randn(2, 4096).mul(4).clamp(0, 6))   # a quarter of the values sit at 6
    assert float(relu6.range()[1]) == 6.0 and float(relu6.range()[0]) == 0.0


def test_merge_is_one_observer_over_every_shard():
    a, b, both = (TailMinMaxObserver(SPEC, "x") for _ in range(3))
    x = _samples(6, 3)
    a(x[:3]), b(x[3:]), both(x[:3]), both(x[3:])
    merged = TailMinMaxObserver(SPEC, "x")
    merged.merge([a.dist_state(), b.dist_state()])
    assert torch.equal(torch.stack(merged.range()), torch.stack(both.range()))
    assert isinstance(make_observer(SPEC, "x", weight=False), TailMinMaxObserver)


class _Attn(torch.nn.Module):
    def __init__(self, norm: bool):
        super().__init__()
        self.qkv = torch.nn.Linear(8, 24)
        self.norm = torch.nn.LayerNorm(8) if norm else torch.nn.BatchNorm1d(4)

    def forward(self, x):
        q, k, v = self.qkv(self.norm(x)).chunk(3, -1)
        return (q @ k.transpose(-1, -2) * 0.3).softmax(-1) @ v


class _Cnn(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return self.conv(x).flatten(1).softmax(-1)   # a classifier's softmax: no attention


def test_transformer_rule_layer_norm_or_attention():
    import fxpress
    x = torch.randn(2, 4, 8)
    assert is_transformer(fxpress.capture(_Attn(norm=True).eval(), (x,)))
    assert is_transformer(fxpress.capture(_Attn(norm=False).eval(), (x,)))  # LeViT's form
    assert not is_transformer(fxpress.capture(_Cnn().eval(), (torch.randn(2, 3, 8, 8),)))
