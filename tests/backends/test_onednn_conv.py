"""Int8 convs on ATen's prepacked oneDNN conv inside the Inductor graph (backends/onednn_conv.py):
which convs it takes, numerics against the IR and Inductor's own qconv path, other batch
sizes, the host guard, handle lifetime, bad input."""
from __future__ import annotations

import gc

import pytest
import torch

import fxpress
from fxpress import hw
from fxpress.backends import onednn_conv
from fxpress.backends.base import flat_graph
from fxpress.backends.inductor import compile_inductor
from fxpress.errors import InputError, RecipeError
from tests.models import resnet18

OK, WHY = onednn_conv.available()
needs_packed = pytest.mark.skipif(not OK, reason=f"packed oneDNN convs unavailable here: {WHY}")
AVX2 = ("avx", "avx2", "fma", "sse4_2")


@pytest.fixture(scope="module")
def resnet_ir():
    """ResNet-18 (width 8) under fxpress.Quantize static: 20 convs, 8 of them with the residual
    add (+ relu) fused, each requantized."""
    torch.manual_seed(0)
    model = resnet18(width=8, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(1, 3, 64, 64, generator=g),) for _ in range(4)]
    cm = fxpress.compress(model, data[0], [fxpress.Quantize(mode="static")], calibration=data)
    return cm.graph_module, data


def _sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (y - ref).pow(2).sum().clamp_min(1e-30)))


@needs_packed
def test_every_requantized_conv_runs_packed(resnet_ir):
    gm, data = resnet_ir
    nodes_before = len(gm.graph.nodes)
    run = compile_inductor(gm, data[0], wrapper="python")
    assert run.report["packed_convs"] == "20 convs"
    # the stem is packed as it is; conv_add="auto" residual Q/DQ dropped for conv + add fusion
    assert run.report["rewrites"] == {"onednn_packed_conv": 20, "conv_add_fused": 8}
    k = run.report["kernels"]
    assert k["qconv_packed"] == 20 and k["qconv"] == 20 and k["qconv_binary"] == 8
    assert "qconv_prepack" not in k  # no conv left to Inductor's qconv lowering
    ops = [n.target for n in run._flat.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.conv2d.default not in ops
    assert ops.count(torch.ops.fxpress.qconv2d_add.default) == 8
    assert len(gm.graph.nodes) == nodes_before  # the user's IR is untouched
    assert any("weight_int8" in name for name, _ in gm.named_buffers())


@needs_packed
@pytest.mark.parametrize("wrapper", ["python", "cpp"])
def test_matches_the_ir_and_inductors_own_qconvs(resnet_ir, wrapper):
    gm, data = resnet_ir
    packed = compile_inductor(gm, data[0], wrapper=wrapper)
    own = compile_inductor(gm, data[0], wrapper="python", packed_convs="off")
    assert packed.report["wrapper"] == wrapper and own.report["packed_convs"] == "off"
    for (x,) in data[1:3]:
        ref, y, y_own = gm(x), packed(x), own(x)
        # the same int32 sums; requantization rounds in fp32 in both: > 30 dB from the IR,
        # as close as Inductor's own kernels are
        assert _sqnr(ref, y) > 30 and _sqnr(ref, y) > _sqnr(ref, y_own) - 3, (_sqnr(ref, y), _sqnr(ref, y_own))
        assert (y.argmax(-1) == ref.argmax(-1)).all()


@needs_packed
def test_another_batch_size(resnet_ir):
    gm, data = resnet_ir
    run = compile_inductor(gm, data[0], wrapper="python")
    x3 = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(7))
    assert _sqnr(gm(x3), run(x3)) > 30
    x5 = torch.randn(5, 3, 64, 64, generator=torch.Generator().manual_seed(8))
    assert _sqnr(gm(x5), run(x5)) > 30
    assert run.report["kernels"]["qconv_packed"] == 20


def test_hosts_without_vnni_keep_inductors_qconvs(resnet_ir):
    gm, data = resnet_ir
    with hw.simulate(AVX2):
        ok, why = onednn_conv.available()
        assert not ok and "VNNI" in why
        run = compile_inductor(gm, data[0], wrapper="python")
        assert onednn_conv.packed_onednn_convs(flat_graph(gm)) == []
    assert run.report["packed_convs"].startswith("off (no VNNI/AMX")
    assert "qconv_packed" not in run.report["kernels"] and run.report["kernels"]["qconv"] >= 19
    off = compile_inductor(gm, data[0], wrapper="python", packed_convs="off")
    assert off.report["packed_convs"] == "off"
    with pytest.raises(RecipeError, match="packed_convs"):
        compile_inductor(gm, data[0], packed_convs="on")


@needs_packed
def test_packed_weights_are_released_with_the_lowered_model(resnet_ir):
    gm, data = resnet_ir
    flat = flat_graph(gm)
    handles = onednn_conv.packed_onednn_convs(flat)
    assert len(handles) == 20
    x = data[0][0]
    assert _sqnr(gm(x), flat(x)[0]) > 30  # the rewritten graph runs as plain fx too

    class Owner:
        pass
    owner = Owner()
    onednn_conv.release_when_collected(owner, handles)
    del owner
    gc.collect()
    with pytest.raises(RuntimeError, match=f"no packed convolution with handle {handles[0]}"):
        flat(x)


@needs_packed
def test_bad_input_names_the_operand(resnet_ir):
    gm, data = resnet_ir
    flat = flat_graph(gm)
    (h, *_) = onednn_conv.packed_onednn_convs(flat)
    with pytest.raises(RuntimeError, match="input must be a 4-D uint8 CPU tensor, got Float"):
        torch.ops.fxpress.qconv2d(torch.rand(1, 3, 8, 8), h, 0.1, 0, 0.1, 0, False)
    run = compile_inductor(gm, data[0], wrapper="python")
    with pytest.raises(InputError, match="x"):
        run(torch.rand(1, 4, 64, 64))  # the lowered model checks its inputs first


def test_static_compile_is_called_without_dynamo(resnet_ir):
    """At the example's shapes the lowered model calls Inductor's compiled graph directly
    (torch._inductor.compile: no guard check); another layout or size goes through Dynamo."""
    gm, data = resnet_ir
    run = compile_inductor(gm, data[0], wrapper="python")
    assert run.report["call"].startswith("direct") and run._direct is not None
    x = data[1][0]
    y = run(x)
    assert _sqnr(gm(x), y) > 30
    xc = x.contiguous(memory_format=torch.channels_last)  # other strides: not the direct graph
    torch.testing.assert_close(run(xc), y, atol=1e-5, rtol=0)


@needs_packed
def test_hf_resnet_unmodified_at_another_batch():
    """An unmodified HF ResNet (transformers config, random weights), compressed at batch 2 and
    called at batch 3 as HF models are called: same output type, > 25 dB from the IR, every
    requantized conv packed, and as close to the IR as Inductor's own qconvs."""
    from tests.zoo.models import CASES, example
    from tests.zoo.test_zoo import main_output, sqnr
    case = CASES["resnet"]
    model, kw, dyn = case.build(batch=2)
    calib = [tuple(example(case.inputs, 2, seed=s).values()) for s in range(2)]
    cm = fxpress.compress(model, tuple(kw.values()), fxpress.Quantize(mode="static"),
                          dynamic_shapes=tuple(dyn.values()), calibration=calib)
    run = fxpress.lower(cm, "inductor")
    own = fxpress.lower(cm, "inductor", packed_convs="off")
    assert run.report["packed_convs"] == "6 convs" and run.report["kernels"]["qconv_packed"] == 6
    x3 = tuple(example(case.inputs, 3, seed=7).values())
    ir, out = cm(*x3), run(*x3)
    assert type(out) is type(model(*x3))
    assert sqnr(main_output(ir), main_output(out)) > 25
    assert sqnr(main_output(ir), main_output(out)) >= sqnr(main_output(ir), main_output(own(*x3))) - 3


@pytest.fixture(scope="module")
def mobilenet_ir():
    """A small MobileNetV2 (ReLU6 after every expand and depthwise conv) under static int8:
    the ReLU6 convs are the ones a relu-only match left to Inductor's own qconv lowering."""
    from tests.models import mobilenet_v2
    model = mobilenet_v2(small=True, num_classes=10).eval()
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(1, 3, 64, 64, generator=g),) for _ in range(4)]
    cm = fxpress.compress(model, data[0], [fxpress.Quantize(mode="static")], calibration=data)
    return cm.graph_module, data


_HARDTANH = (torch.ops.aten.hardtanh.default, torch.ops.aten.hardtanh_.default)


def _relu6_convs(gm) -> int:
    return sum(1 for n in gm.graph.nodes if n.target in _HARDTANH)


@needs_packed
def test_relu6_convs_run_packed_and_match_the_ir(mobilenet_ir):
    """conv -> ReLU6 -> quantize is conv + relu post-op where quantize(6) is the top u8 code
    (the observer of a ReLU6 output puts it there): every conv of the net runs packed, with
    the IR's numbers (as close as Inductor's own qconvs, > 30 dB)."""
    gm, data = mobilenet_ir
    n_convs = sum(1 for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default)
    assert _relu6_convs(gm) >= 10
    run = compile_inductor(gm, data[0], wrapper="python")
    own = compile_inductor(gm, data[0], wrapper="python", packed_convs="off")
    kinds = [r["kernel"] for r in run.report["layers"] if r["op"] == "conv2d"]
    assert len(kinds) == n_convs and all(k.startswith("packed oneDNN conv") for k in kinds), kinds
    assert "qconv_prepack" not in run.report["kernels"]
    ops = [n.target for n in run._flat.graph.nodes if n.op == "call_function"]
    assert not any(t in ops for t in _HARDTANH)
    for (x,) in data[1:3]:
        ref, y = gm(x), run(x)
        assert _sqnr(ref, y) > 30 and _sqnr(ref, y) > _sqnr(ref, own(x)) - 3, (_sqnr(ref, y), _sqnr(ref, own(x)))


@needs_packed
def test_a_clamp_below_the_quantized_range_stays_on_inductor(mobilenet_ir):
    """A clamp whose bound quantizes below 255 is not a relu: that conv is left as it was
    (here the first ReLU6 turned into clamp(0, 0.1) under the observer's 6-wide scale)."""
    gm, data = mobilenet_ir
    flat = flat_graph(gm)
    clamp = next(n for n in flat.graph.nodes if n.target in _HARDTANH)
    clamp.args = (clamp.args[0], 0.0, 0.1)
    flat.recompile()
    handles = onednn_conv.packed_onednn_convs(flat)
    onednn_conv.release_when_collected(flat, handles)
    left = [n for n in flat.graph.nodes if n.target == torch.ops.aten.conv2d.default]
    assert len(left) == 1 and left[0] is clamp.args[0]
    assert _relu6_convs(flat) == 1
    assert len(handles) == sum(1 for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default) - 1
    assert _relu6_convs(gm) == 13  # the IR itself is untouched
    # the edited graph still runs, the clamped conv in float Q/DQ form beside the packed ones
    assert torch.isfinite(flat(data[1][0])[0]).all()
