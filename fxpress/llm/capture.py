"""Capture a Hugging Face causal LM with its KV cache explicit: one graph for prefill and decode.

A transformers causal LM whose ``config.use_cache`` is on (transformers' default) is captured
for generation: the IR takes

    input_ids        [B, T]             int64
    attention_mask   [B, P + T]         int64 (1 = token, 0 = padding; left padding)
    position_ids     [B, T]             int64
    past_key_values  ((k_0, v_0), ...)  each [B, kv_heads, P, head_dim]

and returns ``CausalLMOutputWithPast(logits [B, T, V], cache=((k_0, v_0), ...))`` whose cache
holds the P + T keys/values of every layer (a tuple of tuples, not a DynamicCache). B, T and P
are dynamic: the same graph serves a prefill (P = 0) and a decode step (T = 1). Calls that give
only ``input_ids`` (and perhaps ``attention_mask``) are completed by `complete_call` (no past,
positions from the mask), so ``cm(input_ids).logits`` is what the model returns.

The cache lives in a DynamicCache built *inside* the traced forward from the past tensors:
the user's model, config and cache objects are never touched. A model captured with
``config.use_cache = False`` (or ``example_kwargs={"use_cache": False}``) keeps the plain
forward (logits only), as before.

    gm = fxpress.capture(LlamaForCausalLM(cfg), (ids,))        # KV-explicit
    spec = causal_lm_spec(gm)                                  # layers, heads, head_dim, config
    out = gm(*complete_call(gm, (ids,), {})[0])                # prefill
"""
from __future__ import annotations

import copy
import inspect
import json
import types
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ..errors import InputError

__all__ = ["CausalLMSpec", "is_causal_lm", "wants_kv_capture", "capture_causal_lm",
           "causal_lm_spec", "complete_call", "empty_past", "positions_from_mask"]

KEY = "fxpress.causal_lm"
INPUTS = ("input_ids", "attention_mask", "position_ids", "past_key_values")


@dataclass(frozen=True)
class CausalLMSpec:
    """What a backend needs to know about a KV-explicit causal-LM IR (``gm.meta[KEY]``)."""
    KEY: ClassVar[str] = KEY
    model_type: str
    num_layers: int
    num_heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    hidden_size: int
    max_positions: int
    config_json: str = field(repr=False)  # the model's config (transformers' to_json_string)
    eos_token_id: tuple = ()
    pad_token_id: int | None = None
    bos_token_id: int | None = None

    def validate(self) -> None:
        if self.num_layers <= 0 or self.head_dim <= 0 or self.kv_heads <= 0:
            raise ValueError(f"bad causal LM spec {self}")

    def config(self):
        """A fresh transformers config (the captured model's)."""
        import transformers
        d = json.loads(self.config_json)
        cls = transformers.AutoConfig.for_model(d["model_type"]).__class__
        return cls.from_dict(d)


def is_causal_lm(model: Any) -> bool:
    """A transformers GenerationMixin model with a decoder (not encoder-decoder) config."""
    try:
        from transformers import GenerationMixin
    except ImportError:
        return False
    config = getattr(model, "config", None)
    return isinstance(model, GenerationMixin) and config is not None and \
        not getattr(config, "is_encoder_decoder", False)


def wants_kv_capture(model, example_kwargs: dict | None, dynamic_shapes=None) -> bool:
    """Capture `model` KV-explicit? A causal LM with ``config.use_cache`` on (transformers' default),
    not asked otherwise by ``example_kwargs['use_cache']`` and without a user ``dynamic_shapes``
    (which describes the plain forward's inputs)."""
    if not is_causal_lm(model) or dynamic_shapes is not None:
        return False
    asked = (example_kwargs or {}).get("use_cache")
    if asked is not None:
        return bool(asked)
    return bool(getattr(model.config, "use_cache", False))


def _text_config(model):
    cfg = model.config
    return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg


class NoKVCache(Exception):
    """The model generates without a key/value cache of [B, heads, T, head_dim] tensors (Mamba's
    state, say): `fxpress.capture` falls back to the plain forward and says why."""


def _geometry(model) -> tuple[int, int, int, int]:
    """(layers, heads, kv heads, head_dim): the config's names, the cache geometry read off one
    two-token forward (Falcon's multi-query, per-family key names); NoKVCache if there is none."""
    cfg = _text_config(model)
    layers = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not layers or not heads:
        raise NoKVCache(f"its config ({type(cfg).__name__}) names no attention heads")
    cache = _probe_cache(model)
    keys = [getattr(layer, "keys", None) for layer in getattr(cache, "layers", None) or ()]
    if not keys or any(not isinstance(k, torch.Tensor) or k.dim() != 4 for k in keys):
        raise NoKVCache(f"its forward returns {type(cache).__name__}, not per-layer key/value "
                        "tensors")
    kv, head_dim = keys[0].shape[1], keys[0].shape[3]
    if len(keys) != int(layers) or any(k.shape[1] != kv or k.shape[3] != head_dim for k in keys):
        raise NoKVCache("its cache layers differ in shape")
    return int(layers), int(heads), int(kv), int(head_dim)


def _probe_cache(model):
    """The cache one forward of two tokens returns (no grad, eval; nothing of `model` changes)."""
    param = next(model.parameters(), None)
    ids = torch.zeros(1, 2, dtype=torch.long, device=None if param is None else param.device)
    was = model.training
    try:
        with torch.no_grad():
            out = model.eval()(input_ids=ids, use_cache=True, return_dict=True)
    except Exception as e:  # noqa: BLE001  (any model error: capture will report it properly)
        raise NoKVCache(f"a two-token forward with use_cache=True failed ({type(e).__name__}: {e})") from e
    finally:
        model.train(was)
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def _spec(model) -> CausalLMSpec:
    cfg = _text_config(model)
    layers, heads, kv, head_dim = _geometry(model)
    eos = getattr(cfg, "eos_token_id", None)
    gen = getattr(model, "generation_config", None)
    if eos is None and gen is not None:
        eos = gen.eos_token_id
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    max_pos = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None) or 2048
    return CausalLMSpec(
        model_type=cfg.model_type, num_layers=layers, num_heads=heads, kv_heads=kv,
        head_dim=head_dim, vocab_size=int(cfg.vocab_size), hidden_size=int(hidden),
        max_positions=int(max_pos), config_json=model.config.to_json_string(use_diff=False),
        eos_token_id=eos, pad_token_id=getattr(cfg, "pad_token_id", None),
        bos_token_id=getattr(cfg, "bos_token_id", None))


def empty_past(spec: CausalLMSpec, batch: int, length: int = 0, dtype=torch.float32) -> tuple:
    """((k, v), ...) of zeros [batch, kv_heads, length, head_dim] per layer."""
    shape = (batch, spec.kv_heads, length, spec.head_dim)
    return tuple((torch.zeros(shape, dtype=dtype), torch.zeros(shape, dtype=dtype))
                 for _ in range(spec.num_layers))


def positions_from_mask(attention_mask: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """HF generate's positions: cumsum(mask) - 1 (padding at 1), the last `new_tokens` columns."""
    pos = attention_mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(attention_mask == 0, 1)
    return pos[:, pos.shape[1] - new_tokens:]


def _kv_forward(self, input_ids, attention_mask, position_ids, past_key_values):
    """The forward torch.export traces: a DynamicCache made here from the past tensors."""
    from transformers import DynamicCache
    from transformers.modeling_outputs import CausalLMOutputWithPast
    cache = DynamicCache(ddp_cache_data=[(k, v) for k, v in past_key_values])
    out = type(self).forward(self, input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids, cache=cache, use_cache=True,
                             return_dict=True)
    cache = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
    present = tuple((layer.keys, layer.values) for layer in cache.layers)
    return CausalLMOutputWithPast(logits=out.logits, cache=present)


def kv_module(model: torch.nn.Module) -> torch.nn.Module:
    """A shallow copy of `model` whose forward takes and returns the cache as tensors: module paths
    (``model.layers.0.self_attn.q_proj``) stay the user's; nothing of `model` is changed."""
    m = copy.copy(model)
    m.forward = types.MethodType(_kv_forward, m)
    return m


def _bind(model, args: tuple, kwargs: dict) -> dict:
    try:
        bound = inspect.signature(type(model).forward).bind(None, *args, **kwargs)
    except TypeError as e:
        raise InputError(f"example inputs do not match {type(model).__name__}.forward: {e}") from e
    out = dict(bound.arguments)
    out.pop("self", None)
    out.update(out.pop("kwargs", {}) or {})
    return out


def _user_past(cache) -> tuple | None:
    """The user's cache (DynamicCache or legacy tuples) as copied ((k, v), ...), or None."""
    if cache is None:
        return None
    layers = getattr(cache, "layers", None)
    if layers is not None:
        if not layers or getattr(layers[0], "keys", None) is None:
            return None
        return tuple((layer.keys.detach().clone(), layer.values.detach().clone()) for layer in layers)
    return tuple((k.detach().clone(), v.detach().clone()) for k, v in cache)


def _example(model, spec: CausalLMSpec, args: tuple, kwargs: dict) -> tuple:
    """The KV capture's example: the user's ids (and mask / cache, copied), else a past of 3."""
    call = _bind(model, args, kwargs)
    ids = call.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise InputError("a causal LM is captured from input_ids [batch, tokens]",
                         input_name="input_ids")
    past = _user_past(call.get("cache", call.get("past_key_values")))
    if ids.shape[1] == 1:  # a one-token example would let export fix the token count (sdpa's
        ids = ids.repeat(1, 2)  # is_causal = T > 1): trace two tokens, the graph serves any T
        call.pop("attention_mask", None), call.pop("position_ids", None)
    if past is not None and past[0][0].shape[2] < 2:
        past = None
    if past is None:  # a non-zero past whose length equals no other size of the example
        p = next(n for n in range(3, 64) if n not in (ids.shape[0], ids.shape[1]))
        gen = torch.Generator().manual_seed(0)
        past = tuple(tuple(torch.randn(ids.shape[0], spec.kv_heads, p, spec.head_dim, generator=gen)
                           for _ in range(2)) for _ in range(spec.num_layers))
    p = past[0][0].shape[2]
    mask = call.get("attention_mask")
    if mask is None or mask.shape[1] != p + ids.shape[1]:
        mask = torch.ones(ids.shape[0], p + ids.shape[1], dtype=torch.long)
    mask = mask.long()
    pos = call.get("position_ids")
    if pos is None:
        pos = positions_from_mask(mask, ids.shape[1])
    return ids, mask, pos, past


def capture_causal_lm(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None,
                      *, static_shapes: bool = False) -> fx.GraphModule:
    """The KV-explicit IR of a causal LM (see the module docstring)."""
    from torch.export import Dim
    from torch.fx.experimental import _config as fx_config

    from ..frontends.common import finish_ir
    from ..frontends.export import _capture_error
    from ..ir.signature import flatten_call
    from ..passes.analysis.shape_prop import propagate_shapes

    spec = _spec(model)
    kwargs = {k: v for k, v in (example_kwargs or {}).items() if k != "use_cache"}
    ids, mask, pos, past = _example(model, spec, example_inputs, kwargs)
    was = model.training
    kv = kv_module(model.eval())
    b, t, p = Dim.AUTO, Dim.AUTO, Dim.AUTO
    shapes = None if static_shapes else (
        {0: b, 1: t}, {0: b, 1: Dim.AUTO}, {0: b, 1: t},
        tuple(({0: b, 2: p}, {0: b, 2: p}) for _ in range(spec.num_layers)))
    example = (ids, mask, pos, past)
    try:
        with fx_config.patch(backed_size_oblivious=True), torch.no_grad():
            gm = torch.export.export(kv, example, dynamic_shapes=shapes, strict=False).module()
    except Exception as e:  # noqa: BLE001  (torch raises many types; CaptureError explains)
        raise _capture_error(e, "export") from e
    finally:
        model.train(was)  # the user's mode back
    gm.meta[KEY] = spec
    gm = finish_ir(gm)
    gm.register_forward_pre_hook(complete_hook, with_kwargs=True, prepend=True)
    info = getattr(gm.graph._codegen, "pytree_info", None)
    propagate_shapes(gm, flatten_call(info.in_spec if info else None, example, {}))
    return gm


def causal_lm_spec(gm: Any) -> CausalLMSpec | None:
    """The spec of a KV-explicit causal-LM IR (a GraphModule or a CompressedModel), else None."""
    gm = getattr(gm, "graph_module", gm)
    meta = getattr(gm, "meta", None)
    return meta.get(KEY) if isinstance(meta, dict) else None


def complete_call(gm: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """A call of a causal-LM IR completed to its four inputs: ``gm(ids)``, ``gm(ids, mask)``,
    ``gm(input_ids=ids, attention_mask=mask)`` get positions from the mask and an empty past;
    a full call is returned as is. Other IRs: unchanged."""
    spec = causal_lm_spec(gm)
    if spec is None:
        return args, kwargs
    if len(args) == 1 and isinstance(args[0], dict) and not kwargs:  # model(enc)
        args, kwargs = (), dict(args[0])
    if len(args) > len(INPUTS):
        raise InputError(f"a causal LM takes at most {len(INPUTS)} inputs ({', '.join(INPUTS)}), "
                         f"got {len(args)} positional", index=len(INPUTS))
    call = dict(zip(INPUTS, args))
    for k, v in kwargs.items():
        name = {"cache": "past_key_values"}.get(k, k)
        if name == "use_cache":
            continue
        if name not in INPUTS:
            raise InputError(f"a causal LM takes {', '.join(INPUTS)}; got unexpected keyword "
                             f"input {k!r}", input_name=k)
        if name in call:
            raise InputError(f"input {name!r} given twice", input_name=name)
        call[name] = v
    ids = call.get("input_ids")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise InputError("input_ids must be an int64 tensor [batch, tokens]", input_name="input_ids")
    past = call.get("past_key_values")
    past = _user_past(past) if past is not None and not isinstance(past, tuple) else past
    if past is None:
        past = empty_past(spec, ids.shape[0])
    total = past[0][0].shape[2] + ids.shape[1]
    mask = call.get("attention_mask")
    if mask is None:
        mask = torch.ones(ids.shape[0], total, dtype=torch.long)
    if mask.dim() != 2 or mask.shape[0] != ids.shape[0] or mask.shape[1] != total:
        raise InputError(f"attention_mask must be [batch, past + tokens] = [{ids.shape[0]}, {total}], "
                         f"got {list(mask.shape)}", input_name="attention_mask")
    mask = mask.long()
    pos = call.get("position_ids")
    if pos is None:
        pos = positions_from_mask(mask, ids.shape[1])
    return (ids, mask, pos, past), {}


def ensure_complete_hook(gm) -> None:
    """Register `complete_hook` on a causal-LM IR that lacks it (one rebuilt by a pass or
    reloaded by fxpress.load), ahead of the signature check."""
    if causal_lm_spec(gm) is not None and isinstance(gm, torch.nn.Module) and \
            not any(h is complete_hook for h in gm._forward_pre_hooks.values()):
        gm.register_forward_pre_hook(complete_hook, with_kwargs=True, prepend=True)


def complete_hook(module, args, kwargs):
    """forward pre-hook on a causal-LM IR (before the signature check): `complete_call`."""
    return complete_call(module, args, kwargs)
