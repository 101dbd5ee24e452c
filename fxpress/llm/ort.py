"""A causal LM on ONNX Runtime: one onnxruntime-genai-layout model.onnx, generating over a shared KV buffer.

`lower_onnxruntime` (what ``fxpress.lower(cm, "onnxruntime")`` runs for a causal-LM IR) writes
the IR of a Llama-family decoder with `ort_graph.build_decoder` (GroupQueryAttention with
rotary inside, packed q/k/v and gate/up MatMulNBits, fused RMSNorms) and returns an
`OrtCausalLM`: callable like the IR (``lm(ids)``, ``lm(ids, mask, positions, past)`` ->
``CausalLMOutputWithPast(logits, cache)``) and a `Generator` (``lm.generate``). Other families
go through the generic ONNX export (`fxpress.backends.onnxruntime`) and generate over a growing
past (`LoweredCausalLM`).

Generation binds each layer's past and present to ONE preallocated [B, kv_heads, max_length,
head_dim] buffer (IOBinding; GroupQueryAttention writes the new keys/values in place, as ORT
GenAI runs it): a step copies no cache and allocates nothing but its logits. Left-padded
batches are turned into right-padded rows inside (GQA's native layout: each row's length is
``seqlens_k + 1``), so positions and masks equal transformers' for every row.

    lm = fxpress.lower(cm, backend="onnxruntime", lm_head="int8", threads=2)
    lm.save("out", tokenizer=tok)      # model.onnx + model.onnx.data + genai_config.json + tokenizer
    onnxruntime_genai.Model("out")     # runs it unchanged
    lm = fxpress.load("out")           # an OrtCausalLM again
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..errors import InputError, LoweringError
from ..recipe import check_choice
from .capture import CausalLMSpec, causal_lm_spec, complete_call
from .generate import Generator

__all__ = ["OrtCausalLM", "genai_config", "load_genai_folder", "lower_onnxruntime", "write_model"]

MODEL, DATA = "model.onnx", "model.onnx.data"
LM_HEADS = ("auto", "int8", "int4", "float")


def write_model(model: onnx.ModelProto, folder: Path) -> Path:
    """model.onnx + model.onnx.data (one external file) in `folder`; returns the .onnx path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / MODEL
    if not any(len(t.raw_data) >= 1024 for t in model.graph.initializer):
        # streamed by build_decoder (its data file is in `folder`): nothing to move. onnx's
        # conversion below also refuses when the CWD holds a model.onnx.data (a cwd-relative check)
        onnx.save_model(model, str(path))
        return path
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=DATA, size_threshold=1024)
    return path


def genai_config(spec: CausalLMSpec, context_length: int) -> dict:
    """onnxruntime-genai's genai_config.json for the graph `build_decoder` writes."""
    eos = list(spec.eos_token_id)
    pad = spec.pad_token_id if spec.pad_token_id is not None else (eos[0] if eos else 0)
    return {
        "model": {
            "bos_token_id": spec.bos_token_id if spec.bos_token_id is not None else 0,
            "context_length": context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": MODEL,
                "head_size": spec.head_dim,
                "hidden_size": spec.hidden_size,
                "inputs": {"input_ids": "input_ids", "attention_mask": "attention_mask",
                           "past_key_names": "past_key_values.%d.key",
                           "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": spec.num_heads,
                "num_hidden_layers": spec.num_layers,
                "num_key_value_heads": spec.kv_heads,
            },
            "eos_token_id": eos[0] if len(eos) == 1 else eos,
            "pad_token_id": pad,
            "type": spec.model_type,
            "vocab_size": spec.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True,
                   "length_penalty": 1.0, "max_length": context_length, "min_length": 0,
                   "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": True, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }


def spec_from_json(meta: dict) -> CausalLMSpec:
    """The spec `spec_json` wrote (fxpress.json's "causal_lm")."""
    return CausalLMSpec(**{k: tuple(v) if k == "eos_token_id" else v for k, v in meta.items()})


def _spec_from_genai(cfg: dict, fx_meta: dict | None) -> CausalLMSpec:
    if fx_meta:
        return spec_from_json(fx_meta)
    m, d = cfg["model"], cfg["model"]["decoder"]
    eos = m.get("eos_token_id")
    eos = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return CausalLMSpec(model_type=m.get("type", "llama"), num_layers=d["num_hidden_layers"],
                        num_heads=d["num_attention_heads"], kv_heads=d["num_key_value_heads"],
                        head_dim=d["head_size"], vocab_size=m["vocab_size"],
                        hidden_size=d["hidden_size"], max_positions=m["context_length"],
                        config_json="{}", eos_token_id=eos, pad_token_id=m.get("pad_token_id"),
                        bos_token_id=m.get("bos_token_id"))


class OrtCausalLM(Generator):
    """A genai-layout decoder in one ORT session (see the module docstring)."""

    backend = "onnxruntime"

    def __init__(self, folder: Path, spec: CausalLMSpec, *, threads: int | None = None,
                 report: dict | None = None, tmp: tempfile.TemporaryDirectory | None = None,
                 spinning: bool = True):
        import onnxruntime as ort

        from ..backends.onnxruntime import session_options
        self.folder, self.spec, self._tmp = Path(folder), spec, tmp
        self.report = dict(report or {})
        so = session_options(threads, "all", spinning=spinning)
        from .ort_graph import session_entries
        for key, value in session_entries(self.folder / MODEL).items():  # no 2nd copy of fp32 weights
            so.add_session_config_entry(key, value)
        t0 = time.perf_counter()
        try:
            self.session = ort.InferenceSession(str(self.folder / MODEL), so,
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises its own exception types
            raise LoweringError(f"ONNX Runtime refused the decoder graph: {e}") from e
        self.report["session_s"] = round(time.perf_counter() - t0, 2)
        self.meta = {"fxpress.causal_lm": spec}  # complete_call reads the spec here
        names = [i.name for i in self.session.get_inputs()]
        self.past_names = [n for n in names if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.max_length = spec.max_positions
        self._ones = np.ones((1, self.max_length), np.int64)

    # ------------------------------------------------------------------ the IR's calling convention
    def __call__(self, *args, **kwargs):
        """Like the IR: ``lm(ids)`` or ``lm(ids, mask, positions, past)`` -> CausalLMOutputWithPast.
        Positions are the graph's own (past length + i per row: GroupQueryAttention's), so a mask
        with padding gives transformers' numbers only through `generate`."""
        from transformers.modeling_outputs import CausalLMOutputWithPast
        (ids, mask, _pos, past), _ = complete_call(self, args, kwargs)
        feed = {"input_ids": ids.long().numpy(), "attention_mask": mask.long().numpy()}
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = k.detach().float().contiguous().numpy()
            feed[f"past_key_values.{i}.value"] = v.detach().float().contiguous().numpy()
        outs = self.session.run(["logits", *self.present_names], feed)
        present = tuple((torch.from_numpy(outs[1 + 2 * i]), torch.from_numpy(outs[2 + 2 * i]))
                        for i in range(self.spec.num_layers))
        return CausalLMOutputWithPast(logits=torch.from_numpy(outs[0]), cache=present)

    # ------------------------------------------------------------------ Generator
    def start(self, batch: int, max_length: int) -> dict:
        import onnxruntime as ort
        cap = int(max_length)
        shape = [batch, self.spec.kv_heads, cap, self.spec.head_dim]
        io = self.session.io_binding()
        io.bind_output("logits", "cpu")  # first: get_outputs()[0] is the logits
        buffers = []
        for past, present in zip(self.past_names, self.present_names):
            buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, np.float32, "cpu", 0)
            io.bind_ortvalue_input(past, buf)
            io.bind_ortvalue_output(present, buf)
            buffers.append(buf)
        logits = ort.OrtValue.ortvalue_from_shape_and_type([batch, 1, self.spec.vocab_size],
                                                           np.float32, "cpu", 0)
        return {"io": io, "buffers": buffers, "batch": batch, "cap": cap, "lengths": None,
                "total": 0, "decode_logits": logits, "ids": np.zeros((batch, 1), np.int64)}

    def step(self, state, input_ids, attention_mask, position_ids):
        io, b = state["io"], state["batch"]
        t = input_ids.shape[1]
        if state["lengths"] is None:  # the prompt: left padding -> right padding per row
            mask = attention_mask.numpy().astype(np.int64)
            lengths = mask.sum(1)
            ids = input_ids.numpy().astype(np.int64)
            if (lengths != t).any():
                ids = np.stack([np.roll(r, -int(t - n)) for r, n in zip(ids, lengths)])
                mask = (np.arange(t)[None] < lengths[:, None]).astype(np.int64)
            else:
                mask = np.ascontiguousarray(mask)
            state["lengths"], state["total"] = lengths, t
            io.bind_cpu_input("input_ids", np.ascontiguousarray(ids))
            io.bind_cpu_input("attention_mask", mask)
            self.session.run_with_iobinding(io)
            logits = io.get_outputs()[0].numpy()
            last = logits[np.arange(b), lengths - 1]
            io.bind_ortvalue_output("logits", state["decode_logits"])
            return torch.from_numpy(np.ascontiguousarray(last))
        if t != 1:
            raise InputError("after the prompt, generation steps take one token per row",
                             input_name="input_ids")
        if attention_mask.shape[1] != state["total"] + 1:
            raise InputError(f"attention_mask must cover past + new = {state['total'] + 1} tokens, "
                             f"got {attention_mask.shape[1]}", input_name="attention_mask")
        state["total"] += 1
        if state["total"] > state["cap"]:
            raise InputError(f"the KV buffer holds {state['cap']} tokens; start() a longer one",
                             input_name="input_ids")
        ids = state["ids"]  # bound once, as an OrtValue over this array: written in place
        ids[:, 0] = input_ids[:, 0].numpy()
        if "ids_bound" not in state:
            import onnxruntime as ort
            state["ids_bound"] = ort.OrtValue.ortvalue_from_numpy(ids)
            io.bind_ortvalue_input("input_ids", state["ids_bound"])
        total = state["total"]
        state["lengths"] = state["lengths"] + 1
        if b == 1:
            mask = self._ones[:, :total]
        else:  # row b holds lengths[b] tokens at the left of its buffer
            mask = (np.arange(total)[None] < state["lengths"][:, None]).astype(np.int64)
        io.bind_cpu_input("attention_mask", mask)
        self.session.run_with_iobinding(io)
        # a copy: the bound logits buffer is overwritten by the next step
        return torch.from_numpy(state["decode_logits"].numpy()[:, 0].copy())

    # ------------------------------------------------------------------ files
    def save(self, path, tokenizer=None) -> Path:
        """An onnxruntime-genai folder: model.onnx, model.onnx.data, genai_config.json, the
        tokenizer's files when given one, and fxpress.json (the spec ``fxpress.load`` reads)."""
        from ..utils import atomic_folder

        def fill(tmp: Path) -> None:
            for name in (MODEL, DATA):
                shutil.copyfile(self.folder / name, tmp / name)
            cfg = genai_config(self.spec, self.spec.max_positions)
            (tmp / "genai_config.json").write_text(json.dumps(cfg, indent=4))
            (tmp / "fxpress.json").write_text(json.dumps(
                {"causal_lm": spec_json(self.spec), "report": _plain(self.report)}, indent=1))
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return atomic_folder(path, fill)


def spec_json(spec: CausalLMSpec) -> dict:
    meta = dataclasses.asdict(spec)
    meta["eos_token_id"] = list(meta["eos_token_id"])
    return meta


def _plain(obj):
    try:
        json.dumps(obj)
        return obj
    except TypeError:
        return {k: str(v) for k, v in obj.items()} if isinstance(obj, dict) else str(obj)


def load_genai_folder(path, *, threads: int | None = None, **unused) -> OrtCausalLM:
    """A folder written by `OrtCausalLM.save` (or ORT GenAI's builder) as an OrtCausalLM."""
    p = Path(path)
    cfg_path = p / "genai_config.json"
    if not cfg_path.is_file():
        raise InputError(f"{p}: no genai_config.json (not an ORT GenAI folder)", input_name="path")
    cfg = json.loads(cfg_path.read_text())
    fx_meta = None
    if (p / "fxpress.json").is_file():
        fx_meta = json.loads((p / "fxpress.json").read_text()).get("causal_lm")
    spec = _spec_from_genai(cfg, fx_meta)
    name = cfg["model"]["decoder"].get("filename", MODEL)
    if name != MODEL:
        raise InputError(f"{p}: decoder file {name!r}; fxpress loads {MODEL}", input_name="path")
    return OrtCausalLM(p, spec, threads=threads, report={"loaded_from": str(p)})


# ---------------------------------------------------------------------- lowering
def _sqnr(ref: torch.Tensor, y: torch.Tensor) -> float:
    ref, y = ref.double(), y.double()
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean().clamp_min(1e-30)))


def check_against_ir(lm, gm, ids: torch.Tensor) -> dict:
    """SQNR (dB) of the artefact's prefill logits and of a prefill + one-step decode against the
    IR's full-sequence logits on `ids` (batch 1)."""
    with torch.no_grad():
        ref = gm(*complete_call(gm, (ids,), {})[0]).logits  # a reloaded IR may lack the hook
        full = lm(ids).logits
        state = lm.start(ids.shape[0], ids.shape[1])
        lm.step(state, ids[:, :-1], torch.ones_like(ids[:, :-1]),
                torch.arange(ids.shape[1] - 1)[None].expand(ids.shape[0], -1))
        last = lm.step(state, ids[:, -1:], torch.ones_like(ids),
                       torch.full((ids.shape[0], 1), ids.shape[1] - 1))
    return {"prefill_db": round(_sqnr(ref, full), 1), "decode_db": round(_sqnr(ref[:, -1], last), 1)}


def lower_onnxruntime(gm, flat_example_inputs: tuple, *, device: str = "cpu", lm_head: str = "auto",
                      accuracy_level: int | str = "auto", threads: int | None = None,
                      max_length: int | None = None, check: bool = True, min_sqnr: float = 20.0,
                      spinning: bool = True, fuse_gate_up: bool = True, **options: Any):
    """An OrtCausalLM for a Llama-family causal-LM IR; other families: the generic ORT lowering
    wrapped as a LoweredCausalLM. ``accuracy_level="auto"`` times MatMulNBits' fp32 and int8
    compute per weight shape at one row (decode) on this host (`nbits.fastest_accuracy_level`).
    ``max_length`` caps the context (the rotary table and the KV buffers; default the model's
    max positions)."""
    from ..backends.onnx.nbits import fastest_accuracy_level
    from .ort_graph import NotThisFamily
    check_choice("lm_head", lm_head, LM_HEADS)
    if device != "cpu":
        raise LoweringError(f"the ONNX Runtime causal-LM lowering runs on cpu, not {device!r}")
    spec = causal_lm_spec(gm)
    if max_length is not None:
        spec = dataclasses.replace(spec, max_positions=int(max_length))
    if accuracy_level == "auto":
        def level(k, n, bits, block):
            return fastest_accuracy_level(-(-k // block) * block, n, bits, block, 1, threads)
    else:
        level = int(accuracy_level)
    try:
        lm = _build(gm, spec, level, lm_head, threads, spinning, fuse_gate_up)
    except NotThisFamily as why:
        from ..backends.base import get_backend
        from .lowering import LoweredCausalLM
        run = LoweredCausalLM(get_backend("onnxruntime")(gm, flat_example_inputs, device=device,
                                                         threads=threads, **options), gm)
        run.lowered.report["generator"] = f"generic export, growing past ({why})"
        return run
    if not check:
        return lm
    ids = flat_example_inputs[0]
    if ids.shape[1] < 2:
        ids = torch.cat([ids, ids], 1)
    got = lm.report["check"] = check_against_ir(lm, gm, ids[:1])
    levels = set(lm.report.get("accuracy_levels", {}).values())
    # "auto" chose int8 activations (level 4) for speed; where that costs what a weight-only user
    # asked not to lose, build again with fp32 compute: int8 weights need >= 40 dB (real SmolLM2
    # int8 g32: 32.7 dB and greedy text departing at token 4 with level 4; 117 dB, 32/32 tokens
    # at level 0), int4 the check's own floor
    floor = 40.0 if 8 in _weight_bits(gm) else min_sqnr
    if accuracy_level == "auto" and 4 in levels and min(got.values()) < floor:
        lm, got = _fp32_compute_fallback(lm, gm, spec, ids[:1], level, floor,
                                         (lm_head, threads, spinning, fuse_gate_up))
    if min(got.values()) < min_sqnr:
        raise LoweringError(f"the ONNX Runtime decoder disagrees with the IR: {got} "
                            f"(< {min_sqnr} dB); check=False skips this check")
    if 4 in set(lm.report.get("accuracy_levels", {}).values()) and min(got.values()) < 40:
        warnings.warn(f"fxpress.lower: MatMulNBits' int8 activations (accuracy_level 4, the "
                      f"faster here) leave the logits {min(got.values())} dB from the IR; "
                      "accuracy_level=0 computes in fp32 (exact, slower decode)", stacklevel=3)
    return lm


def _fp32_compute_fallback(lm, gm, spec, ids, level, floor, build_args):
    """(decoder, its check): rebuilt with fp32 compute (accuracy level 0) where level 4 left the
    check under `floor`: the lm_head alone first (where it ran at 4), then every layer; the
    report keeps the level-4 check and each retry's, and one warning says which was kept."""
    fast, tried = dict(lm.report["check"]), {}
    steps = [("every layer", 0)]
    if lm.report.get("accuracy_levels", {}).get("lm_head") == 4:
        steps.insert(0, ("the lm_head", lambda k, n, bits, block:
                         0 if n == spec.vocab_size else level(k, n, bits, block)))
    for name, lv in steps:
        lm = _build(gm, spec, lv, *build_args)
        got = lm.report["check"] = check_against_ir(lm, gm, ids)
        tried[name] = dict(got)
        if min(got.values()) >= floor:
            break
    lm.report["accuracy_level_fallback"] = {"level4_check": fast, "floor_db": floor, **tried}
    warnings.warn(f"fxpress.lower: MatMulNBits' int8 activations (accuracy_level 4, the faster here) "
                  f"left the logits {min(fast.values())} dB from the IR (< {floor}); built with fp32 "
                  f"compute (accuracy_level 0) for {name} instead ({min(got.values())} dB)", stacklevel=4)
    return lm, got


def _weight_bits(gm) -> set:
    """The bit widths of the IR's weight-only layers."""
    from ..ir.meta import WeightOnlySpec, get_record
    return {r.bits for n in gm.graph.nodes if (r := get_record(n, WeightOnlySpec)) is not None}


def _build(gm, spec, level, lm_head, threads, spinning, fuse_gate_up) -> OrtCausalLM:
    """The genai-layout decoder of `gm` in a temporary folder, opened (NotThisFamily passes)."""
    from .ort_graph import build_decoder
    report: dict = {"generator": "genai-layout decoder"}
    t0 = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="fxpress-llm-")
    try:  # weights streamed to model.onnx.data as they are made (ort_graph.ExternalData)
        model = build_decoder(gm, spec, lm_head=lm_head, accuracy_level=level,
                              max_positions=spec.max_positions, report=report,
                              fuse_gate_up=fuse_gate_up, external_data=Path(tmp.name) / DATA)
    except BaseException:
        tmp.cleanup()
        raise
    report["build_s"] = round(time.perf_counter() - t0, 2)
    write_model(model, Path(tmp.name))
    del model
    return OrtCausalLM(Path(tmp.name), spec, threads=threads, report=report, tmp=tmp, spinning=spinning)
