"""Real data: a DigitsCNN trained on sklearn digits, quantized static (per-channel / per-tensor,
symmetric / affine), dynamic and with QAT in the user's own training loop."""
from collections import Counter

import pytest
import torch

import fxpress
from fxpress.ir.meta import ObserverStats, QuantSpec, get_record
from tests.digits import accuracy, batches, digits_data, trained_digits_cnn

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten


@pytest.fixture(scope="module")
def digits():
    (xtr, ytr), (xte, yte) = digits_data()
    model = trained_digits_cnn()
    return model, xtr, ytr, xte, yte, accuracy(model, xte, yte)


def _ops(gm):
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _compress(model, xtr, q):
    return fxpress.compress(model, xtr[:50], q, calibration=batches(xtr, 50, limit=4))


def test_static_per_channel_within_one_point(digits):
    model, xtr, _, xte, yte, fp32 = digits
    assert fp32 >= 0.95
    cm = _compress(model, xtr, fxpress.Quantize(mode="static"))
    acc = accuracy(cm, xte, yte)
    assert acc >= fp32 - 0.01, (fp32, acc)
    gm = cm.graph_module
    ops = _ops(gm)
    # 2 convs + 2 linears: 4 per-channel weight dequantizes; BN folded away
    assert ops[qd.dequantize_per_channel.default] == 4
    assert aten.batch_norm.default not in ops
    # activations: input, conv1-relu, conv2-relu (= max-pool in, shared), pool out, fc1-relu,
    # fc2 out; fc1's input is the flatten of the pool output (a second point, same range)
    assert ops[qd.quantize_per_tensor.default] == ops[qd.dequantize_per_tensor.default] == 7
    # weights are stored as int8 tensors read through get_attr, never quantized at run time
    for n in gm.graph.nodes:
        if n.target is qd.dequantize_per_channel.default:
            w = n.args[0]
            assert w.op == "get_attr"
            assert getattr(gm, "get_submodule")(w.target.rpartition(".")[0]).get_buffer(
                w.target.rpartition(".")[2]).dtype == torch.int8
            assert n.args[3:] == (0, -127, 127, torch.int8)
            assert get_record(n, QuantSpec).qscheme == "per_channel"
    assert not any(p.dtype == torch.float32 and p.dim() == 4 for p in gm.parameters())
    q_nodes = [n for n in gm.graph.nodes if n.target is qd.quantize_per_tensor.default]
    assert all(isinstance(get_record(n, ObserverStats), ObserverStats) for n in q_nodes)
    assert all(n.args[3:] == (0, 255, torch.uint8) for n in q_nodes)
    # max-pool input and output share one range (an int8 max-pool needs equal scales)
    pool = next(n for n in gm.graph.nodes if n.target is aten.max_pool2d.default)
    q_after = next(iter(pool.users))
    assert pool.args[0].args[1:] == q_after.args[1:]


# tolerances: measured accuracy drops are in bench/quant_accuracy.py's table; entropy (KL)
# calibration clips this small net's activations hard (a known weakness of KL on
# low-entropy post-ReLU histograms), so its bound is looser
@pytest.mark.parametrize("weights,activations,observer,tol", [
    ("int8-per-tensor-symmetric", "int8-per-tensor-symmetric", "minmax", 0.02),
    ("int8-per-tensor-affine", "uint8-per-tensor-affine", "mse", 0.02),
    ("int8-per-channel-affine", "uint8-per-tensor-affine", "entropy", 0.06),
    ("int8-per-channel-symmetric", "int8-per-tensor-affine", "moving_average", 0.02),
])
def test_static_schemes(digits, weights, activations, observer, tol):
    model, xtr, _, xte, yte, fp32 = digits
    cm = _compress(model, xtr, fxpress.Quantize(mode="static", weights=weights,
                                                activations=activations, observer=observer))
    assert accuracy(cm, xte, yte) >= fp32 - tol
    ops = _ops(cm.graph_module)
    per_channel = "per-channel" in weights
    assert ops[qd.dequantize_per_channel.default] == (4 if per_channel else 0)
    dq_w = [n for n in cm.graph_module.graph.nodes
            if n.target in (qd.dequantize_per_channel.default, qd.dequantize_per_tensor.default)
            and n.args[0].op == "get_attr"]
    assert len(dq_w) == 4
    ranges = [n.args[4:6] if per_channel else n.args[3:5] for n in dq_w]
    if weights.endswith("symmetric"):
        assert all(r == (-127, 127) for r in ranges)   # narrow range
        if not per_channel:
            assert all(n.args[2] == 0 for n in dq_w)
    else:
        assert all(r == (-128, 127) for r in ranges)
    act_dtype = torch.int8 if activations.startswith("int8") else torch.uint8
    assert all(n.args[5] is act_dtype for n in cm.graph_module.graph.nodes
               if n.target is qd.quantize_per_tensor.default)


def test_dynamic(digits):
    model, xtr, _, xte, yte, fp32 = digits
    cm = fxpress.compress(model, xtr[:50], fxpress.Quantize(mode="dynamic"))
    assert accuracy(cm, xte, yte) >= fp32 - 0.01
    ops = _ops(cm.graph_module)
    assert ops[qd.choose_qparams.tensor] == 2          # the two linears' inputs
    assert ops[qd.quantize_per_tensor.tensor] == ops[qd.dequantize_per_tensor.tensor] == 2
    assert ops[qd.dequantize_per_channel.default] == 2
    assert qd.quantize_per_tensor.default not in ops


def test_qat_user_loop_within_half_point_and_same_ir(digits):
    model, xtr, ytr, xte, yte, fp32 = digits
    cm = fxpress.compress(model, xtr[:64], fxpress.Quantize(mode="qat", freeze_bn_after=20),
                          calibration=batches(xtr, 64, limit=3))
    mods = dict(cm.graph_module.named_modules())
    convbn = [m for m in mods.values() if type(m).__name__ == "QATConvBn"]
    assert len(convbn) == 2
    rm0 = convbn[0].running_mean.clone()
    opt = torch.optim.Adam(cm.parameters(), lr=3e-4)
    g = torch.Generator().manual_seed(0)
    cm.train()
    perm = torch.randperm(len(ytr), generator=g)
    for step, i in enumerate(range(0, 64 * 28, 64)):
        idx = perm[i % (len(ytr) - 64):][:64]
        loss = torch.nn.functional.cross_entropy(cm(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 19:
            rm_frozen = convbn[0].running_mean.clone()
    cm.eval()
    assert not torch.equal(rm0, rm_frozen)                       # BN trained in training mode...
    assert torch.equal(rm_frozen, convbn[0].running_mean)        # ...and froze after 20 steps
    fq_acc = accuracy(cm, xte, yte, batch=64)
    q = fxpress.convert(cm)
    acc = accuracy(q, xte, yte, batch=64)
    assert acc >= fp32 - 0.005, (fp32, acc)
    # convert yields the PTQ form: int8 weights, per-channel dequant, no BN, no fake-quant left
    ops = _ops(q.graph_module)
    assert ops[qd.dequantize_per_channel.default] == 4
    assert ops[qd.quantize_per_tensor.default] == 7
    assert aten.batch_norm.default not in ops
    assert not any(n.op == "call_module" for n in q.graph_module.graph.nodes)
    # converted numerics equal the fake-quant model's (same qparams, BN folded with frozen stats)
    assert abs(acc - fq_acc) <= 0.005
    with pytest.raises(fxpress.RecipeError, match="nothing to convert"):
        fxpress.convert(q)


def test_qat_lsq_learns_scales(digits):
    model, xtr, ytr, xte, yte, fp32 = digits
    cm = fxpress.compress(model, xtr[:64], fxpress.Quantize(mode="qat", observer="lsq"),
                          calibration=batches(xtr, 64, limit=2))
    lsq = [m for m in cm.modules() if type(m).__name__ in ("LearnableFakeQuantize", "_LazyLSQ")]
    assert lsq and all(isinstance(m.scale, torch.nn.Parameter) for m in lsq)
    before = [m.scale.detach().clone() for m in lsq]
    opt = torch.optim.Adam(cm.parameters(), lr=1e-4)
    cm.train()
    for i in range(0, 64 * 10, 64):
        loss = torch.nn.functional.cross_entropy(cm(xtr[i:i + 64]), ytr[i:i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert any(not torch.equal(b, m.scale) for b, m in zip(before, lsq))   # ranges were learned
    q = fxpress.convert(cm)
    assert accuracy(q, xte, yte, batch=64) >= fp32 - 0.01


def test_qat_finetune_callback_converts_in_compress(digits):
    model, xtr, ytr, xte, yte, fp32 = digits

    def finetune(gm):
        opt = torch.optim.SGD(gm.parameters(), lr=1e-3)
        for i in range(0, 64 * 5, 64):
            loss = torch.nn.functional.cross_entropy(gm(xtr[i:i + 64]), ytr[i:i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()

    cm = fxpress.compress(model, xtr[:64], fxpress.Quantize(mode="qat"),
                          calibration=batches(xtr, 64, limit=2), finetune=finetune)
    assert cm.report["quant_qat_finetune"]["trained"] is True
    assert _ops(cm.graph_module)[qd.dequantize_per_channel.default] == 4
    assert accuracy(cm, xte, yte, batch=64) >= fp32 - 0.01
