"""Every weight-bearing op form is a quantization unit (issue 23 item 2, quantization part).

GPT-2's Conv1D (addmm, weight [in, out]), Falcon's matmul against a transposed parameter, an
einsum linear, weight_norm's computed conv weight, grouped / depthwise conv1d and conv3d: each
becomes a linear / conv on one constant weight (passes/quant/weight_ops.py), gets the int8 Q/DQ
form, and lowers to ORT int8 kernels.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import fxpress
from fxpress.passes.analysis.cost import node_cost
from fxpress.passes.base import PassContext
from fxpress.passes.quant.weight_ops import WeightOps

aten = torch.ops.aten
qd = torch.ops.quantized_decomposed
_LINEAR_LIKE = {aten.linear.default, aten.addmm.default, aten.matmul.default, aten.mm.default,
                aten.einsum.default}


def sqnr(ref, y) -> float:
    ref, y = ref.float(), y.float()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean().clamp_min(1e-20)))


def _weight_macs(gm) -> tuple[int, int]:
    """(MACs of linear-like ops on a parameter, of those whose weight is int8-dequantized)."""
    total = int8 = 0
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in _LINEAR_LIKE:
            continue
        operands = list(n.args[1]) if n.target is aten.einsum.default else list(n.all_input_nodes)
        params = [a for a in operands if isinstance(a, torch.fx.Node) and (
            a.op == "get_attr" or "dequantize_per_channel" in str(a.target)
            or (a.target in (aten.t.default, aten.numpy_T.default) and a.args[0].op == "get_attr"))]
        if not params:
            continue
        macs = node_cost(gm, n).macs
        total += macs
        if any("dequantize" in str(a.target) for a in params):
            int8 += macs
    return total, int8


def _gpt2():
    from transformers import GPT2Config, GPT2Model
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=128, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                     bos_token_id=127, eos_token_id=127)
    return GPT2Model(cfg).eval()


def _falcon():
    from transformers import FalconConfig, FalconModel
    torch.manual_seed(0)
    return FalconModel(FalconConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2,
                                    num_attention_heads=4)).eval()


def _ids(seed, batch=2, seq=16):
    return (torch.randint(0, 128, (batch, seq), generator=torch.Generator().manual_seed(seed)),)


@pytest.mark.parametrize("family,form,count", [("gpt2", "addmm", 8), ("falcon", "matmul", 8)])
def test_hf_projection_forms_are_dynamic_int8_kernels(family, form, count, tmp_path):
    """GPT-2 (Conv1D = addmm) and Falcon (matmul against numpy_T(weight)) under the default
    Quantize(mode="dynamic"): every projection is int8 in the IR (>= 90 % of the linear-like MACs;
    before: 0 %), one DynamicQuantizeMatMul per projection in ORT, and the .onnx shrinks."""
    model = {"gpt2": _gpt2, "falcon": _falcon}[family]()
    x = _ids(0)
    fp32_ir = fxpress.capture(model, x)
    total_fp32, _ = _weight_macs(fp32_ir)
    cm = fxpress.compress(model, x, fxpress.Quantize(mode="dynamic"))
    assert cm.report.passes[0].stats == {form: count}
    total, int8 = _weight_macs(cm.graph_module)
    assert total == total_fp32 and int8 >= 0.9 * total, (int8, total)
    targets = [n.target for n in cm.graph_module.graph.nodes]
    assert aten.addmm.default not in targets
    linears = [n for n in cm.graph_module.graph.nodes if n.target is aten.linear.default]
    assert len(linears) == count
    assert all(n.args[1].target is qd.dequantize_per_channel.default for n in linears)
    y = _ids(5, batch=3, seq=16)
    with torch.no_grad():
        ref = model(*y).last_hidden_state
        assert sqnr(ref, cm(*y).last_hidden_state) > 30      # measured: GPT-2 43 dB, Falcon 39 dB
    run = fxpress.lower(cm, "onnxruntime", example_inputs=x)
    assert run.report["kernels"].get("DynamicQuantizeMatMul", 0) == count, run.report["kernels"]
    with torch.no_grad():
        assert sqnr(cm(*y).last_hidden_state, run(*y).last_hidden_state) > 30
    fp32 = fxpress.lower(fp32_ir, "onnxruntime", example_inputs=x)
    small = _initializer_bytes(run.save(tmp_path / "int8.onnx"))
    big = _initializer_bytes(fp32.save(tmp_path / "fp32.onnx"))
    assert small < 0.4 * big, (small, big)          # measured: GPT-2 0.30, Falcon 0.29


def _initializer_bytes(path) -> int:
    import onnx
    from onnx import numpy_helper
    model = onnx.load(str(path))
    return sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer)


class _Einsum(torch.nn.Module):
    """Mamba-style mixer projections written as einsums and a matmul on a parameter."""

    def __init__(self):
        super().__init__()
        self.w_in = torch.nn.Parameter(torch.randn(24, 16) / 4)   # [out, in]: "bld,ed->ble"
        self.w_mid = torch.nn.Parameter(torch.randn(24, 24) / 5)  # [in, out]: "...d,de->...e"
        self.w_out = torch.nn.Parameter(torch.randn(24, 8) / 5)   # [in, out]: x @ W
        self.mix = torch.nn.Parameter(torch.randn(4, 12, 12) / 4)  # batched: no linear form

    def forward(self, x):
        h = torch.einsum("bld,ed->ble", x, self.w_in).relu()
        h = torch.einsum("...d,de->...e", h, self.w_mid)
        g = torch.matmul(h[..., :12].unsqueeze(1), self.mix)
        return torch.matmul(h, self.w_out), g


def test_einsum_and_matmul_on_parameters_become_linears_exactly():
    torch.manual_seed(0)
    model = _Einsum().eval()
    x = (torch.randn(2, 12, 16),)
    gm = fxpress.capture(model, x)
    with torch.no_grad():
        ref = gm(*x)
    res = WeightOps().run(gm, PassContext(example_inputs=x))
    gm, modified, stats = res.graph_module, res.modified, res.stats
    assert modified and stats["einsum"] == 2 and stats["matmul"] == 1, stats
    assert [r["why"] for r in stats["left"]] == [
        "3-D constant operand (batched weights have no linear form)"]
    targets = [n.target for n in gm.graph.nodes]
    assert targets.count(aten.linear.default) == 3 and aten.einsum.default not in targets
    with torch.no_grad():
        for a, b in zip(ref, gm(*x)):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)   # the same function


class _Convs(torch.nn.Module):
    """wav2vec2's positional conv (weight_norm, grouped conv1d), a depthwise conv1d, a conv3d."""

    def __init__(self):
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm
        self.pre = torch.nn.Conv1d(8, 16, 3, padding=1)
        self.pos = weight_norm(torch.nn.Conv1d(16, 16, 5, padding=2, groups=4), name="weight", dim=2)
        self.dw = torch.nn.Conv1d(16, 16, 3, padding=1, groups=16)
        self.c3 = torch.nn.Conv3d(16, 8, 1)

    def forward(self, x):
        y = self.pre(x)
        y = y + torch.nn.functional.gelu(self.pos(y))
        y = self.dw(y).relu()
        return self.c3(y[:, :, None, :, None]).flatten(1)


def test_weight_norm_grouped_depthwise_and_3d_convs_quantize_static_to_ort_int8():
    """Before: PassError 'quant_convert' ... only one element tensors can be converted to Python
    scalars (weight_norm's computed weight observed as an activation). Now it is folded to one
    constant, and all four convs are QLinearConv in ORT."""
    torch.manual_seed(0)
    model = _Convs().eval()
    x = (torch.randn(2, 8, 32),)
    calib = [(torch.randn(2, 8, 32),) for _ in range(4)]
    cm = fxpress.compress(model, x, fxpress.Quantize(mode="static"), calibration=calib)
    assert cm.report.passes[0].stats == {"computed_weight": 1}
    targets = [n.target for n in cm.graph_module.graph.nodes]
    assert targets.count(qd.dequantize_per_channel.default) == 4
    assert aten._weight_norm_interface.default not in targets
    assert dict(model.named_parameters())["pos.parametrizations.weight.original0"].dim() == 3
    with torch.no_grad():
        ref, ir = model(*x), cm(*x)
    assert sqnr(ref, ir) > 30                                 # measured 40 dB
    run = fxpress.lower(cm, "onnxruntime", example_inputs=x, calibration=calib)
    assert run.report["kernels"].get("QLinearConv") == 4, run.report["kernels"]
    assert "Conv" not in run.report["kernels"]
    with torch.no_grad():
        assert sqnr(ir, run(*x)) > 40                         # measured 52 dB


def test_dynamic_mode_on_a_conv_net_warns_static_is_the_mode_for_convs():
    torch.manual_seed(0)
    model = _Convs().eval()
    x = (torch.randn(2, 8, 32),)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cm = fxpress.compress(model, x, fxpress.Quantize(mode="dynamic"))
    msgs = [str(w.message) for w in caught if isinstance(w.message, fxpress.errors.CoverageWarning)]
    assert any("mode='static'" in m and "conv" in m for m in msgs), msgs
    with torch.no_grad():
        torch.testing.assert_close(cm(*x), model(*x))          # nothing quantized, same function
