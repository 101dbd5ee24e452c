"""The linears of a causal-LM IR, read by module path: float weights or weight-only blocks.

A backend that writes its own graph for a known decoder family (fxpress.llm.ort_graph) reads
each ``aten.linear`` of the IR here, in whatever form the passes left it:

- a float get_attr (or any constant expression of get_attrs): ``LinearW.weight`` [N, K];
- ``dequantize_per_channel_group(q, scales, zp, ..., group)`` (WeightOnly), possibly behind
  ``slice(.., 1, 0, K)`` when K was padded to whole groups: ``q`` [N, K'], ``scales`` [N, K'/g],
  ``zp`` (None when symmetric), ``bits``, ``block``;
- ``dequantize_per_channel`` (one scale per row): the same with the row's scale repeated over
  the largest power-of-two block dividing K (exact), or dequantized to float when none fits.

Only weights are read: a Quantize(mode="dynamic") IR's activation Q/DQ before a linear is not
(the ORT decoder's MatMulNBits at accuracy_level 4 quantizes activations itself, per block; the
lowering's check against the IR measures the difference). A weight in another form is left to the
caller: `linear_weights` returns what it read, and the module paths it did not.

    ws = linear_weights(gm)          # {"model.layers.0.self_attn.q_proj": LinearW, ...}
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (defines torch.ops.quantized_decomposed)
import torch.fx as fx

__all__ = ["LinearW", "linear_weights", "constant", "quantize_blocks"]

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed


@dataclass
class LinearW:
    path: str
    n: int
    k: int
    weight: np.ndarray | None = None      # float [N, K]
    q: np.ndarray | None = None           # signed int values [N, K'] (K' = whole blocks >= K)
    scales: np.ndarray | None = None      # [N, K'/block]
    zp: np.ndarray | None = None          # signed [N, K'/block] or None (symmetric)
    bits: int = 0
    block: int = 0
    bias: np.ndarray | None = None

    @property
    def quantized(self) -> bool:
        return self.q is not None

    def dense(self) -> np.ndarray:
        """The float weight [N, K] (dequantized when quantized)."""
        if self.q is None:
            return self.weight
        q = self.q.astype(np.float32)
        if self.zp is not None:
            q = q - np.repeat(self.zp.astype(np.float32), self.block, 1)[:, : q.shape[1]]
        return (q * np.repeat(self.scales, self.block, 1)[:, : q.shape[1]])[:, : self.k]


def quantize_blocks(w: np.ndarray, bits: int, block: int) -> LinearW:
    """Symmetric round-to-nearest of a float [N, K] weight in blocks of `block` along K (K padded
    with zeros to whole blocks): what a float lm_head becomes for ``lm_head="int8"|"int4"``."""
    n, k = w.shape
    kp = -(-k // block) * block
    qmax = (1 << (bits - 1)) - 1
    q = np.empty((n, kp), np.int8)
    scales = np.empty((n, kp // block), np.float32)
    rows = max(1, (1 << 22) // kp)  # ~16 MB of float temporaries at a time (a 1B model's head is 400 MB)
    for r in range(0, n, rows):
        wp = np.zeros((min(rows, n - r), kp), np.float32)
        wp[:, :k] = w[r:r + rows]
        g = wp.reshape(wp.shape[0], kp // block, block)
        s = np.abs(g).max(-1) / qmax
        s[s == 0] = 1.0
        q[r:r + rows] = np.clip(np.rint(g / s[..., None]), -qmax - 1, qmax).reshape(wp.shape[0], kp)
        scales[r:r + rows] = s
    return LinearW("", n, k, q=q, scales=scales, bits=bits, block=block)


def constant(gm: fx.GraphModule, node) -> torch.Tensor | None:
    """The value of a get_attr (or a constant expression of get_attrs), else None."""
    from ..passes.quant.convert import fetch_attr
    from ..passes.quant.weight_ops import constant_value
    if not isinstance(node, fx.Node):
        return None
    if node.op == "get_attr":  # the common case, without constant_value's walk of the graph
        value = fetch_attr(gm, node.target)
        return value if isinstance(value, torch.Tensor) else None
    return constant_value(gm, node)


def _np(t: torch.Tensor) -> np.ndarray:
    """A numpy view of the tensor where it can be one (read only: never written through)."""
    return t.detach().cpu().numpy()


def _pow2_block(k: int) -> int | None:
    b = 1 << (k.bit_length() - 1)
    while b >= 16 and k % b:
        b //= 2
    return min(b, 256) if b >= 16 else None


def _read_weight(gm, w, k_in: int) -> dict | None:
    from ..ir.meta import WeightOnlySpec, get_record
    k_cut = None
    if w.op == "call_function" and w.target == aten.slice.Tensor and len(w.args) >= 4 and \
            w.args[1] in (1, -1) and w.args[2] == 0 and isinstance(w.args[0], fx.Node):
        k_cut, w = int(w.args[3]), w.args[0]
    if w.op == "call_function" and w.target == qd.dequantize_per_channel_group.default:
        q, s, zp = (constant(gm, a) for a in w.args[:3])
        if q is None or s is None or (w.args[2] is not None and zp is None):
            return None
        spec = get_record(w, WeightOnlySpec)
        block = int(w.args[6])
        qa = _np(q).astype(np.int8, copy=False)
        bits = spec.bits if spec is not None else (4 if qa.min() >= -8 and qa.max() <= 7 else 8)
        scales = _np(s).astype(np.float32, copy=False).reshape(qa.shape[0], -1)
        zpa = None if zp is None or not bool((zp != 0).any()) else \
            _np(zp).astype(np.int8).reshape(qa.shape[0], -1)
        return dict(q=qa, scales=scales, zp=zpa, bits=bits, block=block,
                    k=k_cut if k_cut is not None else qa.shape[1])
    if k_cut is not None:
        return None
    if w.op == "call_function" and w.target == qd.dequantize_per_channel.default and w.args[3] == 0:
        q, s, zp = (constant(gm, a) for a in w.args[:3])
        if q is None or s is None:
            return None
        qa = _np(q).astype(np.int8, copy=False)
        n, k = qa.shape
        spec = get_record(w, WeightOnlySpec)
        bits = spec.bits if spec is not None else 8
        block = _pow2_block(k)
        zpa = None if zp is None or not bool((zp != 0).any()) else _np(zp).astype(np.int8)
        if block is None:
            dense = (qa.astype(np.float32) - (0 if zpa is None else zpa.reshape(n, 1))) * \
                _np(s).astype(np.float32).reshape(n, 1)
            return dict(weight=dense, k=k)
        rep = k // block
        scales = np.repeat(_np(s).astype(np.float32).reshape(n, 1), rep, 1)
        zpa = None if zpa is None else np.repeat(zpa.reshape(n, 1), rep, 1)
        return dict(q=qa, scales=scales, zp=zpa, bits=bits, block=block, k=k)
    c = constant(gm, w)
    if c is None or c.dim() != 2 or not c.dtype.is_floating_point:
        return None
    return dict(weight=_np(c).astype(np.float32, copy=False), k=c.shape[1])  # a view: no copy


def linear_weights(gm: fx.GraphModule) -> tuple[dict[str, LinearW], list[str]]:
    """({module path: LinearW} for every linear read, [module paths of linears not read])."""
    from ..ir.meta import lineage
    out, unread = {}, []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target != aten.linear.default:
            continue
        lin = lineage(node)
        path = lin.module_path if lin is not None else node.name
        w = node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        got = _read_weight(gm, w, 0) if isinstance(w, fx.Node) else None
        bias = constant(gm, b) if isinstance(b, fx.Node) else None
        if got is None or (b is not None and bias is None) or path in out:
            unread.append(path)
            continue
        k = got.pop("k")
        n = (got.get("q") if got.get("q") is not None else got["weight"]).shape[0]
        out[path] = LinearW(path, n, k, bias=None if bias is None else _np(bias).astype(np.float32), **got)
    return out, unread
