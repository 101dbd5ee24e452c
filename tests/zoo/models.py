"""Hugging Face architectures from tiny configs (random weights, no download) for the ORT zoo.

    case = CASES["bert"]
    model, kwargs, dynamic = case.build()     # the HF model, one example call, its dynamic dims
    out = model(**kwargs)

Each case is a real transformers class, passed to fxpress unmodified; configs are the
smallest that keep the architecture's structure (1-2 layers, hidden 16-64, 32x32 images;
MobileViT 64x64, so its last transformer stage still has 2x2 patches to unfold). Swin has
two stages (window attention, a shifted-window block, a patch merge). The CNNs whose HF init
is degenerate at random weights (MobileNetV2: chaotic; MobileViT: BN gammas ~ 0.02, output
1e-30) take `_fan_in_init` weights so that numerics can tell a faithful lowering from a
broken one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import transformers as tf

__all__ = ["ZooCase", "CASES", "example"]

VOCAB = 128


@dataclass(frozen=True)
class ZooCase:
    name: str
    family: str                       # cnn | vit | encoder | encdec-encoder | decoder
    make: Callable[[], torch.nn.Module]
    inputs: str                       # image | image64 (64x64) | text | audio

    def build(self, batch: int = 2, seed: int = 0):
        """(model in eval mode, example kwargs at `batch`, compress(dynamic_shapes=...))."""
        torch.manual_seed(seed)
        model = self.make().eval()
        return model, example(self.inputs, batch, seed), _dynamic(self.inputs)


def example(inputs: str, batch: int, seed: int = 0, seq: int = 16) -> dict:
    g = torch.Generator().manual_seed(seed)
    if inputs in ("image", "image64"):
        side = 64 if inputs == "image64" else 32
        return {"pixel_values": torch.randn(batch, 3, side, side, generator=g)}
    if inputs == "audio":
        return {"input_features": torch.randn(batch, 8, 32, generator=g)}
    ids = torch.randint(1, VOCAB, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, seq - 3:] = 0  # one padded row: the mask path is exercised
    return {"input_ids": ids, "attention_mask": mask}


def _dynamic(inputs: str):
    b = torch.export.Dim("batch", max=1024)
    if inputs == "text":
        return {"input_ids": {0: b}, "attention_mask": {0: b}}
    key = "input_features" if inputs == "audio" else "pixel_values"
    return {key: {0: b}}


_TXT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64)
_DEC = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, use_cache=False)


def _fan_in_init(model: torch.nn.Module, gain: float = 1.2) -> torch.nn.Module:
    """Conv weights ~ N(0, gain^2 / fan_in): a random deep CNN that is not chaotic.

    HF's MobileNetV2 init (one std for every conv) is chaotic at any std: at 0.5 the fp32
    model turns 40 dB of input noise into 4.4 dB at its output (at 0.02 the output is 1e-27),
    so a lowering whose int8 kernels round one value in 200 differently from the IR's
    fp32-emulated Q/DQ (ORT QLinearConv's exact int32 sums; every tensor else bit-exact)
    measured 5.9 dB against the IR. With gain 1.2 / sqrt(fan_in) 40 dB of input noise
    stays 35 dB and the output keeps std 0.04 (gain 1.41, He's, is chaotic again: 26 dB)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.normal_(m.weight, std=gain / math.sqrt(m.weight[0].numel()))
        elif isinstance(m, torch.nn.BatchNorm2d):  # MobileViT draws BN gammas ~ N(0, 0.02^2):
            m.reset_parameters()                   # its output was 1e-30 (torch's 1 / 0 here)
    return model


def _whisper_encoder():
    cfg = tf.WhisperConfig(d_model=32, encoder_layers=1, encoder_attention_heads=2,
                           encoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
                           decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64,
                           vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           decoder_start_token_id=1)
    return tf.WhisperModel(cfg).get_encoder()


CASES: dict[str, ZooCase] = {c.name: c for c in [
    ZooCase("resnet", "cnn", lambda: tf.ResNetModel(tf.ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")), "image"),
    ZooCase("convnext", "cnn", lambda: tf.ConvNextModel(tf.ConvNextConfig(
        hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)), "image"),
    ZooCase("regnet", "cnn", lambda: tf.RegNetModel(tf.RegNetConfig(
        embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], groups_width=8)), "image"),
    ZooCase("mobilenet_v2", "cnn", lambda: _fan_in_init(tf.MobileNetV2Model(tf.MobileNetV2Config(
        depth_multiplier=0.25, image_size=32))), "image"),
    ZooCase("efficientnet", "cnn", lambda: tf.EfficientNetModel(tf.EfficientNetConfig(
        width_coefficient=0.1, depth_coefficient=0.1, image_size=32, hidden_dim=128,
        initializer_range=0.5)), "image"),
    ZooCase("swin", "vit", lambda: tf.SwinModel(tf.SwinConfig(
        image_size=32, patch_size=4, embed_dim=16, depths=[2, 1], num_heads=[2, 2], window_size=4,
        mlp_ratio=2.0, drop_path_rate=0.0)), "image"),
    ZooCase("mobilevit", "vit", lambda: _fan_in_init(tf.MobileViTModel(tf.MobileViTConfig(
        image_size=64, hidden_sizes=[16, 24, 32], neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64],
        num_attention_heads=2, expand_ratio=2.0, mlp_ratio=2.0))), "image64"),
    ZooCase("vit", "vit", lambda: tf.ViTModel(tf.ViTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        image_size=32, patch_size=8)), "image"),
    ZooCase("bert", "encoder", lambda: tf.BertModel(tf.BertConfig(**_TXT)), "text"),
    ZooCase("distilbert", "encoder", lambda: tf.DistilBertModel(tf.DistilBertConfig(
        vocab_size=VOCAB, dim=32, n_layers=1, n_heads=2, hidden_dim=64,
        max_position_embeddings=64)), "text"),
    ZooCase("roberta", "encoder", lambda: tf.RobertaModel(tf.RobertaConfig(**_TXT)), "text"),
    ZooCase("albert", "encoder", lambda: tf.AlbertModel(tf.AlbertConfig(
        embedding_size=16, **_TXT)), "text"),
    ZooCase("t5_encoder", "encdec-encoder", lambda: tf.T5EncoderModel(tf.T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=16, num_layers=1, num_heads=2)), "text"),
    ZooCase("whisper_encoder", "encdec-encoder", _whisper_encoder, "audio"),
    ZooCase("llama", "decoder", lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        num_key_value_heads=1, **_DEC)), "text"),
    ZooCase("qwen2", "decoder", lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(
        num_key_value_heads=1, **_DEC)), "text"),
    ZooCase("phi", "decoder", lambda: tf.PhiForCausalLM(tf.PhiConfig(**_DEC)), "text"),
    ZooCase("opt", "decoder", lambda: tf.OPTForCausalLM(tf.OPTConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        ffn_dim=64, word_embed_proj_dim=32, max_position_embeddings=64, use_cache=False)), "text"),
]}
