"""WeightOnly (RTN): the IR form, numerics, bad input, and perplexity of RTN/GPTQ/AWQ on a small
LM trained on real text."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.errors import CalibrationError, RecipeError
from fxpress.ir.meta import QuantSpec, WeightOnlySpec, get_record
from fxpress.passes.quant.weight_only import dequantize_groups, quantize_groups, rtn

from .wo_helpers import mean_kl, perplexity, run_pass, tiny_lm

qd = torch.ops.quantized_decomposed


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = torch.nn.LayerNorm(128)
        self.up = torch.nn.Linear(128, 256)
        self.down = torch.nn.Linear(256, 128, bias=False)
        self.lm_head = torch.nn.Linear(128, 50)

    def forward(self, x):
        return self.lm_head(self.down(torch.relu(self.up(self.ln(x)))))


def _sqnr(ref, y):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean()))


def _dq_nodes(gm, target):
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target is target]


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, False), (8, -1, True)])
def test_ir_form(bits, group, sym):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 128)
    cm = fxpress.compress(Net().eval(), (x,), fxpress.WeightOnly(bits=bits, group_size=group,
                                                                 symmetric=sym))
    gm = cm.graph_module
    target = qd.dequantize_per_channel.default if group == -1 else \
        qd.dequantize_per_channel_group.default
    dqs = _dq_nodes(gm, target)
    assert len(dqs) == 2  # up, down; lm_head is skipped by default
    lin = [n for n in gm.graph.nodes if n.op == "call_function" and
           n.target is torch.ops.aten.linear.default]
    assert [n.args[1].op for n in lin] == ["call_function", "call_function", "get_attr"]
    lo, hi = (-8, 7) if bits == 4 else (-128, 127)
    for dq in dqs:
        q = getattr(gm.get_submodule(dq.args[0].target.rpartition(".")[0]),
                    dq.args[0].target.rpartition(".")[2])
        assert q.dtype == torch.int8 and lo <= int(q.min()) and int(q.max()) <= hi
        rec = get_record(dq, WeightOnlySpec)
        assert (rec.bits, rec.group_size, rec.method, rec.symmetric) == (bits, group, "rtn", sym)
        assert rec.validate() == [] and get_record(dq, QuantSpec).qscheme == "per_channel"
        scale = dq.args[1]
        k = q.shape[1]
        assert tuple(scale.meta["val"].shape) == ((q.shape[0],) if group == -1 else
                                                  (q.shape[0], k // group))
        assert (dq.args[2] is None) == (sym and group != -1)
    assert cm.report.passes[0].stats["quantized"] == 2


def test_rtn_numerics_and_round_trip():
    torch.manual_seed(0)
    w = torch.randn(64, 256)
    for bits, floor_db in ((8, 38.0), (4, 14.0)):
        for sym in (True, False):
            q, s, z = rtn(w, bits, 32, sym)
            deq = dequantize_groups(q, s, z, 32)
            assert _sqnr(w, deq) > floor_db
            # the stored integers are a fixed point: quantizing their dequantized weight with
            # the same scales gives back exactly the same integers
            assert torch.equal(quantize_groups(deq, s, z, bits, 32), q)
    x = torch.randn(4, 8, 128)
    m = Net().eval()
    cm = fxpress.compress(m, (x,), fxpress.WeightOnly(bits=8, group_size=32))
    assert _sqnr(m(x), cm(x)) > 35.0
    cm4 = fxpress.compress(m, (x,), fxpress.WeightOnly(bits=4, group_size=32, skip=()))
    assert len(_dq_nodes(cm4.graph_module, qd.dequantize_per_channel_group.default)) == 3
    assert _sqnr(m(x), cm4(x)) > 12.0


def test_bad_input():
    with pytest.raises(RecipeError) as e:
        fxpress.WeightOnly(bits=3)
    assert "accepted: 4, 8" in str(e.value)
    with pytest.raises(RecipeError, match="group_size"):
        fxpress.WeightOnly(group_size=48)
    with pytest.raises(RecipeError, match="method"):
        fxpress.WeightOnly(method="hqq")
    x = torch.randn(2, 8, 128)
    for method in ("gptq", "awq"):
        with pytest.raises(CalibrationError, match=method):
            fxpress.compress(Net().eval(), (x,), fxpress.WeightOnly(method=method))
    r = fxpress.Recipe.from_list([{"weight_only": {"bits": 8, "group_size": 64,
                                                   "method": "awq", "skip": ["lm_head"]}}])
    assert r.entries[0] == fxpress.WeightOnly(bits=8, group_size=64, method="awq")


@pytest.mark.slow
def test_perplexity_on_trained_lm():
    """fp32 <= GPTQ, AWQ < RTN on a byte-level LM trained here (300 one-cycle steps) on stdlib
    docstrings: int4 per channel (group -1), lm_head quantized too, 8 calibration batches of 16.

    On held-out text int4 moves this small model's perplexity by 0.0-0.4 %, and which way is
    chance: the trained model is not at a minimum of the held-out loss, so a small weight
    perturbation moves it to first order, either way (measured with the training seed varied:
    RTN once 0.06 % *below* fp32 at g32, GPTQ once above RTN, AWQ once below fp32). So "fp32 <=
    each method" and "each method <= RTN" are asserted in perplexity up to 0.3 %, and "GPTQ, AWQ
    < RTN" strictly in how far each moved fp32's next-byte distributions (mean KL per token,
    second order, >= 0). Measured (seed 0 / 2): perplexity fp32 11.221 / 11.071, RTN 11.264 /
    11.075, GPTQ 11.228 / 11.082, AWQ 11.251 / 11.071; KL x 1e3 RTN 3.29 / 3.43, GPTQ 0.43 /
    0.45, AWQ 2.28 / 2.65."""
    model, train, held = tiny_lm()
    held = held[:128]
    ex = (train[:16, :-1],)
    cal = [(train[i:i + 16, :-1],) for i in range(0, 128, 16)]
    gm = fxpress.capture(model, ex)
    ppl, kl = {"fp32": perplexity(model, held)}, {}
    for method in ("rtn", "gptq", "awq"):
        q = run_pass(gm, fxpress.WeightOnly(bits=4, group_size=-1, method=method, skip=()), ex, cal)
        ppl[method] = perplexity(q.graph_module, held)
        kl[method] = mean_kl(model, q.graph_module, held)
    print(ppl, kl)
    assert ppl["fp32"] < 16.0  # beyond a byte-unigram model (~17 on English text; uniform 256)
    for method in ("rtn", "gptq", "awq"):
        assert ppl[method] >= 0.997 * ppl["fp32"], method  # fp32 <= each, up to seed noise
    for method in ("gptq", "awq"):
        assert ppl[method] <= 1.003 * ppl["rtn"], method
    assert kl["gptq"] < 0.5 * kl["rtn"]  # measured 0.13x
    assert kl["awq"] < kl["rtn"]  # measured 0.69x / 0.77x
