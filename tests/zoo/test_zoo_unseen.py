"""Hugging Face families fxpress was not built on, unmodified, through the coverage it promises.

Per family (tiny configs, random weights; `_fan_in_init` where HF's init is degenerate):
- dynamic int8 covers >= 90 % of the linear-like MACs (linear, addmm / Conv1D, matmul / einsum
  of a weight); static covers >= 90 % of the conv + linear-like MACs;
- ChannelPruning(0.3) removes >= 20 % of the prunable parameters, or the report says why per
  group (kept whole: <reason>);
- the default static recipe is > 20 dB vs fp32 where the model has a conv or linear;
- every ONNX Runtime lowering is > 25 dB vs its IR (lower()'s own check records it);
- the coverage section is present.
A few cells are fast (FAST); the rest are `slow`.
"""
from __future__ import annotations

import math
import warnings

import pytest
import torch
import transformers as tf

import fxpress

pytest.importorskip("onnxruntime")

VOCAB = 128
LINEAR_LIKE = {"linear", "addmm", "matmul", "mm", "bmm", "baddbmm", "einsum"}
CONV = {"conv1d", "conv2d", "conv3d", "convolution"}
COVER, PRUNED, STATIC_DB, LOWERED_DB = 0.90, 0.20, 20.0, 25.0


def _fan_in_init(model: torch.nn.Module, gain: float = 1.2) -> torch.nn.Module:
    """Conv / linear weights ~ N(0, gain^2 / fan_in), norms reset: a random deep net that is
    neither chaotic nor vanishing (HF's one-std init is, for the CNNs here)."""
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.normal_(m.weight, std=gain / math.sqrt(m.weight[0].numel()))
        elif isinstance(m, (torch.nn.BatchNorm2d, torch.nn.LayerNorm, torch.nn.GroupNorm)):
            m.reset_parameters()
    return model


_TXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64)
_ENCDEC = dict(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1,
               encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
               decoder_ffn_dim=64, max_position_embeddings=64, use_cache=False, pad_token_id=0,
               decoder_start_token_id=1, bos_token_id=1, eos_token_id=2)
_VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
            image_size=32, patch_size=8)

# name -> (factory, inputs kind)
FAMILIES = {
    "gpt2": (lambda: tf.GPT2Model(tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2,
                                                n_positions=64, use_cache=False)), "text"),
    "bloom": (lambda: tf.BloomModel(tf.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=1,
                                                   n_head=2, use_cache=False)), "text"),
    "falcon": (lambda: tf.FalconModel(tf.FalconConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        use_cache=False)), "text"),
    "gemma2": (lambda: tf.Gemma2Model(tf.Gemma2Config(
        num_key_value_heads=1, head_dim=16, use_cache=False, **_TXT)), "text"),
    "gptj": (lambda: tf.GPTJModel(tf.GPTJConfig(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2,
                                                rotary_dim=8, n_positions=64, use_cache=False)), "text"),
    "bart": (lambda: tf.BartModel(tf.BartConfig(**_ENCDEC)), "seq2seq"),
    "marian": (lambda: tf.MarianMTModel(tf.MarianConfig(**_ENCDEC)), "seq2seq"),
    "wav2vec2": (lambda: tf.Wav2Vec2Model(tf.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2, vocab_size=VOCAB)), "audio"),
    "beit": (lambda: tf.BeitModel(tf.BeitConfig(**_VIT)), "image"),
    "clip_vision": (lambda: tf.CLIPVisionModel(tf.CLIPVisionConfig(**_VIT)), "image"),
    "clip_text": (lambda: tf.CLIPTextModel(tf.CLIPTextConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=64)), "text"),
    "yolos": (lambda: tf.YolosModel(tf.YolosConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=[32, 32], patch_size=8, num_detection_tokens=4), add_pooling_layer=False), "image"),
    "mobilenet_v1": (lambda: _fan_in_init(tf.MobileNetV1Model(tf.MobileNetV1Config(
        depth_multiplier=0.25, image_size=32))), "image"),
    # HF's LeViT init leaves the output at std 1.6e-7: fan-in weights (std 0.28)
    "levit": (lambda: _fan_in_init(tf.LevitModel(tf.LevitConfig(
        image_size=32, patch_size=16, hidden_sizes=[32, 48], num_attention_heads=[2, 2],
        depths=[1, 1], key_dim=[8, 8], mlp_ratio=[2, 2],
        attention_ratio=[2, 2], down_ops=[["Subsample", 8, 2, 4, 2, 2]]))), "image"),
    "poolformer": (lambda: _fan_in_init(tf.PoolFormerModel(tf.PoolFormerConfig(
        num_encoder_blocks=2, depths=[1, 1], hidden_sizes=[8, 16], patch_sizes=[7, 3],
        strides=[4, 2], padding=[2, 1], mlp_ratio=2.0))), "image"),
    "segformer": (lambda: tf.SegformerModel(tf.SegformerConfig(
        num_encoder_blocks=2, depths=[1, 1], sr_ratios=[2, 1], hidden_sizes=[16, 32],
        patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2], mlp_ratios=[2, 2],
        decoder_hidden_size=32)), "image"),
    "mamba": (lambda: tf.MambaModel(tf.MambaConfig(
        vocab_size=VOCAB, hidden_size=32, state_size=8, num_hidden_layers=1, expand=2,
        conv_kernel=4, use_cache=False)), "ids"),
}


def example(kind: str, batch: int, seed: int = 0, seq: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    if kind == "audio":
        return {"input_values": torch.randn(batch, 400, generator=g)}
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    if kind == "ids":
        return {"input_ids": ids}
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 3:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if kind == "seq2seq":
        out["decoder_input_ids"] = torch.randint(3, VOCAB, (batch, 8), generator=g)
    return out


def build(name: str, batch: int = 2):
    make, kind = FAMILIES[name]
    torch.manual_seed(0)
    model = make().eval()
    kw = example(kind, batch)
    b = torch.export.Dim("batch", max=1024)
    return model, kw, {k: {0: b} for k in kw}, [example(kind, batch, seed=s) for s in (1, 2)]


def compress(name: str, recipe):
    model, kw, dyn, calib = build(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxpress.CoverageWarning)  # the cells assert the numbers
        cm = fxpress.compress(model, (), recipe, example_kwargs=kw, dynamic_shapes=dyn,
                              calibration=calib)
    return model, kw, cm


def covered(cov: dict, kinds: set[str]) -> tuple[float, float]:
    """(share of the MACs of `kinds` that is int8/int4, their share of the weight MACs)."""
    rows = {k: v for k, v in cov["kinds"].items() if k in kinds}
    total = sum(v["macs"] for v in rows.values())
    return (sum(v["quantized"] for v in rows.values()) / total if total else 1.0), total


def main_output(out) -> torch.Tensor:
    for key in ("last_hidden_state", "logits", "extract_features"):
        if getattr(out, key, None) is not None:
            return getattr(out, key)
    return out[0]


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    from fxpress.backends.compare import sqnr as _sqnr
    return _sqnr(ref, y)


def lowered_db(cm, kw) -> float:
    run = fxpress.lower(cm, "onnxruntime")
    chk = run.report["check"]
    assert chk["sqnr_db"] > LOWERED_DB, chk
    return chk["sqnr_db"]


# cells: (family, recipe); FAST run in `make test`, every other one is slow
FAST = {("gpt2", "dynamic"), ("falcon", "prune30"), ("mobilenet_v1", "static")}
RECIPES = ("dynamic", "static", "prune30")


def _cells():
    for name in FAMILIES:
        for r in RECIPES:
            marks = () if (name, r) in FAST else (pytest.mark.slow,)
            yield pytest.param(name, r, id=f"{name}-{r}", marks=marks + XFAIL.get((name, r), ()))


# Cells expected to fail (strict: a fix turns them into failures to un-mark). None today: YOLOS
# and LeViT static pass since the transformer observer widens ranges a tiny calibration under-
# estimates (observers.TailMinMaxObserver; YOLOS 18.2 -> 28.3 dB, LeViT 12.2 -> 21.2 dB on the
# example; LeViT's full-int8 ceiling is ~24 dB even with 64 calibration images).
XFAIL: dict[tuple[str, str], tuple] = {}


@pytest.mark.parametrize("name,recipe", list(_cells()))
def test_unseen_family(name, recipe):
    if recipe == "dynamic":
        model, kw, cm = compress(name, fxpress.Quantize(mode="dynamic"))
        cov = cm.report["coverage"]
        share, total = covered(cov, LINEAR_LIKE)
        if total:
            assert share >= COVER, (share, str(cov))
    elif recipe == "static":
        model, kw, cm = compress(name, fxpress.Quantize())
        cov = cm.report["coverage"]
        share, total = covered(cov, LINEAR_LIKE | CONV)
        if total:
            assert share >= COVER, (share, str(cov))
            with torch.no_grad():
                db = sqnr(main_output(model(**kw)), main_output(cm(**kw)))
            assert db > STATIC_DB, (db, str(cm.report))
    else:
        model, kw, cm = compress(name, fxpress.ChannelPruning(ratio=0.3))
        cov = cm.report["coverage"]
        st = cm.report["prune_channels"]
        prunable = st["prunable_params"]
        removed = st["params_before"] - st["params_after"]
        text = cm.report.sections["channel_pruning"]
        if removed < PRUNED * prunable:  # then every group that lost nothing says why
            assert "not pruned (" in text or "kept whole (" in text, text
        assert "unresolved coupling" not in text, text
    assert "coverage" in cm.report.sections and cov["weight_macs"] > 0
    lowered_db(cm, kw)
