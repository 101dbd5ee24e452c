"""ISA-aware int8 weight forms: chosen per layer from fxpress.hw, recorded, exact on the kernel.

A simulated AVX2 host (no VNNI) gets forms whose vpmaddubsw int16 pair sums cannot saturate
(s8_pairs where full range already fits, s7 otherwise, u8u8 when full range is forced); a
simulated VNNI host gets full-range s8 everywhere. Exactness is checked with an emulation of
the AVX2 kernel arithmetic against the IR's dequantize -> linear.
"""
import pytest
import torch
import torch.nn as nn

import fxpress
from fxpress import hw
from fxpress.ir.meta import QuantSpec, WeightForm, get_record
from fxpress.passes.quant.weight_form import choose_form, pairs_fit_int16, u8s8_avx2_matmul

qd = torch.ops.quantized_decomposed
AVX2 = {"avx", "avx2", "fma", "f16c"}                       # the znver3 / hidden-AVX-512 VMs
VNNI = AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 16)
        self.sparse = nn.Linear(16, 8)
        with torch.no_grad():  # every other input channel 0: each K-pair is (w, 0), fits int16
            self.sparse.weight[:, 1::2] = 0.0

    def forward(self, x):
        y = torch.relu(self.conv(x))
        y = torch.relu(self.fc(torch.flatten(y, 1)))
        return self.sparse(y)


def _data():
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(4, 3, 4, 4, generator=g),) for _ in range(3)]


def _compress(flags, **kw):
    with hw.simulate(flags=flags):
        cm = fxpress.compress(Net().eval(), _data()[0], fxpress.Quantize(mode="static", **kw),
                              calibration=_data())
    return cm


def _weight_dqs(gm):
    out = {}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is qd.dequantize_per_channel.default:
            out[str(n.args[0].target).rsplit("_int8", 1)[0]] = n
    return out


def _int8(gm, node):
    obj = gm
    for p in str(node.args[0].target).split("."):
        obj = getattr(obj, p)
    return obj


def test_vnni_host_keeps_full_range_s8():
    cm = _compress(VNNI)
    dqs = _weight_dqs(cm.graph_module)
    assert set(dqs) == {"conv.weight", "fc.weight", "sparse.weight"}
    for name, n in dqs.items():
        assert get_record(n, WeightForm).form == "s8", name
        assert n.args[4:6] == (-127, 127)
        assert int(_int8(cm.graph_module, n).abs().max()) == 127   # full range used
    rows = cm.report.sections["quant_weight_forms"]
    assert {r["form"] for r in rows} == {"s8"} and all("vnni" in r["isa"] for r in rows)


def test_avx2_host_chooses_exact_fast_forms_per_layer():
    cm = _compress(AVX2)
    gm = cm.graph_module
    dqs = _weight_dqs(gm)
    forms = {k: get_record(n, WeightForm).form for k, n in dqs.items()}
    # random weights: some K-pair exceeds 128 -> 7-bit; the zero-interleaved layer fits as is
    assert forms == {"conv.weight": "s7", "fc.weight": "s7", "sparse.weight": "s8_pairs"}
    for k, n in dqs.items():
        q = _int8(gm, n)
        if forms[k] == "s7":
            assert n.args[4:6] == (-64, 64) and int(q.abs().max()) == 64
            assert get_record(n, QuantSpec).reduce_range
        else:
            assert n.args[4:6] == (-127, 127) and int(q.abs().max()) == 127
        assert pairs_fit_int16(q, 0), k
    assert {r["module"]: r["form"] for r in cm.report.sections["quant_weight_forms"]} == \
        {"conv": "s7", "fc": "s7", "sparse": "s8_pairs"}


def test_avx2_full_range_falls_back_to_u8u8_only_where_pairs_do_not_fit():
    cm = _compress(AVX2, weight_range="full")
    forms = {k: get_record(n, WeightForm).form for k, n in _weight_dqs(cm.graph_module).items()}
    assert forms == {"conv.weight": "u8u8", "fc.weight": "u8u8", "sparse.weight": "s8_pairs"}
    cm7 = _compress(VNNI, reduce_range=True)  # an explicit reduce_range is s7 on any host
    assert {get_record(n, WeightForm).form for n in _weight_dqs(cm7.graph_module).values()} == {"s7"}


def _ir_linear(a_u8, a_scale, a_zp, q, w_scale):
    """The IR's float computation: dequantize activation and weight, then linear."""
    x = (a_u8.double() - a_zp) * a_scale
    w = q.double() * w_scale[:, None].double()
    return x @ w.T


def _kernel_linear(a_u8, a_scale, a_zp, q, w_scale, form):
    """What an AVX2 u8 x s8 (or u8 x u8) kernel returns for the same integers."""
    if form == "u8u8":  # weights shifted to uint8, zero point 128: exact int32 products
        acc = a_u8.long() @ (q.long() + 128).T - 128 * a_u8.long().sum(1, keepdim=True)
    else:
        acc = u8s8_avx2_matmul(a_u8, q).long()
    acc = acc - a_zp * q.long().sum(1)[None, :]
    return acc.double() * a_scale * w_scale[None, :].double()


@pytest.mark.parametrize("flags,policy", [(AVX2, "auto"), (AVX2, "full"), (VNNI, "auto")])
def test_each_form_is_exact_against_the_ir(flags, policy):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    w_sparse = w.clone()
    w_sparse[:, 1::2] = 0
    a_u8 = torch.randint(0, 256, (16, 64), generator=g, dtype=torch.uint8)
    a_scale, a_zp = 0.02, 128
    with hw.simulate(flags=flags) as host:
        for weight in (w, w_sparse):
            full = weight.abs().amax(1) / 127
            q = torch.clamp(torch.round(weight / full[:, None]), -127, 127).to(torch.int8)
            form = choose_form(q, host, policy)
            scale = full
            if form.form == "s7":
                scale = weight.abs().amax(1) / 64
                q = torch.clamp(torch.round(weight / scale[:, None]), -64, 64).to(torch.int8)
            ref = _ir_linear(a_u8, a_scale, a_zp, q, scale)
            if form.form == "s8":  # VNNI: int32 dot products, nothing to emulate but the sum
                got = ((a_u8.long() - a_zp) @ q.long().T).double() * a_scale * scale[None, :].double()
            else:
                got = _kernel_linear(a_u8, a_scale, a_zp, q, scale, form.form)
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_full_range_s8_saturates_on_avx2_when_pairs_do_not_fit():
    # the case the forms exist for: the emulated kernel is wrong on random full-range weights
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (32, 64), generator=g, dtype=torch.int8)
    a = torch.full((4, 64), 255, dtype=torch.uint8)
    assert not pairs_fit_int16(q)
    exact = a.long() @ q.long().T
    assert not torch.equal(u8s8_avx2_matmul(a, q).long(), exact)
    q7 = torch.clamp(q, -64, 64)
    assert torch.equal(u8s8_avx2_matmul(a, q7).long(), a.long() @ q7.long().T)


def test_conv_pairs_are_checked_in_both_k_orders():
    q = torch.zeros(4, 2, 3, 3, dtype=torch.int8)
    q[:, 0, 0, 0] = 127
    q[:, 0, 0, 1] = 127     # (I, kh, kw) order: adjacent -> 254 > 128
    assert not pairs_fit_int16(q, 0)
    q2 = torch.zeros(4, 2, 3, 3, dtype=torch.int8)
    q2[:, 0, 0, 0] = 127
    q2[:, 1, 0, 0] = 127    # channels-last (kh, kw, I) order: adjacent -> does not fit
    assert not pairs_fit_int16(q2, 0)
    q3 = torch.zeros(4, 2, 3, 3, dtype=torch.int8)
    q3[:, 0, 0, 0] = 127
    q3[:, 1, 1, 1] = 127    # never adjacent in either order
    assert pairs_fit_int16(q3, 0)


def test_weight_range_config_is_validated():
    from fxpress.errors import RecipeError
    with pytest.raises(RecipeError) as e:
        fxpress.Quantize(weight_range="8bit")
    assert "weight_range" in str(e.value)
    with pytest.raises(RecipeError) as e:
        fxpress.Quantize(reduce_range=True, weight_range="full")
    assert "weight_range" in str(e.value)
    assert fxpress.Quantize(reduce_range=True).weight_range == "reduced"
