"""The ORT causal-LM lowering's memory: weights streamed to model.onnx.data, no second copy at load.

The streamed artefact (`build_decoder(..., external_data=path)`) must be the in-memory proto's
model exactly (same nodes, bitwise-equal initializers, identical logits and greedy tokens), and
the lowering's peak RSS above the compressed model must stay a small multiple of the weights
(measured in a fresh interpreter: VmHWM reset through /proc/self/clear_refs).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

import fxpress
from fxpress.llm.capture import causal_lm_spec
from fxpress.llm.ort import DATA, MODEL, OrtCausalLM, write_model
from fxpress.llm.ort_graph import ALIGN, INLINE_BYTES, build_decoder, session_entries
from tests.llm.lms import ids, sqnr, tiny_lm

ROOT = Path(__file__).resolve().parents[2]


def _inits(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t, base_dir=str(path.parent))
            for t in onnx.load(str(path), load_external_data=False).graph.initializer}


@pytest.mark.parametrize("family,recipe", [("llama", "fp32"), ("qwen2", "fp32"), ("llama", "int4")])
def test_streamed_artefact_equals_the_in_memory_build(tmp_path, family, recipe):
    model = tiny_lm(family)
    x = ids(1, 12)
    cm = fxpress.compress(model, (x,), [] if recipe == "fp32" else
                          fxpress.WeightOnly(bits=4, group_size=32))
    gm, spec = cm.graph_module, causal_lm_spec(cm)
    old, new = tmp_path / "old", tmp_path / "new"
    write_model(build_decoder(gm, spec, accuracy_level=0), old)  # the in-memory proto, saved by onnx
    new.mkdir()
    write_model(build_decoder(gm, spec, accuracy_level=0, external_data=new / DATA), new)

    a, b = onnx.load(str(old / MODEL), load_external_data=False), \
        onnx.load(str(new / MODEL), load_external_data=False)
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.graph.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in b.graph.node]
    ia, ib = _inits(old / MODEL), _inits(new / MODEL)
    assert ia.keys() == ib.keys()
    for name in ia:
        assert ia[name].dtype == ib[name].dtype and np.array_equal(ia[name], ib[name]), name
    # streamed: nothing large inline, large tensors at offsets ORT can map
    for t in b.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            info = {e.key: int(e.value) for e in t.external_data if e.key in ("offset", "length")}
            assert info["length"] < ALIGN or info["offset"] % ALIGN == 0, t.name
        else:
            assert len(t.raw_data) < INLINE_BYTES, t.name
    assert sum(t.data_location == onnx.TensorProto.EXTERNAL for t in b.graph.initializer) >= 4 * spec.num_layers

    # prepacking off only where there is no MatMulNBits to pack
    assert session_entries(new / MODEL) == ({"session.disable_prepacking": "1"} if recipe == "fp32" else {})
    lm_old, lm_new = OrtCausalLM(old, spec), OrtCausalLM(new, spec)
    with torch.no_grad():
        ref = gm(x).logits
    got_old, got_new = lm_old(x).logits, lm_new(x).logits
    assert torch.equal(got_old, got_new)
    assert sqnr(ref, got_new) > 40
    gen_old = lm_old.generate(x, max_new_tokens=12)
    assert torch.equal(gen_old, lm_new.generate(x, max_new_tokens=12))
    ir_tokens = fxpress.lower(cm, backend="eager").generate(x, max_new_tokens=12)  # the IR's own
    assert torch.equal(gen_old, ir_tokens)


_PROBE = textwrap.dedent("""
    import gc, json, sys, torch, onnxruntime, transformers
    import fxpress
    from fxpress.llm.models import llama_1b_config, random_llama
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    recipe = sys.argv[1]
    torch.set_num_threads(1)
    cfg = llama_1b_config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                          num_attention_heads=16, num_key_value_heads=4, vocab_size=16384,
                          max_position_embeddings=256)
    model = random_llama(cfg)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    x = torch.randint(3, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    cm = fxpress.compress(model, (x,), [] if recipe == "fp32" else fxpress.WeightOnly(bits=4))
    head = "float" if recipe == "fp32" else "int8"
    warm = fxpress.lower(cm, backend="onnxruntime", lm_head=head, accuracy_level=4, threads=1)
    warm.generate(x, max_new_tokens=2)  # first-call costs (imports, ORT's arenas) out of the way
    del warm
    gc.collect()
    before, anon = status("VmRSS"), status("RssAnon")
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    lm = fxpress.lower(cm, backend="onnxruntime", lm_head=head, accuracy_level=4, threads=1)
    lm.generate(x, max_new_tokens=2)
    print(json.dumps({"weights": weights, "peak_delta": status("VmHWM") - before,
                      "anon_delta_after": status("RssAnon") - anon}))
""")


@pytest.mark.parametrize("recipe,limit", [("fp32", 1.6), ("int4", 0.9)])
def test_lowering_peak_rss_stays_under_a_multiple_of_the_weights(recipe, limit):
    """Peak RSS of lower() + a first generate, above the compressed model, in weight bytes (fp32).

    Measured here (random Llama, 2 layers, hidden 1024, vocab 16384: 0.22 GB of fp32 weights),
    this code: fp32 0.78x (mostly the mapped model.onnx.data pages the check and generate touch,
    file-backed but counted by VmHWM), int4 0.09-0.37x; the code before weights were streamed
    (proto raw_data, numpy copies, the serialized bytes, ORT's prepacked copy): fp32 2.90x,
    int4 1.64x.
    """
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _PROBE, recipe], check=False, capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = got["peak_delta"] / got["weights"]
    print(recipe, got, f"{ratio:.2f}x")
    assert ratio < limit, f"lowering peak {ratio:.2f}x the fp32 weights (limit {limit}x): {got}"


_COMPRESS_PROBE = textwrap.dedent("""
    import json, torch, onnxruntime, transformers
    import fxpress
    from fxpress.llm.models import llama_1b_config, random_llama
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    torch.set_num_threads(1)
    cfg = llama_1b_config(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2,
                          num_attention_heads=16, num_key_value_heads=4, vocab_size=16384)
    x = torch.randint(3, cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    fxpress.compress(random_llama(llama_1b_config(num_hidden_layers=1, hidden_size=64,
                     intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                     vocab_size=64)), (x % 64,), [])  # first-call costs out of the way
    model = random_llama(cfg)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    snapshot = {k: v.sum().item() for k, v in model.state_dict().items()}
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")
    cm = fxpress.compress(model, (x,), [])
    peak = status("VmHWM") - before
    user = {p.untyped_storage().data_ptr() for p in model.parameters()}
    shared = sum(t.untyped_storage().data_ptr() in user
                 for t in (*cm.graph_module.parameters(), *cm.graph_module.buffers()))
    with torch.no_grad():
        for p in cm.graph_module.parameters():
            p.add_(1.0)  # writing the IR must not reach the user's model
    same = snapshot == {k: v.sum().item() for k, v in model.state_dict().items()}
    print(json.dumps({"weights": weights, "peak_delta": peak, "shared": shared, "user_same": same}))
""")


def test_compress_holds_one_copy_of_the_weights_and_none_of_the_users():
    """compress's peak above the user's model ~1x the weights (the IR's own copy; the module tree
    it captures shares the user's tensors until `detach_parameters` copies them): measured 1.0x,
    2.0x when compress deep-copied the tensors too. The IR shares no storage with the model."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", _COMPRESS_PROBE], check=False, capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = got["peak_delta"] / got["weights"]
    print(got, f"{ratio:.2f}x")
    assert got["shared"] == 0 and got["user_same"], got
    assert ratio < 1.5, f"compress peak {ratio:.2f}x the weights (limit 1.5x): {got}"


def test_lowering_works_from_a_folder_holding_a_saved_model(tmp_path, monkeypatch):
    """onnx's external-data conversion checks for model.onnx.data relative to the CWD: the
    streamed lowering does not convert, so lowering next to a saved artefact works."""
    (tmp_path / DATA).write_bytes(b"not ours")
    monkeypatch.chdir(tmp_path)
    model = tiny_lm("llama")
    x = ids(1, 6)
    lm = fxpress.lower(fxpress.compress(model, (x,), []), backend="onnxruntime")
    assert lm.generate(x, max_new_tokens=3).shape == (1, 9)
    assert (tmp_path / DATA).read_bytes() == b"not ours"
