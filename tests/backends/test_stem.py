"""Space-to-depth stems (fxpress/backends/stem.py): exact on the IR, on ORT and on Inductor."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxpress
from fxpress import hw
from fxpress.backends.base import flat_graph
from fxpress.backends.inductor import _cpp_wrapper, compile_inductor
from fxpress.backends.onnxruntime import compile_onnxruntime
from fxpress.backends.stem import _plan, s2d_weight, space_to_depth_stems

_CASES = [(7, 2, 3, 32), (3, 2, 1, 16), (4, 4, 0, 16), (5, 2, 2, 20), (3, 2, 0, 18)]


@pytest.mark.parametrize("k,s,p,h", _CASES)
def test_unshuffled_conv_equals_strided_conv(k, s, p, h):
    """conv(x, w, stride s, pad p) == conv(pad(pixel_unshuffle(x)), s2d_weight(w)), float."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 3, h, h, generator=g), torch.randn(5, 3, k, k, generator=g)
    ref = F.conv2d(x, w, stride=s, padding=p)
    plan = _plan(h, k, s, p, ref.shape[2])
    assert plan is not None
    off, k2, before, after = plan
    z = F.pad(F.pixel_unshuffle(x, s), [before, after, before, after])
    got = F.conv2d(z, s2d_weight(w, s, (off, off), (k2, k2)))
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


class Stem(nn.Module):
    """A ResNet-style stem whose output depends on its input (no BN-dominated random tail)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 7, stride=2, padding=3)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

    def forward(self, x):
        return self.conv2(F.max_pool2d(F.relu(self.conv1(x)), 3, 2, 1))


@pytest.fixture(scope="module")
def stem_ir():
    torch.manual_seed(0)
    m = Stem().eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(2, 3, 32, 32, generator=g),) for _ in range(4)]
    cm = fxpress.compress(m, data[0], [fxpress.Quantize(mode="static", conv_add="separate")],
                          calibration=data)
    return cm.graph_module, data


def _strided_few_channel_convs(gm) -> int:
    """Convs with stride > 1 whose int8 weight reads <= 3 input channels."""
    def in_channels(conv):
        return gm.get_buffer(conv.args[1].args[0].target).shape[1]
    return sum(1 for n in gm.graph.nodes if n.target == torch.ops.aten.conv2d.default
               and in_channels(n) <= 3 and list(n.args[3]) != [1, 1])


def test_pass_rewrites_the_stem_only(stem_ir):
    gm, data = stem_ir
    f = flat_graph(gm)
    with hw.override(hw.host()):
        assert space_to_depth_stems(f) == 1
    assert _strided_few_channel_convs(f) == 0
    assert sum(1 for n in f.graph.nodes if n.target == torch.ops.aten.pixel_unshuffle.default) == 1
    ref, got = gm(*data[0]), f(*data[0])[0]
    step = float(gm.graph.find_nodes(op="call_function",
                                     target=torch.ops.quantized_decomposed.dequantize_per_tensor.default)[-1].args[1])
    # eager float sums in another order: at most a rounding flip, one output step, here and there
    assert (got - ref).abs().max() <= 1.01 * step
    assert gm is not f and _strided_few_channel_convs(gm) == 1  # the caller's IR untouched


def test_avx2_host_keeps_full_range_stems(stem_ir):
    """Without VNNI an s8 weight beyond [-64, 64] is not reordered (int16 pair sums)."""
    gm, _ = stem_ir
    f = flat_graph(gm)
    assert int(f.conv1.weight_int8.abs().max()) > 64
    with hw.simulate(flags={"avx2", "fma"}):
        assert space_to_depth_stems(f) == 0


def test_onnxruntime_runs_space_to_depth_and_matches_unrewritten(stem_ir):
    gm, data = stem_ir
    with hw.override(hw.host()):
        on = compile_onnxruntime(gm, data[0], calibration=data, threads=1)
        off = compile_onnxruntime(gm, data[0], calibration=data, threads=1, space_to_depth=False)
    rw = on.report["rewrites"]
    assert rw["space_to_depth_stem"] == 1 and rw["space_to_depth"] == 1 and rw["pad_into_conv"] == 1
    ops = on.report["onnx_ops"]
    assert ops.get("SpaceToDepth") == 1 and "Pad" not in ops
    assert on.report["kernels"].get("QLinearConv") == 2 and "Conv" not in on.report["kernels"]
    x3 = torch.rand(3, 3, 32, 32)  # another batch size than the example's
    for x in (data[1][0], x3):
        np.testing.assert_array_equal(on(x).numpy(), off(x).numpy())  # the same int32 sums


def test_inductor_runs_unshuffled_qconv_and_matches_unrewritten(stem_ir):
    gm, data = stem_ir
    # the stem rewrite serves Inductor's own qconv lowering (packed oneDNN convs take the stem
    # as it is: test_onednn_conv.py)
    on = compile_inductor(gm, data[0], wrapper="python", packed_convs="off")
    off = compile_inductor(gm, data[0], wrapper="python", packed_convs="off", space_to_depth=False)
    assert on.report["rewrites"] == {"space_to_depth_stem": 1}
    assert on.report["kernels"]["qconv"] == 2
    torch.testing.assert_close(on(data[1][0]), off(data[1][0]), atol=0, rtol=0)


def test_cpp_wrapper_choice(monkeypatch):
    monkeypatch.delenv("FXPRESS_INDUCTOR_WRAPPER", raising=False)
    assert _cpp_wrapper("auto", "cpu", static=True, user_set=False)
    assert not _cpp_wrapper("auto", "cpu", static=False, user_set=False)
    assert not _cpp_wrapper("auto", "cuda", static=True, user_set=False)
    assert not _cpp_wrapper("cpp", "cpu", static=True, user_set=True)  # the user's option wins
    monkeypatch.setenv("FXPRESS_INDUCTOR_WRAPPER", "python")
    assert not _cpp_wrapper("auto", "cpu", static=True, user_set=False)
    assert _cpp_wrapper("cpp", "cpu", static=False, user_set=False)


def test_cpp_wrapper_compiles_and_matches_python(stem_ir):
    gm, data = stem_ir
    x1 = data[0][0][:1]
    cpp = compile_inductor(gm, (x1,), wrapper="cpp")
    py = compile_inductor(gm, (x1,), wrapper="python")
    assert cpp.report["wrapper"] == "cpp" and py.report["wrapper"] == "python"
    assert cpp.report["kernels"]["qconv"] == 2
    torch.testing.assert_close(cpp(data[1][0][:1]), py(data[1][0][:1]), atol=0, rtol=0)


def test_dynamic_image_sizes_are_left_alone(stem_ir):
    """Divisibility by the stride is known only for static H, W."""
    from fxpress.ir.signature import InputSpec, Signature, set_signature, signature
    gm, _ = stem_ir
    f = flat_graph(gm)
    spec = signature(f).inputs[0]
    set_signature(f, Signature((InputSpec(spec.name, spec.dtype, ("batch", 3, "h", "w")),)))
    assert space_to_depth_stems(f) == 0
