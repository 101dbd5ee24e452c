"""KV-explicit capture of HF causal LMs: one graph for prefill and decode, user objects untouched."""
from __future__ import annotations

import copy

import pytest
import torch

import fxpress
from fxpress.llm import causal_lm_spec, complete_call
from tests.llm.lms import FAMILIES, ids, sqnr, tiny_lm


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_then_decode_matches_the_full_sequence(family):
    """The IR run as prefill (P = 0, T = 9) then 3 one-token steps over the present it returned
    gives the full 12-token run's logits (> 40 dB), and the full run is the HF model's."""
    model = tiny_lm(family)
    x = ids(1, 12)
    gm = fxpress.capture(model, (x[:, :5],))
    spec = causal_lm_spec(gm)
    assert spec is not None and spec.num_layers == 2 and spec.model_type == family
    with torch.no_grad():
        full = gm(x).logits
        hf = model(x, use_cache=False).logits
        out = gm(x[:, :9])
        steps = [out.logits]
        for t in range(9, 12):
            mask = torch.ones(1, t + 1, dtype=torch.long)
            out = gm(x[:, t:t + 1], mask, torch.tensor([[t]]), out.cache)
            steps.append(out.logits)
    assert sqnr(hf, full) > 40
    assert sqnr(full, torch.cat(steps, 1)) > 40
    assert out.cache[0][0].shape == (1, spec.kv_heads, 12, spec.head_dim)


def test_user_model_config_and_cache_unchanged():
    """compress with the user's DynamicCache as example past, then generate: the model's
    weights, its config and the cache (length, tensors) are as they were."""
    from transformers import DynamicCache
    model = tiny_lm("llama")
    x = ids(1, 8)
    with torch.no_grad():
        cache = model(x, use_cache=True).cache
    assert isinstance(cache, DynamicCache)
    keys = [layer.keys.clone() for layer in cache.layers]
    length = cache.get_seq_length()
    config = model.config.to_dict()
    state = copy.deepcopy(model.state_dict())
    cm = fxpress.compress(model, (x[:, -1:],), example_kwargs={"cache": cache})
    lm = fxpress.lower(cm, "eager")
    lm.generate(x, max_new_tokens=4)
    assert cache.get_seq_length() == length
    assert all(torch.equal(a, layer.keys) for a, layer in zip(keys, cache.layers))
    assert model.config.to_dict() == config and model.config.use_cache is True
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_use_cache_off_keeps_the_plain_forward():
    """config.use_cache = False: the IR is the plain forward (logits only), as before."""
    model = tiny_lm("llama")
    model.config.use_cache = False
    gm = fxpress.capture(model, (ids(2, 6),))
    assert causal_lm_spec(gm) is None
    assert gm(ids(2, 6)).logits.shape == (2, 6, 128)  # batch dynamic, tokens as captured


def test_calls_are_completed_and_checked():
    """ids alone, ids + mask, a model(enc) dict: an empty past and positions from the mask; a
    mask of the wrong length is an InputError naming attention_mask."""
    gm = fxpress.capture(tiny_lm("llama"), (ids(1, 6),))
    (i, m, p, past), _ = complete_call(gm, ({"input_ids": ids(2, 5)},), {})
    assert m.shape == (2, 5) and p.tolist() == [list(range(5))] * 2 and past[0][0].shape[2] == 0
    with pytest.raises(fxpress.InputError) as e:
        complete_call(gm, (ids(1, 5), torch.ones(1, 4, dtype=torch.long)), {})
    assert e.value.input_name == "attention_mask"
    with torch.no_grad():
        assert gm(ids(3, 4)).logits.shape == (3, 4, 128)


def test_existing_passes_apply_to_the_kv_ir():
    """WeightOnly and Quantize(dynamic) rewrite the KV IR's linears as they do any linear; the
    result still prefills and decodes (eager backend) close to the float model."""
    model = tiny_lm("llama")
    x = ids(1, 10, seed=3)
    with torch.no_grad():
        ref = model(x, use_cache=False).logits
    for recipe, floor in ((fxpress.WeightOnly(bits=8, group_size=32), 30), (fxpress.Quantize(mode="dynamic"), 20)):
        cm = fxpress.compress(model, (x[:, :4],), recipe)
        assert any(p.modified for p in cm.report.passes)
        lm = fxpress.lower(cm, "eager")
        state = lm.start(1, 10)
        first = lm.step(state, x[:, :9], torch.ones(1, 9, dtype=torch.long), torch.arange(9)[None])
        last = lm.step(state, x[:, 9:], torch.ones(1, 10, dtype=torch.long), torch.tensor([[9]]))
        assert sqnr(ref[:, 8], first) > floor and sqnr(ref[:, 9], last) > floor, recipe


def test_a_tokenizers_batch_encoding_is_an_example():
    """compress(model, tok(prompt, return_tensors="pt")): a BatchEncoding is a Mapping, not a dict;
    it was taken as one positional input (InputError: 'captured from input_ids'). Now it is read as
    keyword inputs, as a dict is, and gives the same IR outputs."""
    from transformers import BatchEncoding
    model, x = tiny_lm("llama"), ids(1, 6)
    enc = BatchEncoding({"input_ids": x, "attention_mask": torch.ones_like(x)})
    cm = fxpress.compress(model, enc)
    want = fxpress.compress(model, dict(enc))
    assert torch.equal(cm(x).logits, want(x).logits)
    assert fxpress.capture(model, enc) is not None
