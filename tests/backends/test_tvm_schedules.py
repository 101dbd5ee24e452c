"""TVM CPU schedule templates: every kernel gets one, every conv tile computes the same thing.

Numerics against the IR (atol 1e-4 fp32; one quantization step int8) and structure: which
template each kernel got, parallel + vectorized loops in the conv kernel, the weight repack
folded into the constants. Speed is measured in bench/tvm_bench.py, not here.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxpress

tvm = pytest.importorskip("tvm")
from fxpress.backends.tvm import compile_tvm, host_target
from fxpress.backends.tvm import schedules as S
from fxpress.backends.tvm.build import lower_relax
from fxpress.backends.tvm.convert import to_relax


class Block(nn.Module):
    """A ResNet basic block with a strided 1x1 shortcut: conv+BN+ReLU, residual add epilogues."""

    def __init__(self, cin: int = 16, cout: int = 32):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, cout, 3, 2, 1, bias=False), nn.BatchNorm2d(cout)
        self.c2, self.b2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = nn.Conv2d(cin, cout, 1, 2, bias=True)
        self.fc = nn.Linear(cout, 10)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)) + self.down(x))
        y = torch.max_pool2d(y, 2)
        return self.fc(y.mean((2, 3)))


def _block():
    torch.manual_seed(0)
    from tests.models import randomize_bn
    return randomize_bn(Block()).eval(), (torch.randn(1, 16, 28, 28),)


def _kernels(model, inputs):
    gm = fxpress.capture(model, inputs)
    mod = lower_relax(to_relax(gm, inputs).mod, host_target(), schedule=False)
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


def test_conv_candidates_fit_the_vector_registers():
    conv = nn.Conv2d(64, 64, 3, padding=1).eval()
    funcs = _kernels(conv, (torch.randn(1, 64, 56, 56),))
    (func,) = [f for n, f in funcs.items() if "conv2d" in n]
    cands = S.candidates(func, lanes=8)
    assert S.ConvChoice(4, 16) in cands and len(cands) >= 6, cands
    for c in cands:
        assert 56 % c.wb == 0 and 64 % c.fb == 0 and c.fb % 8 == 0
        assert c.wb * c.fb // 8 <= 14  # accumulators stay in the 16 ymm registers
    assert S.default_choice(func, lanes=8) == S.ConvChoice(4, 16)
    assert S.candidates(funcs["transpose"] if "transpose" in funcs else next(
        f for n, f in funcs.items() if "conv2d" not in n)) == []


def test_every_conv_tile_computes_the_same_kernel():
    """Each candidate tile of a conv+BN+ReLU kernel, built alone with its weight repack
    inside, equals the unscheduled kernel on random inputs (same arguments, same layout)."""
    model, inputs = _block()
    funcs = _kernels(model, inputs)
    name = next(n for n in funcs if n.startswith("fused_conv2d") and "relu" in n)
    func = funcs[name]
    target, dev = host_target(), tvm.cpu()

    def run(f):
        lib = tvm.compile(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)
        from tvm.s_tir import meta_schedule as ms
        rng = np.random.default_rng(0)
        args = [tvm.runtime.tensor(rng.standard_normal([int(s) for s in a.shape]).astype(str(a.dtype)), dev)
                for a in ms.arg_info.ArgInfo.from_prim_func(f)]
        lib.jit()["main"](*args)
        return args[-1].numpy()

    want = run(func)
    cands = S.candidates(func, lanes=8)
    assert len(cands) >= 3
    for c in cands:
        sch = S.schedule(func, c, lanes=8)
        assert sch is not None, c
        np.testing.assert_allclose(run(sch.mod["main"]), want, rtol=1e-5, atol=1e-4, err_msg=str(c))


def test_untuned_graph_gets_a_template_for_every_kernel():
    model, inputs = _block()
    gm = fxpress.capture(model, inputs)
    run = compile_tvm(gm, inputs)
    kinds = run.report["schedules"]
    assert kinds["conv_template"] == 3 and kinds["unscheduled"] == 0 and kinds["generic"] >= 3, kinds
    with torch.no_grad():
        torch.testing.assert_close(run(*inputs), gm(*inputs), atol=1e-4, rtol=1e-4)


def test_conv_kernel_is_parallel_vectorized_and_weights_are_prepacked():
    model, inputs = _block()
    gm = fxpress.capture(model, inputs)
    imp = to_relax(gm, inputs)
    mod = lower_relax(imp.mod, host_target())
    names = [gv.name_hint for gv in mod.functions]
    assert not [n for n in names if n.endswith("_weight_prepack")], names  # folded, then removed
    convs = [n for n in names if n.startswith("fused_conv2d")]
    assert len(convs) == 3 and all(n.endswith("_prepacked") for n in convs), convs
    text = mod[convs[0]].script()
    assert "T.parallel" in text and "T.vectorized" in text and "T.unroll" in text
    # the packed weight is [F/fb, KH, KW, C, fb]: a five-dimensional buffer in the signature
    signature = text[text.index("def main("):text.index("T.func_attr")]
    assert re.search(r"T\.Buffer\(\((T\.int64\(\d+\), ){4}T\.int64\(\d+\)\)", signature), signature


def test_int8_convs_take_the_template():
    from tests.backends.test_tvm import _max_act_scale, _pt2e_int8
    model, inputs = _block()
    qgm = _pt2e_int8(fxpress.capture(model, inputs), inputs)
    run = compile_tvm(qgm, inputs)
    kinds = run.report["schedules"]
    assert run.report["lowering"].get("conv2d_int8", 0) == 3, run.report["lowering"]
    assert kinds["conv_template"] == 3 and kinds["unscheduled"] == 0, kinds
    with torch.no_grad():
        want, got = qgm(*inputs), run(*inputs)
    assert (got - want).abs().max().item() <= _max_act_scale(qgm)


def test_odd_channel_counts_get_a_partial_vector_tile():
    """Pruning with round_to=1 leaves channel counts like 5 or 12: still the conv template."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 12, 3, padding=1)).eval()
    inputs = (torch.randn(1, 3, 10, 10),)
    funcs = _kernels(model, inputs)
    for name, func in funcs.items():
        if "conv2d" in name:
            choice = S.default_choice(func, lanes=8)
            assert choice is not None and choice.fb in (5, 12), (name, choice)
    gm = fxpress.capture(model, inputs)
    run = compile_tvm(gm, inputs)
    assert run.report["schedules"]["conv_template"] == 2 and run.report["schedules"]["unscheduled"] == 0
    with torch.no_grad():
        torch.testing.assert_close(run(*inputs), gm(*inputs), atol=1e-4, rtol=1e-4)
