"""Causal LMs: capture with an explicit KV cache, generate(), and the models/benches around them.

    cm = fxpress.compress(hf_causal_lm, (input_ids,), fxpress.WeightOnly(bits=4))
    lm = fxpress.lower(cm, backend="onnxruntime")     # callable and a Generator
    out = lm.generate(input_ids, max_new_tokens=32)
    lm.save("smollm2-int4", tokenizer=tok)            # an onnxruntime-genai folder
    lm = fxpress.load("smollm2-int4")                 # or fxpress.llm.from_pretrained(dir)
"""
from .capture import (CausalLMSpec, capture_causal_lm, causal_lm_spec, complete_call,
                      is_causal_lm, wants_kv_capture)
from .generate import Generator, KVCallGenerator, select_next
from .lowering import LoweredCausalLM, lower_causal_lm, register_generator_backend

__all__ = ["CausalLMSpec", "Generator", "KVCallGenerator", "LoweredCausalLM", "capture_causal_lm",
           "causal_lm_spec", "complete_call", "from_pretrained", "is_causal_lm", "load_genai_folder",
           "lower_causal_lm", "register_generator_backend", "select_next", "wants_kv_capture"]


def load_genai_folder(path, **options):
    """An onnxruntime-genai folder written by ``lm.save`` (or ORT GenAI's builder) as a Generator."""
    from .ort import load_genai_folder as _load
    return _load(path, **options)


from_pretrained = load_genai_folder
