"""TVM breadth: nets that once failed to build or returned garbage silently now lower and match
their IR, or refuse with UnsupportedOpError naming the op — never a wrong answer (lower()'s
self-check: report['check'] > 20 dB or LoweringError)."""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import fxpress
from fxpress.errors import UnsupportedOpError

pytest.importorskip("tvm")


class _UNet(nn.Module):
    def __init__(self, mode: str = "nearest"):
        super().__init__()
        self.d1 = nn.Conv2d(3, 8, 3, padding=1)
        self.d2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.up = nn.Upsample(scale_factor=2, mode=mode)
        self.u1 = nn.Conv2d(24, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        a = torch.relu(self.d1(x))
        b = torch.relu(self.d2(a))
        return self.out(torch.relu(self.u1(torch.cat([self.up(b), a], 1))))


class _Recurrent(nn.Module):
    def __init__(self, cell=nn.LSTM):
        super().__init__()
        self.rnn = cell(8, 16, batch_first=True)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        y, _ = self.rnn(x)
        return self.fc(y[:, -1])  # a negative select index: TVM read it as garbage, silently


class _LastStep(nn.Module):
    def forward(self, x):
        return x[:, -1] * 2


def _lower_or_refuse(model, x, recipe=()):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cm = fxpress.compress(model.eval(), (x,), list(recipe))
    try:
        run = fxpress.lower(cm, "tvm")
    except UnsupportedOpError as e:
        return None, e
    with torch.no_grad():
        ref = torch.utils._pytree.tree_leaves(cm(x))[0]
    from fxpress.backends.compare import sqnr
    assert sqnr(ref, torch.utils._pytree.tree_leaves(run(x))[0]) > 40  # fp32 TVM vs the fp32 IR
    assert run.report["check"]["sqnr_db"] > 40
    return run, None


def test_negative_select_index_is_normalized():
    run, err = _lower_or_refuse(_LastStep(), torch.randn(2, 5, 8))
    assert err is None and run.report["lowering"].get("negative_select_fixed") == 1


@pytest.mark.parametrize("cell", [nn.LSTM, pytest.param(nn.GRU, marks=pytest.mark.slow)])
def test_recurrent_nets_match_their_ir(cell):
    run, err = _lower_or_refuse(_Recurrent(cell), torch.randn(2, 5, 8))
    assert err is None, err


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
@pytest.mark.parametrize("prune", [False, True])
def test_unet_lowers_and_matches(mode, prune):
    recipe = [fxpress.ChannelPruning(ratio=0.5)] if prune else []
    run, err = _lower_or_refuse(_UNet(mode), torch.randn(2, 3, 16, 16), recipe)
    assert err is None, err


@pytest.mark.slow
@pytest.mark.parametrize("prune", [False, True])
def test_hf_gpt2_lowers_and_matches(prune):
    """Re-export once failed on Conv1D's view; then TVM kept cumsum(bool) bool (torch: int64),
    which the LLVM codegen refused (`fcmp oeq i1` in the fused mask kernel)."""
    tf = pytest.importorskip("transformers")
    model = tf.GPT2Model(tf.GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=2,
                                       n_positions=64, use_cache=False))
    recipe = [fxpress.ChannelPruning(ratio=0.5)] if prune else []
    run, err = _lower_or_refuse(model, torch.randint(0, 128, (2, 8)), recipe)
    assert err is None, err
    assert run.report["lowering"].get("cumsum_dtype_fixed") == 1


def test_a_kernel_tvm_cannot_compile_is_named(monkeypatch):
    """A build failure names the first kernel that does not compile alone (its fused ops)."""
    import tvm
    real = tvm.compile

    def refuse_relu(mod, target=None, **kw):
        if any("relu" in gv.name_hint for gv in mod.functions):
            raise RuntimeError("test-only: this kernel does not compile")
        return real(mod, target=target, **kw)
    monkeypatch.setattr(tvm, "compile", refuse_relu)
    with pytest.raises(UnsupportedOpError, match=r"relu.*a TVM kernel fused from these ops"):
        fxpress.lower(nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(), "tvm",
                      example_inputs=(torch.randn(2, 8),))
