"""`Generator`: the generate() loop every lowered causal LM shares; backends write two methods.

A backend implements

    start(batch, max_length) -> state        a fresh KV state able to hold max_length tokens
    step(state, input_ids [B, T] int64, attention_mask [B, past + T] int64,
         position_ids [B, T] int64) -> logits [B, V]   (the last position's; state advanced by T)

and inherits `generate`, which behaves like transformers' for the arguments it takes: prompt +
new tokens back, batch > 1 with LEFT padding (the mask says which tokens are padding), each row
stops at its EOS and is padded after it, a transformers streamer (``TextStreamer``) receives the
prompt and then each new token. Bad arguments are `InputError`s naming the argument.

    lm = fxpress.lower(cm, backend="onnxruntime")
    out = lm.generate(ids, max_new_tokens=32)                  # greedy
    out = lm.generate(ids, do_sample=True, top_p=0.9, temperature=0.7, seed=0)

`KVCallGenerator` is the generic backend: any callable taking the KV IR's four inputs
(``fxpress.llm.capture``) and returning ``(logits, present)``; its state is the growing past.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..errors import InputError, LoweringError
from .capture import CausalLMSpec, empty_past, positions_from_mask

__all__ = ["Generator", "KVCallGenerator", "NoFolderFormat", "select_next"]


# transformers.generate arguments accepted at these values (the loop's behaviour); None is accepted too
NEUTRAL_ARGS = {"num_beams": 1, "num_return_sequences": 1, "use_cache": True, "repetition_penalty": 1.0,
                "min_new_tokens": 0, "no_repeat_ngram_size": 0, "output_scores": False,
                "return_dict_in_generate": False}


class NoFolderFormat(LoweringError, NotImplementedError):
    """``lm.save(dir)`` on a lowered causal LM that has no folder format (a LoweringError, and a
    NotImplementedError as ``Lowered.save`` raises for backends without an artefact)."""


def _as_ids(x, name: str) -> torch.Tensor:
    if isinstance(x, (list, tuple)):
        x = torch.tensor(x if x and isinstance(x[0], (list, tuple)) else [x])
    if hasattr(x, "__array__") and not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    if not isinstance(x, torch.Tensor) or x.dtype.is_floating_point or x.dtype == torch.bool:
        raise InputError(f"{name} must be an integer tensor [batch, tokens], got "
                         f"{getattr(x, 'dtype', type(x).__name__)}", input_name=name)
    if x.dim() == 1:
        x = x[None]
    if x.dim() != 2:
        raise InputError(f"{name} must be [batch, tokens], got shape {list(x.shape)}", input_name=name)
    return x.long()


def select_next(logits: torch.Tensor, *, do_sample: bool, temperature: float, top_k: int | None,
                top_p: float | None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from last-position logits [B, V]: argmax, or a sample after
    temperature, top-k and top-p (nucleus) filtering as transformers' warpers do."""
    if not do_sample:
        if logits.device.type == "cpu" and logits.dtype == torch.float32:
            # numpy's argmax stays on this thread: torch's splits a 49k-vocabulary row into an
            # OpenMP region whose workers then spin beside ONNX Runtime's threads at the next step
            return torch.from_numpy(np.asarray(logits.detach().numpy().argmax(-1), np.int64))
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if top_k is not None and top_k > 0:
        kth = torch.topk(scores, min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_s, idx = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_s.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[..., -1] = False  # keep at least one token
        scores = scores.masked_fill(drop.scatter(-1, idx, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)


class Generator:
    """The base of every lowered causal LM (see the module docstring)."""

    spec: CausalLMSpec
    #: the most tokens (prompt + new) one generate() can hold; None: the model's max positions
    max_length: int | None = None

    # ------------------------------------------------------------------ backend hooks
    def start(self, batch: int, max_length: int) -> Any:
        raise NotImplementedError

    def step(self, state: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             position_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def save(self, path, tokenizer=None):
        """Backends with a folder format override this (``OrtCausalLM``: an ORT GenAI folder)."""
        backend = getattr(self, "backend", None) or type(self).__name__
        raise NoFolderFormat(
            f"lm.save({str(path)!r}): the {backend!r} lowering of this {self.spec.model_type!r} model "
            "has no folder format (the 'onnxruntime' lowering writes one: an ORT GenAI folder for "
            "Llama, Mistral and Qwen2, fxpress's own for other families); keep the compressed model "
            "with cm.save(path) and lower it again after fxpress.load(path)")

    # ------------------------------------------------------------------ generate
    def capacity(self) -> int:
        return int(self.max_length or self.spec.max_positions)

    def check_generate_inputs(self, input_ids, attention_mask, max_new_tokens):
        """(ids [B, T], mask [B, T]) checked; InputErrors name the argument."""
        ids = _as_ids(input_ids, "input_ids")
        if ids.numel() == 0 or ids.shape[1] == 0:
            raise InputError("input_ids is empty: generate needs at least one prompt token",
                             input_name="input_ids")
        vocab = self.spec.vocab_size
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= vocab:
            raise InputError(f"input_ids holds token id {lo if lo < 0 else hi}, outside the "
                             f"vocabulary [0, {vocab})", input_name="input_ids")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 0:
            raise InputError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}",
                             input_name="max_new_tokens")
        if attention_mask is None:
            mask = torch.ones_like(ids)
        else:
            if isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
                attention_mask = attention_mask.long()  # transformers takes a boolean mask too
            mask = _as_ids(attention_mask, "attention_mask")
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask must have input_ids' shape {list(ids.shape)}, "
                                 f"got {list(mask.shape)}", input_name="attention_mask")
            if ((mask != 0) & (mask != 1)).any():
                raise InputError("attention_mask must hold 0 (padding) and 1 (token) only",
                                 input_name="attention_mask")
            if (mask.sum(-1) == 0).any():
                raise InputError("attention_mask has a row with no token", input_name="attention_mask")
        cap = self.capacity()
        if ids.shape[1] + max_new_tokens > cap:
            raise InputError(f"the prompt of {ids.shape[1]} tokens + max_new_tokens={max_new_tokens} "
                             f"exceeds this model's cache of {cap} tokens",
                             input_name="input_ids" if ids.shape[1] > cap else "max_new_tokens")
        return ids, mask

    def _new_from_max_length(self, input_ids, max_length) -> int:
        """transformers' ``max_length`` (prompt + new tokens) as a count of new tokens."""
        prompt, cap = _as_ids(input_ids, "input_ids").shape[1], self.capacity()
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not prompt <= max_length <= cap:
            raise InputError(f"max_length (prompt + new tokens) must be an int from the prompt's {prompt} "
                             f"tokens to this model's cache of {cap}, got {max_length!r}",
                             input_name="max_length")
        return max_length - prompt

    def generate(self, input_ids, attention_mask=None, max_new_tokens: int | None = None,
                 do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_token_id=None, pad_token_id: int | None = None,
                 streamer=None, seed: int | None = None, max_length: int | None = None,
                 **unused) -> torch.Tensor:
        """Prompt + new tokens [B, T + n] (int64), like transformers' ``generate``.

        Rows stop at ``eos_token_id`` (an int or a list; default: the model's) and are padded
        with ``pad_token_id`` after it (default: the model's pad, else its first EOS); the loop
        ends when every row has stopped or ``max_new_tokens`` are made (default 20; or
        ``max_length`` - prompt tokens when only ``max_length`` is given, as in transformers).
        transformers arguments at their greedy/sampling defaults (``num_beams=1``,
        ``use_cache=True``, ``repetition_penalty=1.0``, ...) are accepted; other values of them
        (beam search, penalties) are InputErrors.
        """
        for name, value in list(unused.items()):
            if name in NEUTRAL_ARGS and (value is None or value == NEUTRAL_ARGS[name]):
                del unused[name]
        if unused:
            raise InputError(f"generate() does not take {sorted(unused)} (beam search, penalties and "
                             f"scores are not implemented; it takes transformers' {sorted(NEUTRAL_ARGS)} "
                             "at their defaults only)", input_name=sorted(unused)[0])
        if max_new_tokens is None:
            max_new_tokens = 20 if max_length is None else self._new_from_max_length(input_ids, max_length)
        ids, mask = self.check_generate_inputs(input_ids, attention_mask, max_new_tokens)
        if do_sample and not temperature > 0:
            raise InputError(f"temperature must be > 0 when sampling, got {temperature!r}",
                             input_name="temperature")
        if eos_token_id is None:
            eos_token_id = list(self.spec.eos_token_id)
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id),
                           dtype=torch.long)
        if pad_token_id is None:
            pad_token_id = self.spec.pad_token_id
            if pad_token_id is None:
                pad_token_id = int(eos[0]) if eos.numel() else 0
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        if streamer is not None:
            streamer.put(ids.cpu())
        if max_new_tokens == 0:
            if streamer is not None:
                streamer.end()
            return ids.clone()
        batch, prompt = ids.shape
        state = self.start(batch, prompt + max_new_tokens)
        pos = positions_from_mask(mask, prompt)
        # the whole mask up front (new columns are ones): step i passes a view, not a grown copy
        full = torch.cat([mask, mask.new_ones(batch, max_new_tokens)], 1)
        logits = self.step(state, ids, mask, pos)
        done = torch.zeros(batch, dtype=torch.bool)
        eos_set = {int(e) for e in eos.tolist()}
        new = []
        for i in range(max_new_tokens):
            nxt = select_next(logits, do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, generator=gen)
            if batch == 1:  # the common case, without the per-row tensor bookkeeping (it stops at EOS)
                done[0] = int(nxt[0]) in eos_set
            else:
                nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
                if eos_set:
                    done |= torch.isin(nxt, eos)
            new.append(nxt)
            if streamer is not None:
                streamer.put(nxt.cpu())
            if bool(done.all()) or i == max_new_tokens - 1:
                break
            pos = pos[:, -1:] + 1
            n = prompt + i + 1  # batch 1: a view with a plain [n, 1] stride (compilers guard on it)
            step_mask = full[0, :n][None] if batch == 1 else full[:, :n].contiguous()
            logits = self.step(state, nxt[:, None], step_mask, pos)
        if streamer is not None:
            streamer.end()
        return torch.cat([ids, torch.stack(new, 1)], 1)


class KVCallGenerator(Generator):
    """A Generator over any callable ``fn(input_ids, attention_mask, position_ids, past) ->
    (logits [B, T, V], present)`` (the KV-explicit IR's convention): its state is the past."""

    def __init__(self, fn: Callable[..., Sequence], spec: CausalLMSpec, max_length: int | None = None):
        self._fn, self.spec, self.max_length = fn, spec, max_length

    def start(self, batch: int, max_length: int) -> dict:
        return {"past": empty_past(self.spec, batch)}

    def step(self, state, input_ids, attention_mask, position_ids):
        logits, present = self._fn(input_ids, attention_mask, position_ids, state["past"])
        state["past"] = tuple((k, v) for k, v in present)
        return logits[:, -1]
