"""GPTQ: structure (records, stats, shared Hessians) and numerics (layer error vs RTN; real MiniLM)."""
from __future__ import annotations

import torch

import fxpress
from fxpress.ir.meta import WeightOnlySpec, get_record
from fxpress.passes.quant.gptq import gptq_quantize
from fxpress.passes.quant.weight_only import dequantize_groups, rtn

from .wo_helpers import Pair, minilm_cos_error, minilm_rtn_error


def test_gptq_structure():
    torch.manual_seed(0)
    x = torch.randn(4, 8, 64)
    cal = [(torch.randn(4, 8, 64),) for _ in range(4)]
    cm = fxpress.compress(Pair().eval(), (x,), fxpress.WeightOnly(bits=4, group_size=32,
                                                                  method="gptq"), calibration=cal)
    dqs = [n for n in cm.graph_module.graph.nodes if get_record(n, WeightOnlySpec) is not None]
    assert len(dqs) == 3 and {get_record(n, WeightOnlySpec).method for n in dqs} == {"gptq"}
    stats = cm.report.passes[0].stats
    assert stats["quantized"] == 3 and 0.0 < stats["gptq_rel_output_error"] < 0.05


def test_gptq_beats_rtn_on_layer_output():
    """On correlated activations, GPTQ's ||X (W - Q)^T||^2 is well under RTN's (measured ~0.5x)."""
    torch.manual_seed(0)
    k, n = 256, 128
    x = torch.randn(2048, k) @ (torch.randn(k, k) / k ** 0.5) + 0.1 * torch.randn(2048, k)
    w = torch.randn(n, k)
    h = 2 * x.T @ x / x.shape[0]
    err = lambda d: float(((x @ (d - w).T) ** 2).mean())  # noqa: E731
    for group, act_order in ((64, False), (64, True), (-1, False)):
        q, s, z = gptq_quantize(w, h, bits=4, group_size=group, act_order=act_order)
        assert q.dtype == torch.int8 and int(q.min()) >= -8 and int(q.max()) <= 7
        assert tuple(s.shape) == (n, 1 if group == -1 else k // group)
        rq, rs, rz = rtn(w, 4, group, True)
        assert err(dequantize_groups(q, s, z, group)) < 0.7 * err(dequantize_groups(rq, rs, rz, group))


def test_gptq_cuts_rtn_error_on_real_minilm():
    """Real MiniLM-L6, int4 g128, 128 calibration sentences, 320 held-out: >= 25% less
    mean(1 - cos) than RTN (measured 0.053 -> 0.024)."""
    rtn_err = minilm_rtn_error(4, 128)
    gptq_err = minilm_cos_error(fxpress.WeightOnly(bits=4, group_size=128, method="gptq"))
    print({"rtn": rtn_err, "gptq": gptq_err})
    assert gptq_err <= 0.75 * rtn_err
