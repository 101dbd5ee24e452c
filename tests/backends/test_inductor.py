"""Inductor backend: oneDNN int8 patterns fire (pattern counters), numerics, scoped config."""
from __future__ import annotations

import os

import pytest
import torch
import torch._inductor.config as inductor_config

from fxpress.backends.compare import compare, format_compare
from fxpress.backends.inductor import compile_inductor
from fxpress.backends.lowerability import format_lowerability, lowerability

from .helpers import TinyResNet, quantized


@pytest.fixture(scope="module")
def case():
    model, gm, x = quantized(TinyResNet(), (1, 3, 16, 16))
    freezing_before = inductor_config.freezing
    run = compile_inductor(gm, (x,))
    return model, gm, x, run, freezing_before


def test_int8_conv_kernels_fired(case):
    _, _, _, run, _ = case
    k = run.report["kernels"]
    # 3 int8 convs: stem and conv1 unary, conv2 + residual add binary; prepacked once, as ATen's
    # packed oneDNN convs on VNNI/AMX hosts (test_onednn_conv.py), else by Inductor's lowering
    assert k.get("qconv") == 3 and k.get("qconv_binary") == 1
    assert k.get("qconv_packed", 0) + k.get("qconv_prepack", 0) == 3


def test_matches_quantized_ir(case):
    _, gm, x, run, _ = case
    with torch.no_grad():
        ref = gm(x)
    y = run(x)
    fc = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.linear.default)
    step = float(fc.args[0].args[1])  # the fc input's quantization step
    w = dict(gm.named_buffers()) | dict(gm.named_parameters())
    dq_w = fc.args[1]
    wq = getattr(gm, dq_w.args[0].target).float() * w[dq_w.args[1].target].reshape(-1, 1)
    # oneDNN requantizes inner int8 tensors with its own rounding, so a one-step difference in
    # an inner layer can reach the fc input: allow two fc-input steps, and an SQNR floor
    assert (y - ref).abs().max() <= 2 * step * float(wq.abs().sum(1).max())
    noise = (y - ref).pow(2).mean()
    assert 10 * torch.log10(ref.pow(2).mean() / noise) > 20


def test_global_inductor_config_untouched(case):
    *_, freezing_before = case
    assert inductor_config.freezing == freezing_before is False


def test_lowerability_reports_regions_in_module_names(case):
    _, gm, _, _, _ = case
    ort = {r.module: r for r in lowerability(gm, "onnxruntime")}
    assert ort["stem"].kernel == "QLinearConv" and ort["conv1"].kernel == "QLinearConv"
    assert ort["conv2"].note == "output requantized for the residual add"
    assert ort["fc"].kernel == "QGemm"
    ind = {r.module: r for r in lowerability(gm, "inductor")}
    from fxpress.backends import onednn_conv
    packed = onednn_conv.host_reason() is None  # VNNI/AMX: packed oneDNN convs
    assert ind["conv2"].kernel == ("fxpress.qconv2d_add (packed oneDNN)" if packed
                                   else "onednn.qconv_pointwise.binary")
    assert "regions int8" in format_lowerability(list(ort.values()), "onnxruntime")


def test_compare_per_node_sqnr(case):
    model, gm, x, run, _ = case
    import fxpress
    fp32 = fxpress.capture(model, (x,))
    rows = compare(fp32, gm, (x,), lowered=run)
    by = {(r.module, r.op): r.sqnr_db for r in rows}
    assert ("stem", "conv2d") in by and ("fc", "linear") in by
    assert all(15 < v < 80 for v in by.values())  # int8 noise: neither exact nor broken
    assert "<output 0>" in format_compare(rows)


def test_inspect_text_has_both_tables(case):
    model, gm, x, _, _ = case
    import fxpress
    from fxpress.backends.lowerability import inspect_text
    text = inspect_text(gm, "onnxruntime", reference=fxpress.capture(model, (x,)), inputs=(x,))
    assert "QLinearConv" in text and "SQNR dB" in text and "conv2" in text


def test_batch1_example_compiles_static_once_and_serves_other_batches():
    """A size-1 dynamic dim compiles static at the example's sizes (Dynamo specializes size 1:
    a symbolic warm-up graph would never run for batch 1 and the first call recompiled);
    other batch sizes compile on first use and still match the IR."""
    import fxpress
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3)).eval()
    x = torch.randn(1, 3, 12, 12)
    cm = fxpress.compress(model, (x,), fxpress.Quantize(mode="static", observer="minmax"),
                          calibration=[(torch.randn(4, 3, 12, 12),) for _ in range(4)])
    run = compile_inductor(cm.graph_module, (x,))
    assert run.report["shapes"].startswith("static at the example's sizes"), run.report["shapes"]
    assert run.report["dynamic_dims"]            # the IR's batch stays dynamic for the caller
    assert run.report["kernels"].get("qconv") == 2
    graphs = counters["stats"]["unique_graphs"]
    run(x)
    assert counters["stats"]["unique_graphs"] == graphs   # no recompile for the example's shape
    x3 = torch.randn(3, 3, 12, 12)
    with torch.no_grad():
        ref = cm(x3)
    y = run(x3)
    assert y.shape == ref.shape == (3, 8, 8, 8)
    # int8 tolerance: oneDNN may round an inner requantization the other way (>= 25 dB)
    assert 10 * torch.log10(ref.pow(2).mean() / (y - ref).pow(2).mean()) >= 25


def test_report_names_threads_and_openmp_wait_policy(case):
    r = case[3].report
    assert r["threads"] == torch.get_num_threads()
    assert r["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "default")
