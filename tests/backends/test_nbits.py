"""ONNX-level weight-only lowering: packing, the DQ -> MatMul => MatMulNBits rewrite, q/k/v fusion."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import fxpress
from fxpress.backends.onnx.nbits import (
    export_nbits,
    fuse_norms,
    nbits_nodes,
    pack_nbits,
    pack_zero_points,
    unpack_nbits,
)


class Block(torch.nn.Module):
    """q/k read one input (fusable), o reads their product; K=768 is no power of two."""

    def __init__(self):
        super().__init__()
        self.q = torch.nn.Linear(256, 768)
        self.k = torch.nn.Linear(256, 768, bias=False)
        self.o = torch.nn.Linear(768, 128, bias=False)

    def forward(self, x):
        return self.o(torch.relu(self.q(x)) * self.k(x))


def _sqnr(ref, y):
    return float(10 * np.log10((ref ** 2).mean() / ((ref - y) ** 2).mean()))


def _session(path_or_bytes):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_round_trips_exactly(bits):
    rng = np.random.default_rng(0)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1))
    q = rng.integers(lo, hi, (48, 256)).astype(np.int8)
    b = pack_nbits(q, bits, 32)
    assert b.dtype == np.uint8 and b.shape == (48, 8, 32 * bits // 8)
    assert np.array_equal(unpack_nbits(b, bits, 256), q)
    # ORT's layout: unsigned (q + 2^(bits-1)), element 2j in the low nibble of byte j
    if bits == 4:
        assert int(b[0, 0, 0]) == ((int(q[0, 0]) + 8) | ((int(q[0, 1]) + 8) << 4))
        zp = pack_zero_points(np.array([[-8, 7, 0]], np.int8), 4)
        assert zp.tolist() == [0 | (15 << 4), 8 | (8 << 4)]  # odd count padded with the default 8


@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, False), (8, -1, True)])
def test_saved_onnx_has_matmul_nbits_and_reruns(tmp_path, bits, group, sym):
    torch.manual_seed(0)
    x = torch.randn(1, 8, 256)
    cm = fxpress.compress(Block().eval(), (x,), fxpress.WeightOnly(bits=bits, group_size=group,
                                                                   symmetric=sym))
    with torch.no_grad():
        ref = cm(x).numpy()
    exact = export_nbits(cm.graph_module, (x,), accuracy_level=0)
    fast = export_nbits(cm.graph_module, (x,), accuracy_level=4)
    path = tmp_path / "wo.onnx"
    onnx.save(fast, str(path))
    onnx.checker.check_model(str(path))
    types = [n.op_type for n in fast.graph.node]
    assert "DequantizeLinear" not in types and "MatMul" not in types
    nodes = sorted(nbits_nodes(fast), key=lambda a: a["N"])
    # q and k share x: one fused node N = 768 + 768; per-channel K=768 runs with block 256
    blk = (lambda k: 256) if group == -1 else (lambda k: group)
    assert [(a["K"], a["N"], a["bits"], a["block_size"]) for a in nodes] == \
        [(768, 128, bits, blk(768)), (256, 1536, bits, blk(256))]
    assert types.count("Split") == 1
    assert all(a["accuracy_level"] == 4 for a in nodes)
    has_zp = [len(n.input) >= 4 for n in fast.graph.node if n.op_type == "MatMulNBits"]
    assert has_zp == [not sym] * 2
    name = fast.graph.input[0].name
    y_exact = _session(exact.SerializeToString()).run(None, {name: x.numpy()})[0]
    np.testing.assert_allclose(y_exact, ref, rtol=1e-4, atol=1e-4)  # fp32 compute: the IR exactly
    y_fast = _session(str(path)).run(None, {name: x.numpy()})[0]  # a plain session on the file
    assert _sqnr(ref, y_fast) > 25.0


class _Logits(torch.nn.Module):
    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


def _decoder(family: str):
    import transformers as tf
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, use_cache=False, attn_implementation="eager")
    if family == "llama":
        cfg = tf.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
        return tf.LlamaForCausalLM(cfg)
    if family == "qwen2":
        cfg = tf.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
        return tf.Qwen2ForCausalLM(cfg)
    if family == "phi":
        cfg = tf.PhiConfig(intermediate_size=128, **common)
        return tf.PhiForCausalLM(cfg)
    common.pop("num_hidden_layers")
    common.pop("num_attention_heads")
    cfg = tf.OPTConfig(ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=64, **common)
    return tf.OPTForCausalLM(cfg)


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi", "opt"])
def test_hf_decoder_end_to_end(tmp_path, family):
    """Tiny random-weight HF decoders: WeightOnly int4 g32 -> MatMulNBits .onnx -> plain ORT."""
    torch.manual_seed(0)
    lm = _Logits(_decoder(family).eval())
    ids = torch.randint(0, 128, (1, 16))
    cm = fxpress.compress(lm, (ids,), fxpress.WeightOnly(bits=4, group_size=32))
    quantized = cm.report.passes[0].stats["quantized"]
    assert quantized == 2 * (7 if family in ("llama", "qwen2") else 6)  # every block linear
    with torch.no_grad():
        ref, fp = cm(ids).numpy(), lm(ids).numpy()
    assert _sqnr(fp, ref) > 15.0  # int4 g32 of random weights stays close to fp32
    path = tmp_path / f"{family}.onnx"
    onnx.save(export_nbits(cm.graph_module, (ids,)), str(path))
    model = onnx.load(str(path))
    nodes = nbits_nodes(model)
    assert nodes and all(a["bits"] == 4 and a["block_size"] == 32 for a in nodes)
    # fused q/k/v (and gate/up for Llama/Qwen2) means fewer nodes than quantized linears
    assert len(nodes) < quantized and "DequantizeLinear" not in {n.op_type for n in model.graph.node}
    ops = [n.op_type for n in model.graph.node]
    # RMSNorm families: the first norm alone, every later one with its residual Add
    rms = family in ("llama", "qwen2")
    assert (ops.count("SimplifiedLayerNormalization"), ops.count("SkipSimplifiedLayerNormalization")) \
        == ((1, 4) if rms else (0, 0))
    y = _session(str(path)).run(None, {model.graph.input[0].name: ids.numpy()})[0]
    assert _sqnr(ref, y) > 25.0


def test_fuse_norms_keeps_the_answer():
    """fuse_norms on a tiny Llama's MatMulNBits graph: 5 RMSNorm chains (2 layers x 2 + final)
    become 5 fused nodes, the ReduceMean/Pow/Sqrt chains are gone, and the output (fp32 compute,
    accuracy_level 0) is the unfused graph's to 1e-4."""
    torch.manual_seed(0)
    lm = _Logits(_decoder("llama").eval())
    ids = torch.randint(0, 128, (1, 16))
    cm = fxpress.compress(lm, (ids,), fxpress.WeightOnly(bits=4, group_size=32))
    plain = export_nbits(cm.graph_module, (ids,), accuracy_level=0, norms=False)
    fused, n = fuse_norms(plain)
    assert n == 5
    before = [x.op_type for x in plain.graph.node]
    after = [x.op_type for x in fused.graph.node]
    assert before.count("ReduceMean") == 5 and "ReduceMean" not in after and "Pow" not in after
    assert after.count("SkipSimplifiedLayerNormalization") == 4 and len(after) < len(before) - 25
    assert nbits_nodes(fused) == nbits_nodes(plain)
    name = plain.graph.input[0].name
    y0 = _session(plain.SerializeToString()).run(None, {name: ids.numpy()})[0]
    y1 = _session(fused.SerializeToString()).run(None, {name: ids.numpy()})[0]
    np.testing.assert_allclose(y1, y0, rtol=1e-4, atol=1e-4)
    assert fuse_norms(fused)[1] == 0  # nothing left to fuse: returned as is


def test_lower_onnxruntime_runs_matmul_nbits(tmp_path):
    """fxpress.lower(backend="onnxruntime") of a WeightOnly IR: ORT's optimized graph runs
    MatMulNBits (q/k fused), dynamic batch kept, saved file reruns in a plain session."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 256)
    cm = fxpress.compress(Block().eval(), (x,), fxpress.WeightOnly(bits=4, group_size=32))
    run = fxpress.lower(cm, backend="onnxruntime", example_inputs=(x,))
    assert run.report["kernels"].get("MatMulNBits") == 2 and run.report["rewrites"]["matmul_nbits"] == 2
    x3 = torch.randn(3, 8, 256)
    with torch.no_grad():
        ref = cm(x3).numpy()
    assert _sqnr(ref, run(x3).numpy()) > 25.0
    path = tmp_path / "lowered.onnx"
    run.save(str(path))
    model = onnx.load(str(path))
    assert len(nbits_nodes(model)) == 2
    y = _session(str(path)).run(None, {model.graph.input[0].name: x3.numpy()})[0]
    assert _sqnr(ref, y) > 25.0
