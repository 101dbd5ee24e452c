"""The ONNX decoder graph of a Llama-family causal-LM IR, in onnxruntime-genai's layout.

For the families whose layers are RMSNorm -> attention (rotary, grouped KV heads) -> RMSNorm ->
SwiGLU MLP (Llama, Mistral, Qwen2, SmolLM), `build_decoder` writes the graph ORT's fused
kernels serve directly, reading the weights the IR's passes left (fxpress.llm.ir_weights):

    Gather(embed) -> SimplifiedLayerNormalization
    per layer:  MatMulNBits(q|k|v packed) -> GroupQueryAttention(rotary inside, past/present)
                -> MatMulNBits(o) -> SkipSimplifiedLayerNormalization
                -> MatMulNBits(gate|up packed) -> Split -> Sigmoid, Mul, Mul -> MatMulNBits(down)
                -> SkipSimplifiedLayerNormalization
    lm_head: MatMulNBits int8 (default for a weight-only IR) / int4 / float MatMul

Inputs ``input_ids``, ``attention_mask``, ``past_key_values.{i}.key|value``; outputs ``logits``,
``present.{i}.key|value`` (the names and BNSH layout of onnxruntime-genai and Optimum), dynamic
batch / sequence / past. ``seqlens_k = sum(attention_mask) - 1`` and
``total_sequence_length = attention_mask.shape[1]`` as ORT GenAI's builder computes them, so the
same graph serves a shared past/present buffer (IOBinding, ORT GenAI) or a growing one.
Float linears (an empty recipe) become MatMuls on [K, N] initializers, q/k/v and gate/up
concatenated likewise. Rotary tables come from the model's own rotary module (any rope type
transformers computes ahead of time).

Anything outside the plan raises `NotThisFamily` (the caller exports the IR generically).

Memory: with ``external_data=path`` every initializer of >= 1 KiB is written to that file as it is
made (`ExternalData`: offsets aligned for ORT's mmap, no ``raw_data`` in the proto, no serialized
copy of the weights), and the IR's float weights are read as views (one transposed [K, N] copy
per linear at a time): the build holds one linear's temporaries beside the IR, not a copy of
the model.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ..backends.onnx.nbits import pack_nbits, pack_zero_points
from .capture import CausalLMSpec
from .ir_weights import LinearW, linear_weights, quantize_blocks

__all__ = ["FAMILIES", "ExternalData", "NotThisFamily", "build_decoder", "rotary_tables",
           "session_entries"]

MS = "com.microsoft"
FAMILIES = ("llama", "mistral", "qwen2")
INLINE_BYTES = 1024      # smaller initializers stay in the proto (onnx.save_model's threshold)
ALIGN = 65536            # offsets of large tensors: ORT maps aligned external data on CPU
SMALL_ALIGN = 64


class ExternalData:
    """One external data file that initializers are appended to as they are made.

    `write(name, arr)` appends the array's bytes (no copy of a contiguous array) at an aligned
    offset and returns a TensorProto pointing there (``data_location=EXTERNAL``, location = the
    file's name, so the .onnx must be saved in the same folder). `close()` when done."""

    def __init__(self, path):
        self.path = Path(path)
        self.location = self.path.name
        self._f = open(self.path, "wb")  # noqa: SIM115  (closed by close() / __exit__)
        self.offset = 0

    def write(self, name: str, arr: np.ndarray) -> onnx.TensorProto:
        arr = np.ascontiguousarray(arr)
        if sys.byteorder != "little" or arr.dtype.byteorder == ">":  # ONNX stores little-endian
            arr = arr.astype(arr.dtype.newbyteorder("<"))
        align = ALIGN if arr.nbytes >= ALIGN else SMALL_ALIGN
        start = -(-self.offset // align) * align
        if start > self.offset:
            self._f.write(b"\0" * (start - self.offset))
        self._f.write(arr.reshape(-1).view(np.uint8).data)
        self.offset = start + arr.nbytes
        t = onnx.TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(arr.dtype),
                             dims=arr.shape, data_location=onnx.TensorProto.EXTERNAL)
        for key, value in (("location", self.location), ("offset", start), ("length", arr.nbytes)):
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
        return t

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def session_entries(model_path) -> dict[str, str]:
    """ORT session config entries for the decoder file `model_path` (read without its data).

    A graph without MatMulNBits (float linears only) gets ``session.disable_prepacking``: ORT then
    maps model.onnx.data (aligned offsets, `ExternalData`) and its MatMuls read the mapped file
    in place, where prepacking makes an anonymous second copy of every weight (measured, random
    4-layer ~1B Llama, fp32: +1.42 GiB peak / +1.04 GiB resident at load with prepacking, +0.01
    GiB and file-backed pages without, prefill and decode times equal within noise). MatMulNBits
    needs its packed form (120x slower decode without), so a quantized graph keeps ORT's default.
    """
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # noqa: BLE001  (not ours to judge here: the session reports it)
        return {}
    if any(n.op_type == "MatMulNBits" for n in proto.graph.node):
        return {}
    return {"session.disable_prepacking": "1"}


class NotThisFamily(Exception):
    """The IR is not one `build_decoder` writes (the message says why)."""


def rotary_tables(spec: CausalLMSpec, length: int) -> tuple[np.ndarray, np.ndarray]:
    """(cos, sin) [length, head_dim / 2] from the model's own rotary embedding module."""
    import importlib
    config = spec.config()
    mod = importlib.import_module(f"transformers.models.{spec.model_type}.modeling_{spec.model_type}")
    cls = next((getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding")), None)
    if cls is None:
        raise NotThisFamily(f"no rotary embedding class in {mod.__name__}")
    rot = cls(config=config)
    x = torch.zeros(1, 1, spec.head_dim)
    with torch.no_grad():
        cos, sin = rot(x, torch.arange(length)[None])
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    h = cos.shape[-1] // 2
    if cos.shape[-1] != spec.head_dim or not (np.array_equal(cos[:, :h], cos[:, h:]) and
                                              np.array_equal(sin[:, :h], sin[:, h:])):
        raise NotThisFamily("the rotary tables are not HF's rotate-half form over the whole head")
    return np.ascontiguousarray(cos[:, :h]), np.ascontiguousarray(sin[:, :h])


class _Builder:
    def __init__(self, accuracy_level, report: dict, data: ExternalData | None = None):
        self.nodes, self.inits, self.report = [], [], report
        self.accuracy_level = accuracy_level
        self.data = data

    def init(self, name: str, arr: np.ndarray) -> str:
        arr = np.ascontiguousarray(arr)
        if self.data is not None and arr.nbytes >= INLINE_BYTES:
            self.inits.append(self.data.write(name, arr))
        else:
            self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def matmul_weight(self, name: str, ws: list[LinearW]) -> str:
        """The float [K, N] initializer of `ws` concatenated along N: one transposed copy (per
        linear, freed once written), never a float copy of the IR's [N, K] weights."""
        k, n = ws[0].k, sum(w.n for w in ws)
        wt = np.empty((k, n), np.float32)
        at = 0
        for w in ws:
            wt[:, at:at + w.n] = w.dense().T
            at += w.n
        return self.init(name, wt)

    def node(self, op, ins, outs, name, domain="", **attrs):
        self.nodes.append(helper.make_node(op, ins, outs, name=name, domain=domain, **attrs))
        self.report.setdefault("ops", {}).setdefault(op, 0)
        self.report["ops"][op] += 1
        return outs[0] if len(outs) == 1 else outs

    def level(self, k: int, n: int, bits: int, block: int) -> int:
        lv = self.accuracy_level
        return int(lv(k, n, bits, block)) if callable(lv) else int(lv)

    def linear(self, name: str, x: str, ws: list[LinearW], out: str | None = None) -> str:
        """One node for `ws` (concatenated along N when several): MatMulNBits or MatMul."""
        k = ws[0].k
        bias = None
        if any(w.bias is not None for w in ws):
            bias = np.concatenate([w.bias if w.bias is not None else np.zeros(w.n, np.float32)
                                   for w in ws]).astype(np.float32)
        n = sum(w.n for w in ws)
        q = ws[0]
        if all(w.quantized for w in ws) and len({(w.bits, w.block, w.q.shape[1], w.zp is None)
                                                for w in ws}) == 1:
            packed = np.concatenate([pack_nbits(w.q, q.bits, q.block) for w in ws])
            scales = np.concatenate([w.scales for w in ws]).reshape(-1).astype(np.float32)
            ins = [x, self.init(f"{name}.qweight", packed), self.init(f"{name}.scales", scales)]
            if q.zp is not None:
                zp = np.concatenate([w.zp for w in ws])
                ins.append(self.init(f"{name}.zero_points", pack_zero_points(zp, q.bits)))
            if bias is not None:
                ins += [""] * (5 - len(ins)) + [self.init(f"{name}.bias", bias)]
            level = self.level(k, n, q.bits, q.block)
            self.report.setdefault("accuracy_levels", {})[name] = level
            return self.node("MatMulNBits", ins, [out or f"{name}/out"], name, MS, K=k, N=n, bits=q.bits,
                             block_size=q.block, accuracy_level=level)
        w = self.matmul_weight(f"{name}.weight_t", ws)
        if bias is None:
            return self.node("MatMul", [x, w], [out or f"{name}/out"], name)
        y = self.node("MatMul", [x, w], [f"{name}/out"], name)
        return self.node("Add", [y, self.init(f"{name}.bias", bias)], [out or f"{name}/biased"],
                         name + "/bias")


def _find(ws: dict, *paths: str) -> list[LinearW]:
    got = []
    for p in paths:
        if p not in ws:
            raise NotThisFamily(f"no linear {p!r} in the IR")
        got.append(ws[p])
    return got


def _param(gm, name: str) -> np.ndarray:
    obj = gm
    try:
        for part in name.split("."):
            obj = getattr(obj, part)
    except AttributeError as e:
        raise NotThisFamily(f"no parameter {name!r} in the IR") from e
    return obj.detach().float().cpu().numpy()


def _embedding(gm) -> np.ndarray:
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target == torch.ops.aten.embedding.default:
            from .ir_weights import constant
            w = constant(gm, n.args[0])
            if w is not None:
                return w.detach().float().numpy()
    raise NotThisFamily("no embedding lookup on a constant table in the IR")


def check_family(spec: CausalLMSpec) -> None:
    cfg = spec.config()
    if spec.model_type not in FAMILIES:
        raise NotThisFamily(f"model type {spec.model_type!r} (written directly: {', '.join(FAMILIES)})")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise NotThisFamily(f"activation {cfg.hidden_act!r} (the plan has SiLU)")
    sw = getattr(cfg, "sliding_window", None)
    if sw is not None and getattr(cfg, "use_sliding_window", True) and sw < spec.max_positions:
        raise NotThisFamily(f"sliding window {sw} < max positions {spec.max_positions}")


def build_decoder(gm, spec: CausalLMSpec, *, lm_head: str = "auto", accuracy_level=4,
                  max_positions: int | None = None, report: dict | None = None,
                  fuse_gate_up: bool = True, external_data=None) -> onnx.ModelProto:
    """The ORT GenAI-layout decoder of a Llama-family IR (see the module docstring).

    lm_head: "auto" (int8 when the IR's linears are weight-only quantized, else as the IR has it),
    "int8", "int4" (blocks of 32), "float" (the IR's head, dequantized if it is quantized).
    accuracy_level: an int, or a callable (K, N, bits, block) -> int. fuse_gate_up: one
    MatMulNBits + Split for gate and up (False: two MatMulNBits, ORT GenAI's builder's form).
    external_data: a file path (``<folder>/model.onnx.data``): initializers of >= 1 KiB are
    streamed there as they are made and the returned proto points at it, so it must be saved
    (plainly, ``onnx.save_model(model, "<folder>/model.onnx")``) in that folder; None keeps
    every initializer in the proto (raw_data).
    """
    report = {} if report is None else report
    check_family(spec)
    ws, unread = linear_weights(gm)
    if unread:
        raise NotThisFamily(f"linears not in a weight-only / float form: {unread[:3]}")
    data = ExternalData(external_data) if external_data is not None else None
    try:
        return _build(_Builder(accuracy_level, report, data), gm, spec, ws, lm_head=lm_head,
                      max_positions=max_positions, fuse_gate_up=fuse_gate_up)
    finally:
        if data is not None:
            data.close()


def _build(b: _Builder, gm, spec: CausalLMSpec, ws: dict, *, lm_head: str, max_positions,
           fuse_gate_up: bool) -> onnx.ModelProto:
    report, cfg = b.report, spec.config()
    L, H, KV, D = spec.num_layers, spec.num_heads, spec.kv_heads, spec.head_dim
    eps = float(getattr(cfg, "rms_norm_eps", 1e-6))
    ids_in = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    mask_in = helper.make_tensor_value_info("attention_mask", TensorProto.INT64,
                                            ["batch_size", "total_sequence_length"])
    inputs, outputs = [ids_in, mask_in], []
    for i in range(L):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(
                f"past_key_values.{i}.{kind}", TensorProto.FLOAT,
                ["batch_size", KV, "past_sequence_length", D]))
    # seqlens_k / total_sequence_length as ORT GenAI's builder computes them
    one = b.init("const_one_i64", np.array([1], np.int64))
    s = b.node("ReduceSum", ["attention_mask", one], ["mask/sum"], "mask/ReduceSum", keepdims=0)
    s = b.node("Sub", [s, one], ["mask/sub"], "mask/Sub")
    seqlens = b.node("Cast", [s], ["seqlens_k"], "mask/Cast", to=TensorProto.INT32)
    shp = b.node("Shape", ["attention_mask"], ["mask/shape"], "mask/Shape")
    tot = b.node("Gather", [shp, b.init("const_one_scalar", np.array(1, np.int64))], ["mask/total"],
                 "mask/Gather", axis=0)
    total = b.node("Cast", [tot], ["total_sequence_length"], "mask/CastTotal", to=TensorProto.INT32)
    cos, sin = rotary_tables(spec, max_positions or spec.max_positions)
    cos_n, sin_n = b.init("cos_cache", cos), b.init("sin_cache", sin)

    x = b.node("Gather", [b.init("model.embed_tokens.weight", _embedding(gm)), "input_ids"],
               ["embed/out"], "embed", axis=0)
    h = b.node("SimplifiedLayerNormalization",
               [x, b.init("model.layers.0.input_layernorm.weight",
                          _param(gm, "model.layers.0.input_layernorm.weight"))],
               ["layers.0/input_norm"], "layers.0/input_layernorm", axis=-1, epsilon=eps, stash_type=1)
    residual = x
    scale = float(getattr(cfg, "attention_multiplier", None) or D ** -0.5)
    for i in range(L):
        p = f"model.layers.{i}"
        qkv = b.linear(f"{p}.self_attn.qkv_proj", h,
                       _find(ws, *(f"{p}.self_attn.{n}_proj" for n in "qkv")))
        attn, pk, pv = b.node("GroupQueryAttention",
                              [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                               seqlens, total, cos_n, sin_n],
                              [f"layers.{i}/attn", f"present.{i}.key", f"present.{i}.value"],
                              f"{p}.self_attn.GroupQueryAttention", MS, num_heads=H, kv_num_heads=KV,
                              scale=scale, do_rotary=1, rotary_interleaved=0, local_window_size=-1)
        o = b.linear(f"{p}.self_attn.o_proj", attn, _find(ws, f"{p}.self_attn.o_proj"))
        h, _, _, residual = b.node(
            "SkipSimplifiedLayerNormalization",
            [residual, o, b.init(f"{p}.post_attention_layernorm.weight",
                                 _param(gm, f"{p}.post_attention_layernorm.weight"))],
            [f"layers.{i}/post_norm", "", "", f"layers.{i}/post_residual"],
            f"{p}.post_attention_layernorm", MS, epsilon=eps)
        gate_w, up_w = _find(ws, f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj")
        if fuse_gate_up:
            gu = b.linear(f"{p}.mlp.gate_up_proj", h, [gate_w, up_w])
            gate, up = b.node("Split", [gu, b.init(f"{p}.mlp.split", np.array([gate_w.n, up_w.n], np.int64))],
                              [f"layers.{i}/gate", f"layers.{i}/up"], f"{p}.mlp.Split", axis=-1)
        else:
            gate = b.linear(f"{p}.mlp.gate_proj", h, [gate_w])
            up = b.linear(f"{p}.mlp.up_proj", h, [up_w])
        sg = b.node("Sigmoid", [gate], [f"layers.{i}/sigmoid"], f"{p}.mlp.act.Sigmoid")
        act = b.node("Mul", [gate, sg], [f"layers.{i}/silu"], f"{p}.mlp.act.Mul")
        act = b.node("Mul", [act, up], [f"layers.{i}/swiglu"], f"{p}.mlp.Mul")
        down = b.linear(f"{p}.mlp.down_proj", act, _find(ws, f"{p}.mlp.down_proj"))
        nxt = f"model.layers.{i + 1}.input_layernorm.weight" if i + 1 < L else "model.norm.weight"
        outs = [f"layers.{i + 1}/input_norm", "", "", f"layers.{i + 1}/residual"]
        h, _, _, residual = b.node("SkipSimplifiedLayerNormalization",
                                   [residual, down, b.init(nxt, _param(gm, nxt))], outs,
                                   nxt.rsplit(".", 1)[0], MS, epsilon=eps)
    head = _find(ws, "lm_head")[0]
    quantized_ir = any(w.quantized for w in ws.values())
    choice = lm_head if lm_head != "auto" else ("int8" if quantized_ir and not head.quantized
                                                 else "ir")
    if choice in ("int8", "int4"):
        head = quantize_blocks(head.dense(), 8 if choice == "int8" else 4, 32)
        head.path = "lm_head"
    elif choice == "float" and head.quantized:
        head = LinearW("lm_head", head.n, head.k, weight=head.dense(), bias=head.bias)
    report["lm_head"] = choice if choice != "ir" else ("ir (quantized)" if head.quantized else "float")
    b.linear("lm_head", h, [head], out="logits")
    outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                 ["batch_size", "sequence_length", spec.vocab_size]))
    for i in range(L):
        for kind in ("key", "value"):
            outputs.append(helper.make_tensor_value_info(
                f"present.{i}.{kind}", TensorProto.FLOAT, ["batch_size", KV, "total_sequence_length", D]))
    graph = helper.make_graph(b.nodes, "fxpress_decoder", inputs, outputs, b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                     helper.make_opsetid(MS, 1)],
                              producer_name="fxpress")
    model.ir_version = 10
    return model
