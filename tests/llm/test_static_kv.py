"""fxpress.llm.static_kv: the KV IR rewritten onto preallocated buffers written in place."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.backends.base import flat_graph
from fxpress.llm.capture import empty_past, positions_from_mask

transformers = pytest.importorskip("transformers")
aten = torch.ops.aten


def _sqnr(ref, y):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean()))


def _tiny(layers=2):
    cfg = transformers.LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=layers, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_static_buffers_match_the_ir_eagerly_and_are_written_in_place():
    from fxpress.llm.static_kv import static_kv_cache
    lm = _tiny()
    ids = torch.randint(0, 300, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding on row 1
    cm = fxpress.compress(lm, (ids[:1],), [])
    fg = flat_graph(cm.graph_module)
    n_cat = sum(n.target is aten.cat.default for n in fg.graph.nodes)
    assert static_kv_cache(fg)
    g = fg.graph
    layers = cm.graph_module.meta["fxpress.causal_lm"].num_layers
    # every layer's two cache concatenations became a slice_scatter written back with copy_
    assert sum(n.target is aten.slice_scatter.default for n in g.nodes) == 2 * layers
    assert sum(n.target is aten.copy_.default for n in g.nodes) == 2 * layers
    assert sum(n.target is aten.cat.default for n in g.nodes) <= n_cat - 2 * layers
    assert len(g.output_node().args[0]) == 1  # the logits only: the buffers are the state
    spec = cm.graph_module.meta["fxpress.causal_lm"]
    cap = 16
    bufs = [t for kv in empty_past(spec, 2, cap) for t in kv]
    # prefill 9 tokens, then 3 decode steps of one token, against the IR over the whole sequence
    seq = torch.cat([ids, torch.randint(0, 300, (2, 3))], 1)
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = cm(seq, attention_mask=full_mask).logits
        pos = positions_from_mask(mask, 9)
        out = fg(ids, mask, pos, *bufs)[0]
        assert _sqnr(ref[:, 8][mask[:, -1] == 1], out[:, -1]) > 60.0
        for t in range(9, 12):
            m = full_mask[:, : t + 1]
            out = fg(seq[:, t:t + 1], m, positions_from_mask(m, 1), *bufs)[0]
            assert _sqnr(ref[:, t], out[:, -1]) > 60.0
    # slots 0..11 hold keys (row 1's padded slots too, masked), the rest is still zero
    k0 = bufs[0]
    assert k0[:, :, :12].abs().sum() > 0 and k0[:, :, 12:].abs().sum() == 0


def test_not_a_kv_ir_is_left_alone():
    from fxpress.llm.static_kv import static_kv_cache

    class M(torch.nn.Module):
        def forward(self, a, b, c, d):
            return a + 1, torch.cat([d, c], 2)
    gm = torch.fx.symbolic_trace(M())
    before = gm.code
    assert not static_kv_cache(gm)  # two outputs for four inputs, not the KV IR's form
    assert gm.code == before


@pytest.mark.slow
def test_compiled_static_kv_generates_the_concat_path_tokens_with_one_decode_graph():
    lm = _tiny()
    ids = torch.randint(0, 300, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    cm = fxpress.compress(lm, (ids[:1],), fxpress.WeightOnly(bits=4, group_size=32))
    ref = fxpress.lower(cm, backend="inductor", static_kv=False)
    gen = fxpress.lower(cm, backend="inductor")
    assert gen.static_kv and gen.report["kv_cache"].startswith("static")
    assert not ref.static_kv
    from torch._dynamo.utils import counters
    seen = None
    for n in (6, 17):  # two capacities: the buffers' length is a dynamic dimension
        a = ref.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])
        before = counters["stats"]["unique_graphs"]
        b = gen.generate(ids, attention_mask=mask, max_new_tokens=n, eos_token_id=[])
        assert torch.equal(a, b)
        if seen is not None:  # the second capacity compiled nothing new
            assert counters["stats"]["unique_graphs"] == before
        seen = True
