"""Small models for what the zoo found (fast; the zoo cells themselves are mostly `slow`).

- opt-dynamic: torch declares choose_qparams.tensor's scale float64; the graph must type it
  float32 (what DynamicQuantizeLinear makes) and a tied lm_head (its weight DQ shared with the
  embedding) must still become DynamicQuantizeMatMul.
"""
from __future__ import annotations

import collections

import onnx
import onnxruntime as ort
import torch

import fxpress
from fxpress.backends.onnx.export import export_onnx
from fxpress.backends.base import flat_graph


class TiedLM(torch.nn.Module):
    """embedding -> linear -> relu -> lm_head reading the embedding's weight (as OPT/GPT-2 do)."""

    def __init__(self, vocab: int = 64, d: int = 32):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, d)
        self.fc = torch.nn.Linear(d, d)
        self.head = torch.nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return self.head(torch.relu(self.fc(self.emb(ids))))


def _sqnr(ref, y):
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean().clamp_min(1e-20)))


def test_dynamic_qparams_typed_float_and_tied_head_fuses():
    torch.manual_seed(0)
    ids = torch.randint(0, 64, (2, 8))
    cm = fxpress.compress(TiedLM().eval(), (ids,), fxpress.Quantize(mode="dynamic"))
    ex = export_onnx(flat_graph(cm.graph_module), [ids])
    types = {v.name: v.type.tensor_type for v in ex.model.graph.value_info}
    dql = [n for n in ex.model.graph.node if n.op_type == "DynamicQuantizeLinear"]
    for n in dql:  # scale float32 and zero point uint8, scalars, as the op makes them
        scale, zp = types.get(n.output[1]), types.get(n.output[2])
        assert scale is None or (scale.elem_type == onnx.TensorProto.FLOAT and not scale.shape.dim)
        assert zp is None or (zp.elem_type == onnx.TensorProto.UINT8 and not zp.shape.dim)
    ops = collections.Counter(n.op_type for n in ex.model.graph.node)
    assert ops["DynamicQuantizeMatMul"] == 2, ops        # fc and the tied head
    assert ops["QuantizeLinear"] == 0, ops
    assert ex.rewrites["dynamic_matmul"] == 2
    sess = ort.InferenceSession(ex.model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(None, {ex.input_names[0]: ids.numpy()})[0])
    with torch.no_grad():
        ref = cm(ids)
    assert _sqnr(ref, got) > 30   # the IR's own dynamic int8 vs ORT's: same rounding up to ties
