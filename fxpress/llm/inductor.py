"""Inductor generation for a KV-explicit causal-LM IR: compiled prefill + compiled decode step.

    cm = fxpress.compress(lm, (ids,), fxpress.WeightOnly(bits=4, group_size=128))
    gen = fxpress.lower(cm, backend="inductor")          # -> InductorCausalLM (a Generator)
    out = gen.generate(ids, max_new_tokens=64)

What the lowering does to a flat copy of the IR (fxpress.llm.capture's four inputs, logits and
the cache out), never to the user's IR:

1. **Weight-only linears -> torch's packed CPU kernels.** int4 (groups 32..256) becomes
   ``aten._weight_int4pack_mm_for_cpu`` (weights packed once by
   ``_convert_weight_to_int4pack_for_cpu``, scales and float zeros ``[G, N, 2]``), int8 with one
   scale per row ``aten._weight_int8pack_mm``. Both are vectorized on x86 only for **bf16**
   activations (fp32 in: 6-10x slower than a dense fp32 matmul, NOTES.md), so the activation is
   cast to bf16 at each such matmul and its result back to fp32; everything else (norms,
   rotary, attention, the residual stream, the KV cache) stays fp32. A K padded to whole
   groups in the IR (``slice`` after the dequantize) pads the bf16 activation with zeros.
   Other forms (int8 in groups, asymmetric int8) are left to Inductor, whose freezing folds the
   dequantize into an fp32 constant. ``report["kernels"]`` counts each.
   Measured on this 2-core AVX-512 VM (load ~5, one decode-shaped layer, ms): N=5632 K=2048
   fp32 6.47, int8pack(bf16) 1.37, int4pack(bf16) 1.14, int8pack(fp32 in) 23.5, int4pack(fp32
   in) 54.6; N=1536 K=576: fp32 0.058, int8pack 0.031, int4pack 0.090.
2. ``lm_head="int8"`` quantizes a float output projection per row to int8 (one scale per
   vocabulary row) for ``_weight_int8pack_mm``: at batch-1 decode a float 49152 x 576 head is
   113 MB read per token, more than all of SmolLM2's int4 layers. Default "float".
3. **Last position only.** The generator needs the last position's logits: the output
   projection reads ``hidden[:, -1:]``, so a 512-token prefill does not spend 512 x V x H MACs.
4. **Two compiled graphs.** One ``torch.compile``, called inside a scoped
   ``torch._inductor.config.patch(freezing=True)`` (weights become constants; the user's
   global config is untouched), its inputs marked dynamic (``maybe_mark_dynamic``: prompt
   length, past length, mask length) on every call; Dynamo specializes sizes 0 and 1, so the
   prefill (past 0, dynamic prompt length) and the decode step (1 token, dynamic past length)
   are two graphs, each compiled once (``torch.compile(dynamic=True)`` alone compiled the first
   prompt length static and recompiled for the next).

The KV cache: by default static buffers ``[B, KV, prompt + max_new_tokens, D]`` that each step
writes in place at its own columns (``fxpress.llm.static_kv``; the capacity is a dynamic
dimension, so one decode graph serves every length); ``static_kv=False`` keeps the IR's explicit
cache (the graph concatenates past and new keys: a decode step copies the cache once per layer).
On CUDA the same graph runs without weight-only kernels (the dequantize folds to fp16/fp32
constants) and, with ``cuda_graphs=True``, under ``mode="reduce-overhead"``.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..backends.base import Lowered, flat_graph
from ..errors import InputError, RecipeError
from ..registry import check_choice
from .capture import causal_lm_spec, complete_call, empty_past
from .generate import Generator

__all__ = ["InductorCausalLM", "lower_inductor", "pack_weight_only_linears", "last_position_logits"]

aten = torch.ops.aten
INT4_GROUPS = (32, 64, 128, 256)


def _register(gm: fx.GraphModule, name: str, t: torch.Tensor) -> str:
    from ..passes.quant.convert import register_tensor
    return register_tensor(gm, name, t)


def _int4_pack(q: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor | None):
    """(packed uint8, scales_and_zeros bf16 [G, N, 2]) for ``_weight_int4pack_mm_for_cpu``:
    it computes ``(u - 8) * scale + zero`` with u = q + 8 in [0, 15]; our ``(q - zp) * s`` is
    zero = -zp * s."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)
    zeros = torch.zeros_like(scales) if zp is None else -zp.float() * scales
    sz = torch.stack([scales.t(), zeros.t()], -1).contiguous().to(torch.bfloat16)
    return packed, sz


def _leading_sizes(g: fx.Graph, x: fx.Node, rank: int) -> list:
    return [g.call_function(aten.sym_size.int, (x, i)) for i in range(rank - 1)]


def _emit(g: fx.Graph, lin: fx.Node, op, op_args_fn, k: int, kp: int, n: int, bias) -> fx.Node:
    """reshape(x, [-1, K]) -> bf16 [-> pad to Kp] -> op -> fp32 -> reshape [..., N] (+ bias)."""
    x = lin.args[0]
    rank = x.meta["val"].dim() if isinstance(x.meta.get("val"), torch.Tensor) else 3
    with g.inserting_before(lin):
        lead = _leading_sizes(g, x, rank)
        x2 = g.call_function(aten.reshape.default, (x, [-1, k]))
        xb = g.call_function(aten._to_copy.default, (x2,), {"dtype": torch.bfloat16})
        if kp != k:
            xb = g.call_function(aten.constant_pad_nd.default, (xb, [0, kp - k], 0.0))
        y = g.call_function(op, (xb, *op_args_fn()))
        y = g.call_function(aten._to_copy.default, (y,), {"dtype": torch.float32})
        y = g.call_function(aten.reshape.default, (y, [*lead, n]))
        if bias is not None:
            y = g.call_function(aten.add.Tensor, (y, bias))
    return y


def _plan(fg: fx.GraphModule, lin: fx.Node, logits_src, lm_head: str):
    """(kind, weight dict) for one linear: kind "int4pack" / "int8pack", or None (left dense)."""
    from .ir_weights import _read_weight
    w = lin.args[1]
    got = _read_weight(fg, w, 0) if isinstance(w, fx.Node) else None
    if got is None:
        return None, None
    k = int(got["k"])
    if got.get("q") is None:
        if lin is not logits_src or lm_head != "int8":
            return None, None
        wt = torch.from_numpy(got["weight"])  # float head -> int8 per row
        s = (wt.abs().amax(1) / 127.0).clamp(min=1e-10)
        q = torch.round(wt / s[:, None]).clamp(-127, 127).to(torch.int8)
        got = {"q": q.numpy(), "scales": s[:, None].numpy(), "zp": None, "bits": 8, "block": k, "k": k}
    got = dict(got, q=torch.from_numpy(got["q"]), scales=torch.from_numpy(got["scales"]).float(),
               zp=None if got.get("zp") is None else torch.from_numpy(got["zp"]))
    n = got["q"].shape[0]
    bits, block = int(got["bits"]), int(got["block"])
    if bits == 4 and block in INT4_GROUPS and n % 16 == 0:
        return "int4pack", got
    if bits == 8 and got["zp"] is None and bool((got["scales"] == got["scales"][:, :1]).all()):
        return "int8pack", got
    return None, None


def _siblings(fg: fx.GraphModule, plans: list) -> list[list]:
    """Linears reading the same input in the same packed form (q/k/v, gate/up) in groups, in
    graph order; a group's biases must all be constants (or absent)."""
    from .ir_weights import constant
    groups: dict = {}
    for lin, kind, got in plans:
        bias = lin.args[2] if len(lin.args) > 2 else None
        b = None if bias is None else constant(fg, bias)
        key = (lin.args[0], kind, int(got["bits"]), int(got["block"]), got["zp"] is None,
               int(got["k"]), tuple(got["q"].shape[1:]), bias is None or b is not None)
        if not key[-1]:
            key = (lin,)  # a computed bias: alone
        groups.setdefault(key, []).append((lin, got, b))
    return list(groups.values())  # plans come in graph order: a group's first is its earliest


def pack_weight_only_linears(fg: fx.GraphModule, *, lm_head: str = "float") -> dict[str, int]:
    """Rewrite `fg`'s weight-only linears (and, with lm_head="int8", the float output
    projection) to torch's packed int4 / int8 CPU kernels, in place; returns kernel counts.

    Linears that read the same activation in the same form (q/k/v; gate/up) become ONE packed
    matmul on their concatenated weights, sliced back per linear ("fused": the linears absorbed):
    at decode every matmul is a GEMV whose fixed cost (bf16 cast, dispatch, a parallel region)
    is paid per call."""
    counts = {"int4pack": 0, "int8pack": 0, "dense": 0, "fused": 0}
    g = fg.graph
    out_node = g.output_node()
    logits_src = out_node.args[0][0] if isinstance(out_node.args[0], (tuple, list)) else None
    plans = []
    for lin in list(g.nodes):
        if lin.op != "call_function" or lin.target is not aten.linear.default:
            continue
        kind, got = _plan(fg, lin, logits_src, lm_head)
        if kind is None:
            counts["dense"] += 1
        else:
            plans.append((lin, kind, got))
    kinds = {lin: kind for lin, kind, _ in plans}
    for idx, group in enumerate(_siblings(fg, plans)):
        first = group[0][0]
        kind = kinds[first]
        q = torch.cat([got["q"] for _, got, _ in group])
        scales = torch.cat([got["scales"] for _, got, _ in group])
        zp = None if group[0][1]["zp"] is None else torch.cat([got["zp"] for _, got, _ in group])
        sizes = [int(got["q"].shape[0]) for _, got, _ in group]
        n, kp = q.shape
        k, bits, block = int(group[0][1]["k"]), int(group[0][1]["bits"]), int(group[0][1]["block"])
        bias = None
        if any(b is not None for _, _, b in group):
            bias = torch.cat([torch.zeros(sz) if b is None else b.float().reshape(-1)
                              for (_, _, b), sz in zip(group, sizes)])
        name = f"_fxwo_{idx}"
        with g.inserting_before(first):
            ba = None if bias is None else g.get_attr(_register(fg, name + "_bias", bias))
        if kind == "int4pack":
            packed, sz = _int4_pack(q, scales, zp)
            pn, sn = _register(fg, name + "_packed", packed), _register(fg, name + "_sz", sz)
            with g.inserting_before(first):
                pa, sa = g.get_attr(pn), g.get_attr(sn)
            new = _emit(g, first, aten._weight_int4pack_mm_for_cpu.default,
                        lambda: (pa, block, sa), k, kp, n, ba)
        else:
            qn = _register(fg, name + "_int8", q[:, :k].contiguous())
            sn = _register(fg, name + "_scale", scales[:, 0].contiguous().to(torch.bfloat16))
            with g.inserting_before(first):
                qa, sa = g.get_attr(qn), g.get_attr(sn)
            new = _emit(g, first, aten._weight_int8pack_mm.default, lambda: (qa, sa), k, k, n, ba)
        counts[kind] += 1
        counts["fused"] += len(group) - 1
        off = 0
        for (lin, _, _), size in zip(group, sizes):
            out = new
            if len(group) > 1:
                with g.inserting_after(new):
                    out = g.call_function(aten.slice.Tensor, (new, -1, off, off + size))
                # a slice along the last dim is strided: views of it become reshapes
                for user in list(lin.users):
                    if user.op == "call_function" and user.target is aten.view.default:
                        user.target = aten.reshape.default
            off += size
            lin.replace_all_uses_with(out)
            g.erase_node(lin)
    g.eliminate_dead_code()
    from ..passes.cleanup.dce import remove_unused_attributes
    remove_unused_attributes(fg)
    fg.recompile()
    return counts


def last_position_logits(fg: fx.GraphModule) -> bool:
    """Make the logits output the last position's only (the output projection reads
    ``hidden[:, -1:]``); False when the logits are not one linear's result."""
    g = fg.graph
    outs = g.output_node().args[0]
    logits = outs[0] if isinstance(outs, (tuple, list)) else None
    node = logits
    # the head's result may be reshaped/cast on its way out; follow one-input views
    while isinstance(node, fx.Node) and node.op == "call_function" and \
            node.target is not aten.linear.default and node.target in (
                aten.view.default, aten.reshape.default, aten._to_copy.default,
                aten.contiguous.default, aten.alias.default):
        node = node.args[0]
    if not (isinstance(node, fx.Node) and node.target is aten.linear.default):
        return False
    with g.inserting_before(node):
        last = g.call_function(aten.slice.Tensor, (node.args[0], 1, -1, 2 ** 63 - 1))
    node.replace_input_with(node.args[0], last)
    fg.recompile()
    return True


def _check_options(lm_head, cuda_graphs):
    check_choice("lm_head", lm_head, ("float", "int8"))
    check_choice("cuda_graphs", cuda_graphs, ("auto", True, False))


class InductorCausalLM(Lowered, Generator):
    """A causal-LM IR compiled by Inductor; call it like the IR, or `generate`."""

    backend = "inductor"

    def __init__(self, gm: fx.GraphModule, *, device: str = "cpu", lm_head: str = "float",
                 cuda_graphs: Any = "auto", max_length: int | None = None, weight_kernels: bool = True,
                 static_kv: bool = True):
        _check_options(lm_head, cuda_graphs)
        Lowered.__init__(self, gm)
        self.spec = causal_lm_spec(gm)
        if self.spec is None:
            raise RecipeError("lower_inductor needs a KV-explicit causal-LM IR (fxpress.llm.capture)",
                              field="model", value=type(gm).__name__)
        self.device = torch.device(device)
        self.max_length = max_length
        self._meta = {"fxpress.causal_lm": self.spec}
        cuda = self.device.type == "cuda"
        t0 = time.perf_counter()
        fg = flat_graph(gm)
        kernels = {"int4pack": 0, "int8pack": 0, "dense": 0}
        if weight_kernels and not cuda:
            kernels = pack_weight_only_linears(fg, lm_head=lm_head)
        last = last_position_logits(fg)
        from .static_kv import static_kv_cache
        self.static_kv = bool(static_kv) and static_kv_cache(fg)
        self._fg = fg.to(self.device)
        self._full = None  # the all-positions graph, compiled on the first __call__
        self._gm_full = gm
        self.cuda_graphs = bool(cuda and cuda_graphs in ("auto", True))
        mode = "reduce-overhead" if self.cuda_graphs else None
        self.compiled = torch.compile(self._fg, backend="inductor", dynamic=True, mode=mode)
        self._last_only = last
        self.report = {"kernels": kernels, "last_position_logits": last,
                       "activations": "bf16 at the packed int4/int8 matmuls, fp32 elsewhere"
                       if kernels["int4pack"] + kernels["int8pack"] else "fp32",
                       "lm_head": lm_head, "cuda_graphs": self.cuda_graphs,
                       "kv_cache": "static buffers, written in place" if self.static_kv
                       else "concatenated per step",
                       "rewrite_s": round(time.perf_counter() - t0, 2), "compiles": []}

    # Lowered.save comes first in the MRO and takes no tokenizer: a user's lm.save(dir, tokenizer=tok)
    # was a TypeError; the Generator's says what to save instead
    save = Generator.save

    # ------------------------------------------------------------------ Lowered
    @property
    def meta(self):  # complete_call reads the spec here
        return self._meta

    def _config(self):
        import torch._inductor.config as ic
        return ic.patch(freezing=True)

    def run_flat(self, flat_inputs: Sequence[torch.Tensor]):
        """The IR's outputs for its flat inputs (all positions' logits, as the IR)."""
        if self._full is None:
            fg = flat_graph(self._gm_full)
            if self.device.type != "cuda":
                pack_weight_only_linears(fg, lm_head=self.report["lm_head"])
            self._full = torch.compile(fg.to(self.device), backend="inductor", dynamic=True)
        with self._config(), torch.no_grad():
            return self._full(*[t.to(self.device) for t in flat_inputs])

    def __call__(self, *args, **kwargs):
        args, kwargs = complete_call(self, args, kwargs)
        return super().__call__(*args, **kwargs)

    # ------------------------------------------------------------------ Generator
    def start(self, batch: int, max_length: int) -> dict:
        if max_length > self.capacity():
            raise InputError(f"{max_length} tokens exceed this model's {self.capacity()} positions",
                             input_name="max_new_tokens")
        past = empty_past(self.spec, batch, max_length if self.static_kv else 0)
        return {"past": [t.to(self.device) for kv in past for t in kv]}

    def step(self, state, input_ids, attention_mask, position_ids):
        d = self.device
        ids, mask, pos = input_ids.to(d), attention_mask.to(d), position_ids.to(d)
        past = state["past"]
        # without these marks Dynamo compiles the first prompt length (and past length) static
        # and recompiles for the next; sizes 0 and 1 stay specialized (the decode graph: 1 token;
        # the prefill graph: no past)
        mark = torch._dynamo.maybe_mark_dynamic
        if ids.shape[1] > 1:
            for t in (ids, pos):
                mark(t, 1)
        if past and past[0].shape[2] > 0:  # the past length, or the static buffers' capacity
            for t in past:
                mark(t, 2)
        mark(mask, 1)
        t0 = time.perf_counter()
        with self._config(), torch.no_grad():
            out = self.compiled(ids, mask, pos, *past)
        if len(self.report["compiles"]) < 2 and time.perf_counter() - t0 > 2.0:
            self.report["compiles"].append(
                (f"tokens={input_ids.shape[1]} past={state['past'][0].shape[2]}",
                 round(time.perf_counter() - t0, 1)))
        if not self.static_kv:  # static buffers were written in place; else the cache comes back
            # one layout for every step: the prefill's present can be a transposed view of the new
            # keys (nothing to concatenate to), which would make the decode graph recompile on strides
            state["past"] = [t if t.is_contiguous() else t.contiguous() for t in out[1:]]
        return out[0][:, -1].float().cpu()

    def warmup(self, prompt_tokens: int = 8):
        """Compile both graphs now (prefill at `prompt_tokens`, then one decode step)."""
        ids = torch.zeros(1, prompt_tokens, dtype=torch.long)
        self.generate(ids, max_new_tokens=2, eos_token_id=[])
        return self


def lower_inductor(gm: fx.GraphModule, flat_example_inputs: tuple = (), *, device: str = "cpu",
                   lm_head: str = "float", cuda_graphs: Any = "auto", max_length: int | None = None,
                   weight_kernels: bool = True, static_kv: bool = True, warmup: bool = False,
                   **options) -> InductorCausalLM:
    """fxpress.lower(causal_lm_ir, backend="inductor") (registered in fxpress.llm.lowering)."""
    if options:
        raise RecipeError(f"lower(backend='inductor') of a causal LM got unknown option(s) "
                          f"{sorted(options)}", field=sorted(options)[0], value=None,
                          accepted=("lm_head", "cuda_graphs", "max_length", "weight_kernels",
                                    "static_kv", "warmup"))
    lm = InductorCausalLM(gm, device=device, lm_head=lm_head, cuda_graphs=cuda_graphs,
                          max_length=max_length, weight_kernels=weight_kernels, static_kv=static_kv)
    return lm.warmup() if warmup else lm
