"""Dynamic shapes end to end: compress at one batch, calibrate at another, serve any batch on every
backend; HF models called with kwargs keep their ModelOutput; lowered models check their calls."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fxpress
from fxpress.ir.signature import signature
from tests import models

BACKENDS = ("eager", "onnxruntime", "inductor", "tvm")


def _sqnr(ref: torch.Tensor, x: torch.Tensor) -> float:
    return float(20 * torch.log10(ref.norm() / (x - ref).norm().clamp_min(1e-12)))


@pytest.fixture(scope="module")
def cnn_int8():
    """A digits CNN compressed at batch 2 with calibration batches of 16, and its four lowerings."""
    torch.manual_seed(0)
    model = models.digits_cnn(width=8).eval()
    calib = [(torch.rand(16, 1, 8, 8) * 16,) for _ in range(8)]
    cm = fxpress.compress(model, (torch.rand(2, 1, 8, 8) * 16,), fxpress.Quantize(mode="static"),
                          calibration=calib)
    lowered = {b: fxpress.lower(cm, backend=b) for b in BACKENDS}
    return model, cm, lowered


def test_ir_batch_is_dynamic_by_default_and_static_on_request():
    model = models.digits_cnn(width=8).eval()
    x = torch.randn(2, 1, 8, 8)
    assert signature(fxpress.capture(model, (x,))).inputs[0].shape == ("batch", 1, 8, 8)
    assert signature(fxpress.capture(model, (x,), static_shapes=True)).inputs[0].shape == (2, 1, 8, 8)
    # a batch-1 example stays general too (export alone would specialize a size-1 dim)
    gm = fxpress.capture(model, (x[:1],))
    assert signature(gm).inputs[0].shape[0] == "batch"
    torch.testing.assert_close(gm(torch.randn(5, 1, 8, 8).mul(0)), model(torch.zeros(5, 1, 8, 8)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("batch", [1, 7])
def test_every_backend_serves_other_batches(cnn_int8, batch):
    model, cm, lowered = cnn_int8
    torch.manual_seed(batch)
    x = torch.rand(batch, 1, 8, 8) * 16
    with torch.no_grad():
        ref, ir = model(x), cm(x)
    assert ir.shape == (batch, 10)
    # int8 vs fp32: within 10 % (SQNR >= 20 dB)
    assert _sqnr(ref, ir) >= 20, _sqnr(ref, ir)
    for name, run in lowered.items():
        y = run(x)
        assert y.shape == (batch, 10), name
        # each backend vs the IR: int8 tolerance (a requantization step may round the other way)
        assert _sqnr(ir, y) >= 25, (name, _sqnr(ir, y))
        assert _sqnr(ref, y) >= 20, (name, _sqnr(ref, y))


def test_saved_onnx_reruns_at_another_batch_in_plain_ort(cnn_int8, tmp_path):
    import onnxruntime as ort
    _, cm, lowered = cnn_int8
    path = lowered["onnxruntime"].save(tmp_path / "cnn.onnx")
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = sess.get_inputs()
    assert isinstance(inp.shape[0], str)  # a symbolic batch (dim_param), not the example's 2
    x = torch.rand(3, 1, 8, 8) * 16
    (y,) = sess.run(None, {inp.name: x.numpy()})
    assert y.shape == (3, 10)
    assert _sqnr(cm(x), torch.from_numpy(np.asarray(y))) >= 25


@pytest.mark.parametrize("backend", BACKENDS)
def test_wrong_calls_raise_input_error(cnn_int8, backend):
    _, _, lowered = cnn_int8
    run = lowered[backend]
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(fxpress.InputError, match="structure|takes 1"):
        run(x, x)
    with pytest.raises(fxpress.InputError, match="dtype float64, expected float32"):
        run(x.double())
    with pytest.raises(fxpress.InputError, match="size 3 in dim 1"):
        run(torch.rand(2, 3, 8, 8))
    with pytest.raises(fxpress.InputError, match="rank 3"):
        run(torch.rand(1, 8, 8))


def _tiny_bert(layers: int):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=128)
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def test_hf_bert_kwargs_dynamic_batch_and_sequence_on_ort():
    from torch.export import Dim
    model = _tiny_bert(2)

    def enc(b, s):
        return {"input_ids": torch.randint(0, 128, (b, s)),
                "attention_mask": torch.ones(b, s, dtype=torch.long),
                "token_type_ids": torch.zeros(b, s, dtype=torch.long)}

    batch, seq = Dim("batch"), Dim("seq", max=512)
    cm = fxpress.compress(model, (), fxpress.Quantize(mode="dynamic"), example_kwargs=enc(2, 16),
                          dynamic_shapes={k: {0: batch, 1: seq} for k in enc(1, 1)})
    run = fxpress.lower(cm, backend="onnxruntime")
    other = enc(3, 9)
    out, ir = run(**other), cm(**other)
    assert type(out) is type(ir) and type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert out.last_hidden_state.shape == (3, 9, 32)
    assert _sqnr(ir.last_hidden_state, out.last_hidden_state) >= 25
    assert _sqnr(ir.pooler_output, out.pooler_output) >= 25
    with pytest.raises(fxpress.InputError, match="unexpected keyword"):
        run(**other, pixel_values=torch.zeros(1))


def test_keyword_model_calibrates_on_dict_batches_and_takes_one_dict():
    """model(**enc)-style calibration: dict batches (and flat positional ones) at another batch size."""
    model = _tiny_bert(1)

    def enc(b):
        return {"input_ids": torch.randint(0, 128, (b, 12)),
                "attention_mask": torch.ones(b, 12, dtype=torch.long)}

    calib = [enc(4) for _ in range(3)] + [tuple(enc(3).values())]
    cm = fxpress.compress(model, enc(2), fxpress.Quantize(mode="static", ops=("linear",)),
                          calibration=calib)
    assert cm.report["quant_calibrate"]["batches"] == 4
    e = enc(5)
    with torch.no_grad():
        ref, out = model(**e), cm(**e)
    assert _sqnr(ref.last_hidden_state, out.last_hidden_state) >= 20
    torch.testing.assert_close(cm(e).last_hidden_state, out.last_hidden_state)  # one dict == **dict
