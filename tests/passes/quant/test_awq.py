"""AWQ: structure (one x * (1/s) per shared input, records) and numerics (scale search vs RTN;
real MiniLM)."""
from __future__ import annotations

import torch

import fxpress
from fxpress.ir.meta import WeightOnlySpec, get_record
from fxpress.passes.quant.awq import awq_scales
from fxpress.passes.quant.weight_only import dequantize_groups, rtn

from .wo_helpers import Pair, minilm_cos_error, minilm_rtn_error


def _outlier_batches(n):
    g = torch.Generator().manual_seed(1)
    scale = torch.ones(64)
    scale[:4] = 20.0  # a few salient channels, as LLM activations have
    return [(torch.randn(4, 8, 64, generator=g) * scale,) for _ in range(n)]


def test_awq_structure():
    torch.manual_seed(0)
    cal = _outlier_batches(4)
    m = Pair().eval()
    cm = fxpress.compress(m, cal[0], fxpress.WeightOnly(bits=4, group_size=32, method="awq"),
                          calibration=cal)
    gm = cm.graph_module
    muls = [n for n in gm.graph.nodes if n.op == "call_function" and
            n.target is torch.ops.aten.mul.Tensor and n.args[1].op == "get_attr"]
    assert len(muls) == 2  # one for x (shared by a and b), one for c's input
    assert len(muls[0].users) == 2
    dqs = [n for n in gm.graph.nodes if get_record(n, WeightOnlySpec) is not None]
    assert {get_record(n, WeightOnlySpec).method for n in dqs} == {"awq"} and len(dqs) == 3
    assert cm.report.passes[0].stats["awq_scaled_inputs"] == 2
    x = _outlier_batches(5)[4][0]
    ref = m(x)
    rtn_cm = fxpress.compress(m, cal[0], fxpress.WeightOnly(bits=4, group_size=32))
    assert (cm(x) - ref).pow(2).mean() < (rtn_cm(x) - ref).pow(2).mean()


def test_awq_scale_search_beats_rtn():
    """With salient input channels, the searched scales cut the output error (exponent > 0)."""
    torch.manual_seed(0)
    x = torch.cat([b[0] for b in _outlier_batches(8)]).reshape(-1, 64)
    w = torch.randn(96, 64)
    s, r = awq_scales(x, x.abs().mean(0), [w], bits=4, group_size=32, symmetric=True)
    assert r > 0.0 and s[:4].mean() > s[4:].mean()
    q, sc, z = rtn(w * s, 4, 32, True)
    awq_err = ((x / s) @ dequantize_groups(q, sc, z, 32).T - x @ w.T).pow(2).mean()
    q0, sc0, z0 = rtn(w, 4, 32, True)
    rtn_err = (x @ dequantize_groups(q0, sc0, z0, 32).T - x @ w.T).pow(2).mean()
    assert awq_err < 0.8 * rtn_err


def test_awq_cuts_rtn_error_on_real_minilm():
    """Real MiniLM-L6, int4 g128: >= 25% less mean(1 - cos) than RTN (measured 0.053 -> 0.029)."""
    rtn_err = minilm_rtn_error(4, 128)
    awq_err = minilm_cos_error(fxpress.WeightOnly(bits=4, group_size=128, method="awq"))
    print({"rtn": rtn_err, "awq": awq_err})
    assert awq_err <= 0.75 * rtn_err
