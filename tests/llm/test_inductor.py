"""fxpress.llm.inductor: weight-only linears on torch's packed CPU kernels, last-position logits,
and the compiled prefill/decode Generator (compiled tests are slow: Inductor compiles twice)."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.backends.base import flat_graph
from fxpress.llm.capture import complete_call

transformers = pytest.importorskip("transformers")


def _sqnr(ref, y):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean()))


def _tiny_llama(hidden=96, layers=2):
    cfg = transformers.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def _flat_call(gm, ids):
    args, _ = complete_call(gm, (ids,), {})
    return torch.utils._pytree.tree_leaves(args)


@pytest.mark.parametrize("recipe,kernel,want", [
    (fxpress.WeightOnly(bits=4, group_size=32), "int4pack", 8),
    # hidden 96 with g64: K padded to 128, the activation padded with zeros
    (fxpress.WeightOnly(bits=4, group_size=64), "int4pack", 8),
    (fxpress.WeightOnly(bits=8), "int8pack", 8),
])
def test_packed_kernels_match_the_ir(recipe, kernel, want):
    from fxpress.llm.inductor import last_position_logits, pack_weight_only_linears
    lm = _tiny_llama()
    ids = torch.randint(0, 512, (2, 10))
    cm = fxpress.compress(lm, (ids,), recipe)
    fg = flat_graph(cm.graph_module)
    counts = pack_weight_only_linears(fg, lm_head="float")
    # 7 linears x 2 layers -> q/k/v and gate/up packed: 4 matmuls per layer; lm_head float
    assert counts[kernel] == want and counts["dense"] == 1 and counts["fused"] == 6
    op = {"int4pack": torch.ops.aten._weight_int4pack_mm_for_cpu.default,
          "int8pack": torch.ops.aten._weight_int8pack_mm.default}[kernel]
    assert sum(n.target is op for n in fg.graph.nodes) == want
    assert last_position_logits(fg)
    ref = cm(ids).logits
    with torch.no_grad():
        out = fg(*_flat_call(cm.graph_module, ids))
    assert out[0].shape == (2, 1, 512)
    # bf16 activations at the packed matmuls: measured 46-50 dB on this model
    assert _sqnr(ref[:, -1:], out[0]) > 35.0
    # the cache the graph returns is the IR's (fp32 attention; only its inputs moved by bf16)
    assert _sqnr(cm(ids).cache[0][0], out[1]) > 35.0


def test_int8_lm_head_and_bad_options():
    from fxpress.errors import RecipeError
    from fxpress.llm.inductor import pack_weight_only_linears
    lm = _tiny_llama()
    ids = torch.randint(0, 512, (1, 6))
    cm = fxpress.compress(lm, (ids,), fxpress.WeightOnly(bits=4, group_size=32))
    fg = flat_graph(cm.graph_module)
    assert pack_weight_only_linears(fg, lm_head="int8") == {"int4pack": 8, "int8pack": 1, "dense": 0,
                                                                "fused": 6}
    with torch.no_grad():
        out = fg(*_flat_call(cm.graph_module, ids))
    assert _sqnr(cm(ids).logits, out[0]) > 30.0
    with pytest.raises(RecipeError, match="lm_head"):
        fxpress.lower(cm, backend="inductor", lm_head="int3")
    with pytest.raises(RecipeError, match="unknown option"):
        fxpress.lower(cm, backend="inductor", nonsense=1)


def test_save_with_a_tokenizer_is_a_typed_error_not_a_type_error(tmp_path):
    """lm.save(dir, tokenizer=tok), as the docs show for ORT, on the Inductor lowering: Lowered.save
    took no tokenizer (a TypeError); now the Generator's typed error says what to save instead.
    Nothing compiles (lowering is lazy)."""
    from fxpress.errors import LoweringError
    cm = fxpress.compress(_tiny_llama(), (torch.randint(0, 512, (1, 6)),))
    lm = fxpress.lower(cm, backend="inductor")
    with pytest.raises(LoweringError, match=r"'inductor' lowering .*cm\.save"):
        lm.save(tmp_path / "lm", tokenizer=object())
    assert not (tmp_path / "lm").exists()


@pytest.mark.slow
@pytest.mark.parametrize("recipe", [fxpress.WeightOnly(bits=4, group_size=32), None])
def test_generate_matches_the_ir(recipe):
    """Compiled prefill + decode give the IR's greedy tokens; prefill-then-decode logits match
    the IR's full-sequence logits; the user's model is unchanged."""
    from fxpress.llm.generate import KVCallGenerator
    from fxpress.llm.inductor import InductorCausalLM
    lm = _tiny_llama()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    ids = torch.randint(0, 512, (1, 12))
    cm = fxpress.compress(lm, (ids,), recipe or [])
    gen = fxpress.lower(cm, backend="inductor")
    assert isinstance(gen, InductorCausalLM)

    def ir(i, m, p, past):
        o = cm.graph_module(i, m, p, past)
        return o.logits, o.cache
    ref = KVCallGenerator(ir, gen.spec).generate(ids, max_new_tokens=10)
    out = gen.generate(ids, max_new_tokens=10)
    assert torch.equal(out, ref)
    # step by step: the decode logits equal the IR's logits over the whole sequence
    full = cm(out[:, :14]).logits
    st = gen.start(1, 20)
    mask = torch.ones(1, 12, dtype=torch.long)
    gen.step(st, ids, mask, torch.arange(12)[None])
    for t in (12, 13):
        mask = torch.ones(1, t + 1, dtype=torch.long)
        lg = gen.step(st, out[:, t:t + 1], mask, torch.tensor([[t]]))
        assert _sqnr(full[:, t], lg) > (40.0 if recipe is None else 35.0)
    assert all(torch.equal(before[k], v) for k, v in lm.state_dict().items())
    assert len(gen.report["compiles"]) <= 2
    # called like the IR: all positions' logits and the cache, in the IR's output structure
    out_ir, out_ind = cm(ids), gen(ids)
    assert type(out_ind) is type(out_ir) and out_ind.logits.shape == out_ir.logits.shape
    assert _sqnr(out_ir.logits, out_ind.logits) > (40.0 if recipe is None else 35.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_graphs_decode():
    lm = _tiny_llama()
    ids = torch.randint(0, 512, (1, 8))
    cm = fxpress.compress(lm, (ids,), fxpress.WeightOnly(bits=4, group_size=32))
    gen = fxpress.lower(cm, backend="inductor", device="cuda", cuda_graphs=True)
    assert gen.report["cuda_graphs"]
    out = gen.generate(ids, max_new_tokens=6)
    ref = fxpress.lower(cm, backend="inductor").generate(ids, max_new_tokens=6)
    assert out.shape == ref.shape and torch.equal(out[:, :9], ref[:, :9])


def test_sibling_linears_pack_into_one_matmul_with_their_biases():
    """Qwen2's q/k/v carry biases: packed into one int4 matmul (bias concatenated), the logits
    and the cache stay the IR's."""
    from fxpress.llm.inductor import pack_weight_only_linears
    from tests.llm.lms import ids as make_ids, tiny_lm
    lm = tiny_lm("qwen2")
    x = make_ids(2, 9)
    cm = fxpress.compress(lm, (x,), fxpress.WeightOnly(bits=4, group_size=32))
    fg = flat_graph(cm.graph_module)
    counts = pack_weight_only_linears(fg, lm_head="float")
    assert counts == {"int4pack": 8, "int8pack": 0, "dense": 1, "fused": 6}
    biased = [n for n in fg.graph.nodes if n.target is torch.ops.aten.add.Tensor
              and any(isinstance(a, torch.fx.Node) and a.op == "get_attr" and "_bias" in str(a.target)
                      for a in n.args)]
    assert len(biased) == 2  # one packed q/k/v bias per layer
    with torch.no_grad():
        out = fg(*_flat_call(cm.graph_module, x))
    ref = cm(x)
    assert _sqnr(ref.logits, out[0]) > 35.0
    assert _sqnr(ref.cache[0][0], out[1]) > 35.0
