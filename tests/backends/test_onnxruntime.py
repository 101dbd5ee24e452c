"""ONNX Runtime backend: the int8 kernels really run (ORT's optimized graph), numerics, save, fallback."""
from __future__ import annotations

import functools
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fxpress
from fxpress.backends.onnxruntime import compile_onnxruntime

from .helpers import TinyMLP, TinyResNet, batches, quantized


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean().clamp_min(1e-20)))


@pytest.fixture(scope="module")
def static_case():
    model, gm, x = quantized(TinyResNet(), (1, 3, 16, 16))
    return model, gm, x, compile_onnxruntime(gm, (x,), calibration=batches((1, 3, 16, 16)))


def test_static_int8_kernels_run(static_case):
    _, gm, _, run = static_case
    k = run.report["kernels"]
    # every conv is a QLinearConv (none left in fp32), the residual add is QLinearAdd, fc is QGemm
    assert k.get("QLinearConv") == 3 and "Conv" not in k and "FusedConv" not in k
    assert k.get("QLinearAdd") == 1 and "Add" not in k
    assert k.get("QGemm") == 1 and "Gemm" not in k
    assert k.get("DequantizeLinear", 0) == 0  # no Q/DQ island left in the optimized graph
    assert run.report["requantized_outputs"] == ["conv2"]
    assert run.report["fallback"] == []


def _attr(gm, target):
    return functools.reduce(getattr, target.split("."), gm)


def test_static_matches_quantized_ir_within_one_step(static_case):
    _, gm, x, run = static_case
    gm = run.graph_module  # the IR ORT runs: the input IR plus conv2's requantization
    with torch.no_grad():
        ref = gm(x)
    y = run(x)
    # fc's input is quantized: one step there moves an output by at most s_in * max_row |W|_1
    fc = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    dq_x, dq_w = fc.args[0], fc.args[1]
    w = _attr(gm, dq_w.args[0].target).float() * _attr(gm, dq_w.args[1].target).reshape(-1, 1)
    step = float(dq_x.args[1]) * float(w.abs().sum(1).max())
    assert (y - ref).abs().max() <= step
    assert sqnr(ref, y) > 25


def test_save_is_plain_onnx(static_case, tmp_path):
    _, _, x, run = static_case
    path = run.save(tmp_path / "m.onnx")
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    int8 = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
    assert sum(i.data_type in int8 and len(i.dims) >= 2 for i in model.graph.initializer) == 4
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(out, run(x).numpy(), atol=1e-5)


def test_dynamic_linear_uses_dynamic_int8_kernel():
    model, gm, x = quantized(TinyMLP(), (2, 8, 32), dynamic=True)
    run = compile_onnxruntime(gm, (x,))
    assert run.report["kernels"].get("DynamicQuantizeMatMul") == 2
    assert "MatMul" not in run.report["kernels"]
    with torch.no_grad():
        ref, fp = gm(x), model(x)
    assert sqnr(fp, run(x)) > 30 and sqnr(ref, run(x)) > 30


def test_fp32_graph_matches_eager():
    model = TinyResNet().eval()
    x = torch.randn(2, 3, 16, 16)
    run = fxpress.lower(model, "onnxruntime", example_inputs=(x,))
    assert run.report["kernels"].get("FusedConv", 0) + run.report["kernels"].get("Conv", 0) >= 3
    torch.testing.assert_close(run(x), model(x), atol=1e-4, rtol=1e-4)


class _Cumsum(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 4)

    def forward(self, x):
        return self.b(torch.cumsum(self.a(x), dim=-1))


def test_ops_the_old_table_lacked_export_as_one_graph(tmp_path):
    # cumsum had no rule in the hand-written table (it ran in a PyTorch partition); torchlib has one
    model = _Cumsum().eval()
    x = torch.randn(3, 8)
    run = fxpress.lower(model, "onnxruntime", example_inputs=(x,))
    assert run.report["fallback"] == [] and run.report["partitions"] == 1
    assert run.report["onnx_ops"].get("CumSum") == 1
    torch.testing.assert_close(run(x), model(x), atol=1e-5, rtol=1e-5)
    run.save(tmp_path / "c.onnx")


@torch.library.custom_op("fxpress_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class _Custom(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(8, 8)

    def forward(self, x):
        return _twice(self.a(x))


def test_op_nobody_translates_is_unsupported_op_error():
    with pytest.raises(fxpress.UnsupportedOpError, match="fxpress_test.twice.default") as e:
        fxpress.lower(_Custom().eval(), "onnxruntime", example_inputs=(torch.randn(3, 8),))
    assert e.value.node_name == "twice"


@pytest.fixture(scope="module")
def ours_static():
    torch.manual_seed(0)
    data = batches((2, 3, 16, 16))
    cm = fxpress.compress(TinyResNet().eval(), data[0], fxpress.Quantize(mode="static"),
                          calibration=data)
    return cm, fxpress.lower(cm, "onnxruntime", calibration=data)


def test_dynamic_batch_kept_in_the_saved_onnx(ours_static, tmp_path):
    _, run = ours_static
    assert run.report["kernels"].get("QLinearConv") == 3
    assert run.report["dynamic_dims"] == {"x": {0: "batch"}}
    path = run.save(tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch"
    x3 = torch.randn(3, 3, 16, 16)
    out = sess.run(None, {"x": x3.numpy()})[0]
    with torch.no_grad():
        ref = run.graph_module(x3)
    assert out.shape == (3, 10) and sqnr(ref, torch.from_numpy(out)) > 25
    with pytest.raises(fxpress.InputError):
        run(x3, x3)                     # a one-input model called with two
    with pytest.raises(fxpress.InputError):
        run(torch.randn(3, 4, 16, 16))  # a static dim (channels) that differs


@pytest.fixture(scope="module")
def bert_dynamic():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64,
                                 max_position_embeddings=64)).eval()
    enc = {"input_ids": torch.randint(0, 100, (2, 16)),
           "attention_mask": torch.ones(2, 16, dtype=torch.long)}
    b, s = torch.export.Dim("batch"), torch.export.Dim("seq", max=64)
    cm = fxpress.compress(model, (), fxpress.Quantize(mode="dynamic"), example_kwargs=enc,
                          dynamic_shapes={"input_ids": {0: b, 1: s}, "attention_mask": {0: b, 1: s}})
    return model, cm, fxpress.lower(cm, "onnxruntime")


def test_hf_bert_kwargs_dynamic_batch_and_seq_returns_model_output(bert_dynamic, tmp_path):
    model, cm, run = bert_dynamic
    assert run.report["fallback"] == [] and run.report["partitions"] == 1
    assert run.report["kernels"].get("DynamicQuantizeMatMul", 0) >= 6   # q, k, v, o, ffn x2
    dims = run.report["dynamic_dims"]
    assert dims["input_ids"][0] == "batch" and dims["attention_mask"][1] == dims["input_ids"][1]
    ids = torch.randint(0, 100, (3, 24))
    mask = torch.ones(3, 24, dtype=torch.long)
    mask[0, 20:] = 0
    out = run(input_ids=ids, attention_mask=mask)
    with torch.no_grad():
        ref = cm(input_ids=ids, attention_mask=mask)
        fp = model(input_ids=ids, attention_mask=mask)
    assert type(out) is type(ref) is type(fp)       # a ModelOutput, not a tuple
    assert sqnr(ref.last_hidden_state, out.last_hidden_state) > 25
    assert sqnr(fp.last_hidden_state, out.last_hidden_state) > 20
    sess = ort.InferenceSession(str(run.save(tmp_path / "bert.onnx")),
                                providers=["CPUExecutionProvider"])
    saved = sess.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    assert sqnr(out.last_hidden_state, torch.from_numpy(saved[0])) > 40
    with pytest.raises(fxpress.InputError, match="input_ids"):
        run(input_ids=ids.float(), attention_mask=mask)


def test_transformer_fusion_decided_by_timing_and_recorded(bert_dynamic):
    _, cm, run = bert_dynamic
    d = run.report["transformer_fusion"]
    fused_ops = {"SkipLayerNormalization", "BiasGelu", "Attention", "MultiHeadAttention"}
    in_model = {n.op_type for n in run.onnx_model.graph.node} & fused_ops
    if "plain_ms" in d:   # a fusion matched: the faster graph of the two timings is the one kept
        assert d["applied"] == (d["fused_ms"] < d["plain_ms"]) and d["fused_ops"]
    assert bool(in_model) == d["applied"], d


def test_transformer_fusion_forced_on_keeps_numerics():
    from transformers import BertConfig, BertModel
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=64,
                                 max_position_embeddings=64)).eval()
    ids = torch.randint(0, 100, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    run = fxpress.lower(model, "onnxruntime", example_inputs=(ids, mask), transformer_fusion="on")
    d = run.report["transformer_fusion"]
    assert d["applied"] and "SkipLayerNormalization" in d["fused_ops"], d
    assert "SkipLayerNormalization" in {n.op_type for n in run.onnx_model.graph.node}
    with torch.no_grad():
        ref = model(ids, mask)
    assert sqnr(ref.last_hidden_state, run(ids, mask).last_hidden_state) > 60


def test_inspect_reports_the_real_lowering(static_case):
    from fxpress.backends.lowerability import inspect_text
    _, gm, x, run = static_case
    text = inspect_text(gm, "onnxruntime", lowered=run)
    counts = {ln.split()[0]: int(ln.split()[1]) for ln in text.splitlines()[1:]
              if ln.startswith("  ") and len(ln.split()) >= 2 and ln.split()[1].isdigit()}
    assert counts == run.report["kernels"]          # ORT's optimized graph, counted, not predicted
    assert any(ln.split()[:3] == ["QLinearConv", "3", "int8"] for ln in text.splitlines())


def test_conv_add_separate_lowers_to_ort_exactly():
    """Quantize(conv_add="separate") gives the residual conv its own Q/DQ in the IR, so the ORT
    lowering adds no requantization (QLinearConv -> QLinearAdd) and runs the IR's numerics;
    the default "fuse" form (Inductor's conv+add kernel) is requantized at lowering."""
    torch.manual_seed(0)
    model = TinyResNet().eval()
    data = batches((2, 3, 16, 16))
    x = data[0][0]
    runs = {}
    for form in ("fuse", "separate"):
        cm = fxpress.compress(model, (x,), fxpress.Quantize(mode="static", conv_add=form),
                              calibration=data)
        run = fxpress.lower(cm, "onnxruntime", calibration=data)
        with torch.no_grad():
            runs[form] = (run.report, sqnr(cm(x), run(x)))
    fuse, separate = runs["fuse"], runs["separate"]
    assert fuse[0]["requantized_outputs"] == ["conv2"]
    assert separate[0]["requantized_outputs"] == []
    k = separate[0]["kernels"]
    assert k.get("QLinearConv") == 3 and k.get("QLinearAdd") == 1 and "Conv" not in k
    assert separate[1] > 60, separate[1]     # only ORT's own rounding differs from the IR


def test_conv_add_is_a_checked_choice():
    with pytest.raises(fxpress.RecipeError, match="conv_add"):
        fxpress.Quantize(conv_add="fused")


def test_batch_baked_in_by_a_pass_exports_static_with_a_warning():
    """An IR whose signature says the batch is dynamic but whose graph reshapes to the
    example's batch (what a careless pass does) exports static at the example's sizes, with
    one warning naming why, and serves that size."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).eval()
    x = torch.randn(2, 8)
    gm = fxpress.capture(model, (x,))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    last = out.args[0][0] if isinstance(out.args[0], (tuple, list)) else out.args[0]
    with gm.graph.inserting_after(last):
        baked = gm.graph.call_function(torch.ops.aten.reshape.default, (last, [2, 4]))
    last.replace_all_uses_with(baked, delete_user_cb=lambda n: n is not baked)
    gm.recompile()
    with pytest.warns(UserWarning, match="cannot stay dynamic"):
        run = compile_onnxruntime(gm, (x,), threads=1)
    assert run.report["dynamic_dims"] == {}
    torch.testing.assert_close(run(x), model(x), atol=1e-5, rtol=1e-5)
