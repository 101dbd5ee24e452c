"""nbits_attention.fuse_gqa: torch.onnx's decoder attention -> com.microsoft.GroupQueryAttention.

Structure (which fused ops appear, what is gone, the attributes) and numerics: at
accuracy_level 0 (fp32 MatMulNBits compute) the fused graph is the unfused one and the IR to
1e-4, on a 16-token prefill (so rotary positions 0..15 and the causal mask both matter).
"""
from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import fxpress
from fxpress.backends.onnx.nbits import export_nbits
from fxpress.backends.onnx.nbits_attention import fuse_gqa

from .test_nbits import _decoder, _Logits, _session


def _run(model: onnx.ModelProto, ids: torch.Tensor) -> np.ndarray:
    return _session(model.SerializeToString()).run(None, {model.graph.input[0].name: ids.numpy()})[0]


def _compressed(family: str, seq: int):
    torch.manual_seed(0)
    lm = _Logits(_decoder(family).eval())
    ids = torch.randint(0, 128, (1, seq))
    return fxpress.compress(lm, (ids,), fxpress.WeightOnly(bits=4, group_size=32)), ids


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_gqa_replaces_each_layers_attention(tmp_path, family):
    cm, ids = _compressed(family, 16)
    report = {}
    fused = export_nbits(cm.graph_module, (ids,), accuracy_level=0, report=report)
    plain = export_nbits(cm.graph_module, (ids,), accuracy_level=0, attention=False)
    assert report["gqa"] == 2 and report["norms"] == 5  # 2 layers; 4 + 1 final RMSNorm
    ops = collections.Counter(n.op_type for n in fused.graph.node)
    assert ops["GroupQueryAttention"] == 2
    # the rotary (Neg, Concat, Slice), repeat_kv (Expand) and softmax chains are all gone
    for gone in ("Softmax", "Neg", "Concat", "Slice", "Expand", "Transpose"):
        assert ops[gone] == 0, gone
    assert len(fused.graph.node) < len(plain.graph.node) - 2 * 25
    for n in (n for n in fused.graph.node if n.op_type == "GroupQueryAttention"):
        at = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert (at["num_heads"], at["kv_num_heads"], at["do_rotary"]) == (4, 2, 1)
        assert at["scale"] == pytest.approx(1 / 4)  # head size 16
        # Llama's fused q/k/v MatMulNBits feeds GQA packed (no Split); Qwen2's biased q/k/v
        # are separate MatMulNBits + Add, so GQA reads three inputs
        assert (n.input[1] == "" and n.input[2] == "") == (family == "llama")
    with torch.no_grad():
        ref = cm(ids).numpy()
    y_plain, y_fused = _run(plain, ids), _run(fused, ids)
    np.testing.assert_allclose(y_fused, y_plain, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(y_fused, ref, rtol=1e-4, atol=1e-4)
    path = tmp_path / "gqa.onnx"
    onnx.save(fused, str(path))
    # (no onnx.checker: it rejects ORT's SimplifiedLayerNormalization, which ORT registers in the
    # default domain and fuse_norms writes there; the plain ORT session below is the check)
    y = _session(str(path)).run(None, {"input_ids": ids.numpy()})[0]  # a plain session on the file
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seq", [1, 128])
def test_gqa_decode_and_long_prefill(seq):
    """One token (attention over one key), and 128 tokens, where torch.onnx leaves the causal
    mask as Where(And(..)) over constants (past its folder's size limit): fuse_gqa evaluates
    it, checks it is causal, and drops the dead chain. The fused graph still equals the IR."""
    cm, ids = _compressed("llama", seq)
    plain = export_nbits(cm.graph_module, (ids,), accuracy_level=0, attention=False)
    fused, n = fuse_gqa(plain)
    assert n == 2
    ops = [x.op_type for x in fused.graph.node]
    assert "Where" not in ops and "And" not in ops and "Softmax" not in ops
    if seq == 128:
        assert "Where" in [x.op_type for x in plain.graph.node]  # the unfolded mask, as said
    with torch.no_grad():
        np.testing.assert_allclose(_run(fused, ids), cm(ids).numpy(), rtol=1e-4, atol=1e-4)


def _mask_of_first_softmax(model: onnx.ModelProto):
    prod = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    sm = next(n for n in model.graph.node if n.op_type == "Softmax")
    add = prod[sm.input[0]]
    return inits[next(i for i in add.input if i in inits)]


def test_gqa_declines_what_it_does_not_match():
    """Left as it was: a partial-rotary decoder (Phi), a mask that is not causal, an attention
    intermediate that is also a graph output."""
    cm, ids = _compressed("phi", 16)
    phi = export_nbits(cm.graph_module, (ids,), accuracy_level=0, attention=False)
    same, n = fuse_gqa(phi)
    assert n == 0 and same is phi
    cm, ids = _compressed("llama", 16)
    plain = export_nbits(cm.graph_module, (ids,), accuracy_level=0, attention=False)
    # full (bidirectional) attention in layer 0: GQA's causal kernel would change the answer
    bidir = onnx.ModelProto()
    bidir.CopyFrom(plain)
    mask = _mask_of_first_softmax(bidir)
    assert (numpy_helper.to_array(mask) < -1e30).any()  # the export's causal mask
    mask.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(mask)), mask.name))
    fused, n = fuse_gqa(bidir)
    shared = sum(i == mask.name for x in bidir.graph.node for i in x.input)
    assert n == 2 - shared  # the layers reading that mask (torch.onnx shares one) are kept
    np.testing.assert_allclose(_run(fused, ids), _run(bidir, ids), rtol=1e-4, atol=1e-4)
    # the probabilities read outside the region (a graph output): nothing may be removed
    probe = onnx.ModelProto()
    probe.CopyFrom(plain)
    sm = next(x for x in probe.graph.node if x.op_type == "Softmax")
    probe.graph.output.append(onnx.helper.make_tensor_value_info(sm.output[0], onnx.TensorProto.FLOAT,
                                                                 None))
    assert fuse_gqa(probe)[1] == 1  # only the other layer


def test_gqa_takes_the_graphs_scale():
    """Scores not scaled at all (the scale Mul removed from every layer): GQA gets scale 1,
    not its 1/sqrt(head size) default, and still computes what the edited graph computes."""
    cm, ids = _compressed("llama", 16)
    edited = export_nbits(cm.graph_module, (ids,), accuracy_level=0, attention=False)
    prod = {o: n for n in edited.graph.node for o in n.output}
    drop = []
    for sm in (n for n in edited.graph.node if n.op_type == "Softmax"):
        add = prod[sm.input[0]]
        mul = next(prod[i] for i in add.input if i in prod and prod[i].op_type == "Mul")
        add.input[list(add.input).index(mul.output[0])] = mul.input[0]  # MatMul -> Add directly
        drop.append(mul)
    for mul in drop:
        edited.graph.node.remove(mul)
    fused, n = fuse_gqa(edited)
    assert n == 2
    scales = [onnx.helper.get_attribute_value(a) for x in fused.graph.node
              if x.op_type == "GroupQueryAttention" for a in x.attribute if a.name == "scale"]
    assert scales == [1.0, 1.0]
    np.testing.assert_allclose(_run(fused, ids), _run(edited, ids), rtol=1e-4, atol=1e-4)


def test_lower_onnxruntime_fuses_norms_and_attention():
    """fxpress.lower(backend="onnxruntime") of a WeightOnly HF decoder runs the same rewrites
    as export_nbits (MatMulNBits, shared-input fusion, RMSNorms, GQA where the export is
    static: this decoder's IR exports static at the example's sizes) and counts them."""
    cm, ids = _compressed("llama", 8)
    with pytest.warns(UserWarning, match="static at the example's sizes"):
        run = fxpress.lower(cm, backend="onnxruntime", example_inputs=(ids,))
    rw = run.report["rewrites"]
    assert rw["matmul_nbits"] > 0 and rw["norms"] == 5 and rw["gqa"] == 2
    assert run.report["kernels"].get("GroupQueryAttention") == 2
    ids2 = torch.randint(0, 128, ids.shape, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = cm(ids2).numpy()
    y = run(ids2).numpy()
    assert 10 * np.log10((ref ** 2).sum() / ((ref - y) ** 2).sum()) > 25
