"""Families off the Llama path: Falcon's multi-query cache, Mamba's state (no KV cache), GPT-2's
Conv1D and Falcon's ``x @ W.T`` under WeightOnly (session 10: all three failed or did nothing)."""
from __future__ import annotations

import warnings

import pytest
import torch

import fxpress
from fxpress.llm import causal_lm_spec
from tests.llm.lms import VOCAB, ids, sqnr, tiny_lm


def _falcon(seed=0):
    import transformers as tf
    cfg = tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          bos_token_id=1, eos_token_id=2)  # multi_query: one KV head, num_kv_heads says 4
    torch.manual_seed(seed)
    return tf.FalconForCausalLM(cfg).eval()


def _mamba(seed=0):
    import transformers as tf
    torch.manual_seed(seed)
    return tf.MambaForCausalLM(tf.MambaConfig(vocab_size=VOCAB, hidden_size=64,
                                              num_hidden_layers=2)).eval()


def test_falcon_multi_query_generates_like_hf():
    """The KV geometry comes from the model's real cache (1 KV head, not the config's 4): the IR
    captures KV-explicit and ORT's greedy tokens equal HF's."""
    model = _falcon()
    x = ids(1, 10)
    cm = fxpress.compress(model, (x,), [])
    spec = causal_lm_spec(cm)
    assert spec is not None and spec.kv_heads == 1 and spec.head_dim == 16
    lm = fxpress.lower(cm, backend="onnxruntime")
    ref = model.generate(x, max_new_tokens=6, do_sample=False)
    assert torch.equal(lm.generate(x, max_new_tokens=6), ref)


def test_mamba_falls_back_to_the_plain_forward_and_says_so():
    """No KV cache (Mamba's conv/ssm state): capture warns and keeps the sequence -> logits
    forward, which compresses (int8 dynamic: > 25 dB) instead of failing; the user's training
    flag is untouched."""
    model = _mamba().train()
    x = ids(1, 12)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        cm = fxpress.compress(model, (x,), fxpress.Quantize(mode="dynamic"))
    assert any("without its KV cache" in str(m.message) for m in w)
    assert model.training and causal_lm_spec(cm) is None
    with torch.no_grad():
        ref = model.eval()(x).logits
        out = cm(x)
    out = getattr(out, "logits", out[0] if isinstance(out, (tuple, list)) else out)
    assert sqnr(ref, out) > 25


@pytest.mark.parametrize("family", ["gpt2", "falcon"])
def test_weight_only_reaches_addmm_and_matmul_weights(family):
    """GPT-2's Conv1D (addmm) and Falcon's bias-free ``x @ W.T`` (matmul) are rewritten to linear
    first: every block linear is int8 (8 of 8 in 2 layers), logits > 30 dB from fp32."""
    model = tiny_lm("gpt2") if family == "gpt2" else _falcon()
    x = ids(1, 12)
    cm = fxpress.compress(model, (x,), fxpress.WeightOnly(bits=8))
    stats = next(p for p in cm.report.passes if p.name == "quant_weight_only").stats
    assert stats["quantized"] == 8
    with torch.no_grad():
        assert sqnr(model(x).logits, cm(x).logits) > 30


def test_bloom_alibi_stays_dynamic_on_onnxruntime():
    """Bloom's alibi ties the mask length to past + new tokens: the generic ONNX export is traced
    on a non-empty past (an empty one left the .onnx static and decode an InputError); greedy
    tokens equal HF's at batch 1 and batch 2."""
    import transformers as tf
    torch.manual_seed(0)
    model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4,
                                               bos_token_id=1, eos_token_id=2)).eval()
    cm = fxpress.compress(model, (ids(1, 12),), [])
    lm = fxpress.lower(cm, backend="onnxruntime")
    for x in (ids(1, 12), ids(2, 20, seed=1)):
        ref = model.generate(x, max_new_tokens=5, do_sample=False, min_new_tokens=5)
        assert torch.equal(lm.generate(x, max_new_tokens=5, eos_token_id=[]), ref)
