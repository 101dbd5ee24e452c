"""Which int8 weight form is exact *and* fast on the CPU at hand (read from ``fxpress.hw``).

x86 CPUs without VNNI multiply u8 activations by s8 weights with ``vpmaddubsw``: two
products are summed into a *saturating int16*, then ``vpmaddwd`` widens pairs to int32.
With activations in [0, 255] a pair ``a0*w0 + a1*w1`` stays within int16 exactly when
``|w0| + |w1| <= 128`` (255 * 128 = 32640). So, per layer (NOTES.md, ORT #6004):

- VNNI / AMX / ARM (no int16 pair sums): ``s8`` full range [-127, 127];
- no VNNI, policy "auto": ``s8_pairs`` (full range kept) where every adjacent K-pair already
  holds, else ``s7`` (requantized to [-64, 64]: every pair holds);
- no VNNI, policy "full" (the user asked for full range, or QAT learned the scales):
  ``s8_pairs`` where the pairs hold, else ``u8u8`` (shift to uint8: exact, up to 2x slower);
- policy "reduced" (``Quantize(reduce_range=True)``): ``s7`` everywhere.

    >>> with fxpress.hw.simulate(flags={"avx2", "fma"}) as avx2:
    ...     choose_form(torch.tensor([[100, 20, -64, 64]], dtype=torch.int8), avx2).form
    's8_pairs'      # pairs (100, 20) and (-64, 64) are <= 128
    's8_pairs'

The K order of a conv weight [O, I, kh, kw] depends on the kernel (im2col: I, kh, kw;
channels-last: kh, kw, I): the pair check holds only if it holds in both orders.
"""
from __future__ import annotations

from typing import Any

import torch

from ...ir.meta import WeightForm

__all__ = ["choose_form", "pairs_fit_int16", "host_features", "feature_key", "has_fast_s8",
           "u8s8_avx2_matmul", "POLICIES", "PAIR_LIMIT"]

POLICIES = ("auto", "full", "reduced")
PAIR_LIMIT = 128          # |w0| + |w1| <= 128 keeps 255 * (|w0| + |w1|) within int16


def host_features() -> Any:
    """The host's feature record, ``fxpress.hw.host()`` (tests swap it with ``hw.override``)."""
    from ... import hw
    return hw.host()


def feature_key(features: Any) -> str:
    """The host's ISA key (``HostFeatures.feature_key()``, e.g. 'x86_64-avx2-1a2b3c4d')."""
    return features.feature_key()


def has_fast_s8(features: Any) -> bool:
    """Whether s8 weights of any value run exactly: VNNI/AMX (int32 dot), or not x86 at all."""
    return bool(features.vnni or features.amx_int8 or not features.x86)


def _k_orders(q: torch.Tensor, axis: int) -> list[torch.Tensor]:
    """[O, K] views of `q` (output channels first) in each K order a kernel may use."""
    o = q.movedim(axis, 0)
    views = [o.reshape(o.shape[0], -1)]
    if o.dim() > 2:  # conv: channels-last K order (kh, kw, I) as well as (I, kh, kw)
        cl = o.movedim(1, -1)
        views.append(cl.reshape(o.shape[0], -1))
        if cl.shape[-1] % 2:  # blocked layouts pad I per tap: pairs restart at every tap
            views.append(torch.nn.functional.pad(cl, (0, 1)).reshape(o.shape[0], -1))
    return views


def pairs_fit_int16(q: torch.Tensor, axis: int | None = 0) -> bool:
    """Whether every adjacent K-pair of int8 weights `q` has |w0| + |w1| <= 128 (in every K order).

    `axis`: the output-channel axis; None (per-tensor weights, layout unknown) checks a 2-D
    weight both ways, as [N, K] and as [K, N].
    """
    if axis is None:
        axes = (0, 1) if q.dim() == 2 else (0,)
        return all(pairs_fit_int16(q, a) for a in axes)
    for v in _k_orders(q, axis):
        a = v.to(torch.int32).abs()
        if a.shape[1] % 2:
            a = torch.nn.functional.pad(a, (0, 1))
        if bool(((a[:, 0::2] + a[:, 1::2]) > PAIR_LIMIT).any()):
            return False
    return True


def choose_form(q: torch.Tensor, features: Any, policy: str = "auto", *, axis: int | None = 0,
                symmetric: bool = True) -> WeightForm:
    """The WeightForm for full-range int8 weights `q` on a host with `features`.

    `q` is the weight quantized to full range; a result of ``s7`` means "requantize to
    [-64, 64]" (ConvertToQDQ does it). Affine (zero point != 0) weights are never s7/pairs:
    the kernels subtract the zero point after the saturating step.
    """
    isa = feature_key(features)
    if policy == "reduced":
        return WeightForm("s7", isa, "reduce_range: weights in [-64, 64]")
    if has_fast_s8(features):
        return WeightForm("s8", isa, "int8 dot products without int16 pair sums")
    if symmetric and pairs_fit_int16(q, axis):
        return WeightForm("s8_pairs", isa, "no VNNI; every adjacent K-pair |w0|+|w1| <= 128")
    if symmetric and policy == "auto":
        return WeightForm("s7", isa, "no VNNI and K-pairs beyond 128: requantized to [-64, 64]")
    return WeightForm("u8u8", isa, "no VNNI, full range kept and K-pairs beyond 128: u8 x u8")


def u8s8_avx2_matmul(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """int32 ``a @ w.T`` as AVX2's vpmaddubsw + vpmaddwd compute it (saturating int16 pairs).

    `a`: uint8 [M, K]; `w`: int8 [N, K]. A reference of the kernel arithmetic: equals the exact
    product exactly when the pairs fit in int16 (see ``pairs_fit_int16``).
    """
    a32, w32 = a.to(torch.int64), w.to(torch.int64)
    if a32.shape[1] % 2:
        a32, w32 = (torch.nn.functional.pad(t, (0, 1)) for t in (a32, w32))
    prod = a32[:, None, :] * w32[None, :, :]                  # [M, N, K]
    pairs = (prod[..., 0::2] + prod[..., 1::2]).clamp(-32768, 32767)
    return pairs.sum(-1).to(torch.int32)
