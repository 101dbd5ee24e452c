"""Tiny random-weight causal LMs of several families (use_cache on, transformers' default)."""
from __future__ import annotations

import torch

VOCAB = 128
FAMILIES = ("llama", "qwen2", "mistral", "phi", "gpt2")


def tiny_lm(family: str, seed: int = 0, layers: int = 2):
    """An eval-mode HF causal LM with ~0.1 M parameters; config.use_cache stays on."""
    import transformers as tf
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  max_position_embeddings=96, bos_token_id=1, eos_token_id=2)
    if family == "llama":
        cfg = tf.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
        cls = tf.LlamaForCausalLM
    elif family == "qwen2":
        cfg = tf.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
        cls = tf.Qwen2ForCausalLM
    elif family == "mistral":
        cfg = tf.MistralConfig(intermediate_size=128, num_key_value_heads=1, sliding_window=None, **common)
        cls = tf.MistralForCausalLM
    elif family == "phi":
        cfg = tf.PhiConfig(intermediate_size=128, **common)
        cls = tf.PhiForCausalLM
    elif family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=layers, n_head=4, n_positions=96,
                            bos_token_id=1, eos_token_id=2)
        cls = tf.GPT2LMHeadModel
    else:
        raise ValueError(family)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = cls(cfg)
        if family == "qwen2":  # random q/k/v biases, so the fused projection's bias is checked
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    torch.nn.init.normal_(proj.bias, std=0.1)
    return model.eval()


def ids(batch: int, tokens: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref, y = ref.double(), y.double()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean().clamp_min(1e-30)))
