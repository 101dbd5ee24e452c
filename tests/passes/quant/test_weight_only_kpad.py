"""WeightOnly at any K: a group that does not divide K (SmolLM2's hidden 576 with group 128) is
served with a partial last group, stored padded, in the IR and in ORT's MatMulNBits packing."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fxpress
from fxpress.ir.meta import WeightOnlySpec, get_record
from fxpress.passes.quant.convert import fetch_attr
from fxpress.passes.quant.weight_only import dequantize_groups, rtn

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten


class Mlp(torch.nn.Module):
    """K = 576 (4.5 groups of 128) into K = 96 (less than one group)."""

    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(576, 96)
        self.down = torch.nn.Linear(96, 40, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _sqnr(ref, y):
    ref, y = torch.as_tensor(ref), torch.as_tensor(y)
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean()))


def _reference_dequant(w: torch.Tensor, bits: int, g: int, sym: bool) -> torch.Tensor:
    """Independent reference: each group (the last one partial) quantized on its own."""
    qmax = (1 << (bits - 1)) - 1
    qmin = -qmax - 1
    out = torch.empty_like(w)
    for j in range(0, w.shape[1], g):
        blk = w[:, j:j + g]
        if sym:
            s = (blk.abs().amax(1, keepdim=True) / ((qmax - qmin) / 2)).clamp(min=1e-10)
            out[:, j:j + g] = (torch.round(blk / s).clamp(qmin, qmax)) * s
        else:
            lo, hi = blk.amin(1, keepdim=True).clamp(max=0), blk.amax(1, keepdim=True).clamp(min=0)
            s = ((hi - lo) / (qmax - qmin)).clamp(min=1e-10)
            z = (qmin - torch.round(lo / s)).clamp(qmin, qmax)
            out[:, j:j + g] = ((torch.round(blk / s) + z).clamp(qmin, qmax) - z) * s
    return out


@pytest.mark.parametrize("bits,sym", [(4, True), (4, False), (8, True)])
def test_rtn_partial_last_group_matches_reference(bits, sym):
    torch.manual_seed(0)
    w = torch.randn(64, 576)
    q, s, z = rtn(w, bits, 128, sym)
    assert q.shape == (64, 576) and s.shape == (64, 5) and z.shape == (64, 5)
    deq = dequantize_groups(q, s, z, 128)
    ref = _reference_dequant(w, bits, 128, sym)
    assert torch.allclose(deq, ref, atol=1e-6)
    assert _sqnr(w, deq) > (38.0 if bits == 8 else 14.0)


@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (8, 128, True), (4, 64, False)])
def test_ir_form_pads_and_slices(bits, group, sym):
    torch.manual_seed(0)
    m = Mlp().eval()
    x = torch.randn(3, 576)
    cm = fxpress.compress(m, (x,), fxpress.WeightOnly(bits=bits, group_size=group, symmetric=sym,
                                                      skip=()))
    gm = cm.graph_module
    dqs = [n for n in gm.graph.nodes if n.target is qd.dequantize_per_channel_group.default]
    slices = [n for n in gm.graph.nodes if n.target is aten.slice.Tensor]
    assert len(dqs) == 2
    # up: 576 = 4.5 x 128 (or 9 x 64: no slice); down: 96 < one group
    assert len(slices) == (2 if group == 128 else 1)
    for dq in dqs:
        spec = get_record(dq, WeightOnlySpec)
        assert spec.validate() == [] and spec.group_size == group
        q = fetch_attr(gm, dq.args[0].target)
        kp = -(-spec.in_features // group) * group
        assert tuple(q.shape) == (spec.out_features, kp)
        # the padding holds the zero point: it dequantizes to exactly 0
        full = dq.target(*[fetch_attr(gm, a.target) if isinstance(a, torch.fx.Node) else a
                           for a in dq.args])
        assert torch.all(full[:, spec.in_features:] == 0)
    # the quantized model equals the reference dequantization of each weight
    ref = torch.nn.functional.linear(
        torch.relu(torch.nn.functional.linear(x, _reference_dequant(m.up.weight, bits, group, sym),
                                              m.up.bias)),
        _reference_dequant(m.down.weight, bits, group, sym))
    assert torch.allclose(cm(x), ref, atol=1e-4)
    assert _sqnr(m(x), cm(x)) > (35.0 if bits == 8 else 12.0)


@pytest.mark.parametrize("bits", [4, 8])
def test_matmul_nbits_takes_k576_g128(bits):
    ort = pytest.importorskip("onnxruntime")
    from fxpress.backends.onnx.nbits import export_nbits, nbits_nodes
    torch.manual_seed(0)
    m = Mlp().eval()
    x = torch.randn(3, 576)
    cm = fxpress.compress(m, (x,), fxpress.WeightOnly(bits=bits, group_size=128, skip=()))
    model = export_nbits(cm.graph_module, (x,), accuracy_level=0)
    nodes = nbits_nodes(model)
    assert [(n["K"], n["N"], n["block_size"], n["bits"]) for n in nodes] == \
        [(576, 96, 128, bits), (96, 40, 128, bits)]
    assert not [n for n in model.graph.node if n.op_type in ("Slice", "DequantizeLinear")]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    ir = cm(x).detach().numpy()
    # accuracy level 0: fp32 compute over the same dequantized weights as the IR
    assert _sqnr(ir, y) > 80.0
    assert np.allclose(ir, y, atol=1e-4)


@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_and_awq_at_k576_g128_beat_rtn(act_order):
    """GPTQ and AWQ's clip search with a partial last group: valid integers, the standard
    [N, ceil(K/g)] scales, and a smaller output error than RTN on the calibration rows."""
    from fxpress.passes.quant.awq import awq_clip
    from fxpress.passes.quant.gptq import gptq_quantize
    torch.manual_seed(0)
    x = torch.randn(512, 576) * torch.linspace(0.2, 3.0, 576)  # uneven channel scales
    w = torch.randn(96, 576)
    ref = x @ w.T

    def err(q, s, z):
        return float((x @ dequantize_groups(q, s, z, 128).T - ref).pow(2).mean())

    rtn_err = err(*rtn(w, 4, 128, True))
    q, s, z = gptq_quantize(w, 2 * x.T @ x / x.shape[0], bits=4, group_size=128,
                            act_order=act_order)
    assert q.shape == (96, 576) and s.shape == (96, 5)
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    assert err(q, s, z) < 0.85 * rtn_err  # measured 0.70x (independent input channels)
    q, s, z = awq_clip(x, w, bits=4, group_size=128, symmetric=True)
    assert q.shape == (96, 576) and s.shape == (96, 5)
    assert err(q, s, z) < rtn_err
