"""Hugging Face conventions at capture: decoders capture with the KV cache off unless asked for.

A transformers decoder returns a `DynamicCache` in its output when ``config.use_cache`` is on
(the default), which torch.export cannot flatten. Compression and deployment of the model's
forward pass want no cache, so capture turns it off for the duration of the trace (the user's
config is restored afterwards) unless the call itself passes ``use_cache``. With
``example_kwargs={"use_cache": True, ...}`` the cache types are registered as pytrees with
transformers' own export helper and the cache becomes part of the IR's outputs.

    gm = fxpress.capture(LlamaForCausalLM(cfg), (ids,))   # logits only, no cache
"""
from __future__ import annotations

import contextlib

import torch

__all__ = ["hf_capture_conventions"]


@contextlib.contextmanager
def hf_capture_conventions(model: torch.nn.Module, example_kwargs: dict | None):
    config = getattr(model, "config", None)
    asked = (example_kwargs or {}).get("use_cache")
    if config is None or not hasattr(config, "use_cache"):
        yield
        return
    if asked:
        try:  # transformers ships the pytree registrations torch.export needs for its caches
            from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
        except ImportError:  # older transformers
            from transformers.integrations.executorch import (
                register_dynamic_cache_export_support as _register)

            def register_cache_pytrees_for_model(_model):
                _register()
        with contextlib.suppress(ValueError):  # already registered
            register_cache_pytrees_for_model(model)
        yield
        return
    if asked is not None or not config.use_cache:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True
