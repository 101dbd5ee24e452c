"""fxpress's own static int8 IR lowers to fully-int8 kernels, like torchao's PT2E IR does.

A ResNet-style net (stem conv+bn+relu, maxpool, a plain and a downsampling residual block,
global avgpool, flatten, fc) quantized with ``fxpress.Quantize(mode="static")``:
- ORT: the optimized graph holds only int8 kernels (QLinearConv / QLinearAdd / QGemm / pools),
  one QuantizeLinear on the network input and one DequantizeLinear on the network output;
- Inductor: the oneDNN qconv / qconv-binary (conv+add+relu) / qlinear patterns fire at least
  as often as on torchao's X86InductorQuantizer IR of the same model;
- numerics: ORT within one output quantization step of the IR it runs; with
  ``Quantize(reduce_range=True)`` s8 weights give bit-identical results to exact u8 weights.
"""
from __future__ import annotations

import os
import tempfile

import onnx
import onnxruntime as ort
import pytest
import torch

import fxpress
from bench.peers import pt2e_quantize
from fxpress.backends.inductor import compile_inductor
from fxpress.backends.lowerability import format_lowerability, lowerability
from fxpress.backends.onnx import has_vnni
from fxpress.backends.onnxruntime import compile_onnxruntime, session_options
from tests.models import resnet

SHAPE = (2, 3, 32, 32)
N_CONV, N_ADD = 6, 2   # stem, 2 + 2 block convs, 1 downsample; two residual adds
ORT_INT8_OK = {"QLinearConv", "QLinearAdd", "QGemm", "QLinearGlobalAveragePool", "NhwcMaxPool",
               "QuantizeLinear", "DequantizeLinear", "Reshape", "Transpose",
               "SpaceToDepth"}  # u8 data movement of the space-to-depth stem (backends/stem.py)


def _data(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*SHAPE, generator=g),) for _ in range(n)]


@pytest.fixture(scope="module")
def net():
    model = resnet((1, 1), width=8, num_classes=10)
    data = _data()
    gm = fxpress.compress(model, data[0], fxpress.Quantize(mode="static", observer="minmax"),
                          calibration=data).graph_module
    return model, data, gm


@pytest.fixture(scope="module")
def ort_run(net):
    _, data, gm = net
    return compile_onnxruntime(gm, data[0], calibration=data, threads=1)


def _optimized(model: onnx.ModelProto) -> onnx.GraphProto:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(model.SerializeToString(), session_options(1, "all", path),
                             providers=["CPUExecutionProvider"])
        return onnx.load(path).graph


def test_ort_graph_has_no_fp32_islands(net, ort_run):
    _, _, gm = net
    rows = lowerability(gm, "onnxruntime")
    assert all(r.int8 for r in rows), format_lowerability(rows, "onnxruntime")
    k = ort_run.report["kernels"]
    assert set(k) <= ORT_INT8_OK, k                    # no Conv / FusedConv / Add / Relu / Gemm
    assert k["QLinearConv"] == N_CONV and k["QLinearAdd"] == N_ADD and k["QGemm"] == 1
    assert k["QLinearGlobalAveragePool"] == 1 and k["NhwcMaxPool"] == 1
    assert k["QuantizeLinear"] == 1 and k.get("DequantizeLinear", 0) == 1
    g = _optimized(ort_run.onnx_model)
    q = [n for n in g.node if n.op_type == "QuantizeLinear"]
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert q[0].input[0] == g.input[0].name           # the one Q quantizes the network input
    consumers = [n for n in g.node if dq[0].output[0] in n.input]
    outs = {o.name for o in g.output}
    assert dq[0].output[0] in outs or all(n.op_type == "Identity" and n.output[0] in outs
                                          for n in consumers)  # ... the one DQ makes its output


def test_ort_within_one_output_step_of_ir(ort_run):
    ir = ort_run.graph_module          # the IR ORT runs (residual conv outputs requantized)
    out_q = next(n for n in ir.graph.nodes if n.op == "output").args[0]
    out_q = out_q[0] if isinstance(out_q, (tuple, list)) else out_q
    step = float(out_q.args[0].args[1])   # output DQ <- Q(linear, scale, ...)
    for (x,) in _data(3, seed=1):
        with torch.no_grad():
            ref = ir(x)
        y = ort_run(x)
        # integer accumulation vs the IR's float math flips some roundings upstream; these
        # land as at most one step of the quantized output (a quarter of the logits move)
        assert float((y - ref).abs().max()) <= step * 1.001
        sqnr = 10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean().clamp_min(1e-20))
        assert float(sqnr) > 30.0


def test_inductor_fires_at_least_torchao_patterns(net):
    model, data, gm = net
    ref = pt2e_quantize(model, data[0], data)
    ours = compile_inductor(gm, data[0]).report["kernels"]
    theirs = compile_inductor(ref, data[0]).report["kernels"]
    for fam in ("qconv", "qconv_binary", "qlinear", "qmaxpool2d"):
        assert ours.get(fam, 0) >= theirs.get(fam, 0), (fam, ours, theirs)
    assert ours["qconv"] == N_CONV and ours["qconv_binary"] == N_ADD and ours["qlinear"] == 1
    rows = lowerability(gm, "inductor")
    binary = [r for r in rows if r.kernel.endswith(".binary") or "qconv2d_add" in r.kernel]
    assert len(binary) == N_ADD, format_lowerability(rows, "inductor")


def test_reduce_range_s8_weights_exact_and_chosen(net):
    model, data, gm8 = net
    gm7 = fxpress.compress(model, data[0], fxpress.Quantize(observer="minmax", reduce_range=True),
                           calibration=data).graph_module
    dq = [n for n in gm7.graph.nodes if n.target is torch.ops.quantized_decomposed.dequantize_per_channel.default]
    assert len(dq) == N_CONV + 1 and all(n.args[4:6] == (-64, 64) for n in dq)
    auto = compile_onnxruntime(gm7, data[0], calibration=data, threads=1)
    assert auto.report["int8_weights"] == {"s8": N_CONV + 1}   # every weight provably exact as s8
    u8 = compile_onnxruntime(gm7, data[0], calibration=data, threads=1, int8_weights="u8")
    # u8 x u8 kernels are exact; s8 ones are too when |w| <= 64 (no int16 pair saturation)
    for (x,) in _data(2, seed=2):
        assert torch.equal(auto(x), u8(x))
    full = compile_onnxruntime(gm8, data[0], calibration=data, threads=1).report["int8_weights"]
    assert full == ({"s8": N_CONV + 1} if has_vnni() else {"u8": N_CONV + 1})


def test_simulated_avx2_host_shifts_saturating_weights_to_u8(net):
    from fxpress import hw
    _, data, gm8 = net
    with hw.simulate(flags={"avx", "avx2", "fma", "f16c"}, cpu_name="znver4"):
        assert not has_vnni()
        run = compile_onnxruntime(gm8, data[0], calibration=data, threads=1)
    # full-range int8 weights would saturate vpmaddubsw's int16 pair sums: all go u8, exact
    assert run.report["int8_weights"] == {"u8": N_CONV + 1}
    assert run.report["kernels"]["QLinearConv"] == N_CONV
    ref = compile_onnxruntime(gm8, data[0], calibration=data, threads=1, int8_weights="u8")
    assert torch.equal(run(data[1][0]), ref(data[1][0]))


def test_ort_spinning_off_reaches_the_session(net):
    """bench/run.py opens every ORT session (peers and fxpress) with intra-op spinning off."""
    _, data, gm = net
    run = compile_onnxruntime(gm, data[0], calibration=data, threads=1, spinning=False)
    opts = run.session.session.get_session_options()
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    with pytest.raises(RuntimeError, match="allow_spinning"):  # by default no entry: ORT's own
        session_options(1).get_session_config_entry("session.intra_op.allow_spinning")  # (on)
