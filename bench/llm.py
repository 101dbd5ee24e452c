"""Weight-only LLM bench: a Llama-style decoder (random weights), decode- and prefill-shaped.

    .venv/bin/python bench/llm.py                 # ~60 M params: 8 layers, hidden 768, GQA 12/4
    .venv/bin/python bench/llm.py --layers 2      # quicker

Runners, all in one process, timed in interleaved rounds (fxpress.timing.interleaved_medians),
the ORT runners in one pass and the torch ones (Inductor, torchao) in a second:
  ort_fp32              torch.onnx export of the fp32 IR -> ORT
  fxpress_int8/int4_ort WeightOnly(bits, group) -> export_nbits (MatMulNBits, q/k/v and
                        gate/up fused, accuracy level by measurement, RMSNorms fused, each
                        layer's attention one GroupQueryAttention) -> ORT
  fxpress_int4_nogqa_ort  the same without the GroupQueryAttention fusion
  ort_nbits_int4        ORT's own MatMulNBitsQuantizer on the fp32 .onnx (same bits/block)
  ort_nbits_int4_norms  the same with our RMSNorm fusions (fuse_norms): what the q/k/v and
                        gate/up fusion adds on its own is fxpress_int4_ort / this row
  inductor_fp32         the fp32 IR through fxpress.lower(backend="inductor")
  fxpress_int8/int4_ind the weight-only IR through fxpress.lower(backend="inductor")
  torchao_int8wo        torchao Int8WeightOnlyConfig -> torch.compile
Prints ms per forward, speed-up vs ORT fp32, achieved weight GB/s (bytes of every weight a
forward reads / time) against a measured copy bandwidth, and each lowered output's SQNR vs
its own IR.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

import numpy as np

# before torch loads: idle OpenMP threads sleep instead of spinning on the cores the next
# (ORT) runner needs, as bench/run.py does
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxpress
from fxpress.backends.onnx.nbits import (
    export_nbits,
    fastest_accuracy_level,
    fuse_norms,
    nbits_nodes,
)
from fxpress.timing import interleaved_medians


class Logits(torch.nn.Module):
    """input_ids -> logits of an HF causal LM called without a KV cache."""

    def __init__(self, lm):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids):
        return self.lm(input_ids=input_ids, use_cache=False).logits


def llama(layers: int):
    import transformers
    cfg = transformers.LlamaConfig(vocab_size=8192, hidden_size=768, intermediate_size=2048,
                                   num_hidden_layers=layers, num_attention_heads=12,
                                   num_key_value_heads=4, max_position_embeddings=512,
                                   use_cache=False, attn_implementation="eager")
    torch.manual_seed(0)
    return Logits(transformers.LlamaForCausalLM(cfg).eval())


def copy_bandwidth_gbs() -> float:
    a = np.ones(64 * 2 ** 20, np.float32)  # 256 MB, well past any cache
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9  # read + write


def weight_bytes(model) -> int:
    """Bytes of the initializers a forward reads (all but the embedding table: one row)."""
    from onnx import numpy_helper
    sizes = [(t.name, numpy_helper.to_array(t).nbytes) for t in model.graph.initializer]
    emb = max((s for n, s in sizes if "embed" in n), default=0)
    return sum(s for _, s in sizes) - emb


def ort(model, threads):
    import onnxruntime as rt

    from fxpress.backends.onnxruntime import session_options
    so = session_options(threads)
    # runners share one process: a session's idle pool threads must not spin on the cores
    # the runner being timed needs (with spinning on, interleaved sessions slow each other)
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    s = rt.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    name = s.get_inputs()[0].name
    return lambda ids: s.run(None, {name: ids.numpy()})[0]


def sqnr(ref, y) -> float:
    ref, y = np.asarray(ref, np.float64), np.asarray(y, np.float64)
    return float(10 * np.log10((ref ** 2).mean() / max(((ref - y) ** 2).mean(), 1e-30)))


def _numpy(y):
    return y.detach().numpy() if isinstance(y, torch.Tensor) else np.asarray(y)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--group", type=int, default=32)
    ap.add_argument("--no-inductor", action="store_true")
    ap.add_argument("--decode-only", action="store_true")
    ap.add_argument("--prefill-only", action="store_true")
    ap.add_argument("--per-round", type=int, default=0,
                    help="0: one timed call per runner per round, each after another runner "
                         "(its weights out of cache); N: one untimed re-warm call, then N timed "
                         "(steady state, a decode loop; bench/run.py's --per-round)")
    ap.add_argument("--save", metavar="DIR", default=None,
                    help="write every ORT runner's .onnx here (<shape>_<runner>.onnx), e.g. to profile")
    ap.add_argument("--lm-head", action="store_true",
                    help="quantize lm_head too (MatMulNBitsQuantizer quantizes every MatMul)")
    a = ap.parse_args(argv)
    model = llama(a.layers)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"Llama-style: {a.layers} layers, hidden 768, GQA 12/4, vocab 8192: "
          f"{n_params / 1e6:.1f} M params")
    try:
        from fxpress import hw
        feats = hw.host()
        print("host:", " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni",
                                            "amx_int8") if getattr(feats, f, False)),
              f"physical cores {feats.physical_cores}")
    except ImportError:
        pass
    print(f"copy bandwidth: {copy_bandwidth_gbs():.1f} GB/s (box shared with other sessions)")
    shapes = {"decode 1x1": torch.randint(0, 8192, (1, 1)),
              "prefill 1x128": torch.randint(0, 8192, (1, 128))}
    if a.decode_only:
        shapes.pop("prefill 1x128")
    if a.prefill_only:
        shapes.pop("decode 1x1")
    skip = () if a.lm_head else ("lm_head",)
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq
    results = {}
    for shape, ids in shapes.items():
        t0 = time.time()
        ir_fp = fxpress.capture(model, (ids,))
        # the plain torch.onnx export, as a user would hand it to ORT and MatMulNBitsQuantizer
        fp_onnx = export_nbits(ir_fp, (ids,), norms=False, attention=False)
        runners, refs, nbytes = {"ort_fp32": ort(fp_onnx, a.threads)}, {}, {}
        models = {"ort_fp32": fp_onnx}
        nbytes["ort_fp32"] = weight_bytes(fp_onnx)
        with torch.no_grad():
            refs["ort_fp32"] = ir_fp(ids).numpy()
        k, n = 768, 768
        level = fastest_accuracy_level(k, n, 4, a.group, int(ids.shape[1]), a.threads)
        for bits in (8, 4):
            cm = fxpress.compress(model, (ids,), fxpress.WeightOnly(bits=bits, group_size=a.group,
                                                                   skip=skip))
            with torch.no_grad():
                ref = cm(ids).numpy()
            rewrites = {}
            om = export_nbits(cm.graph_module, (ids,), accuracy_level=level, report=rewrites)
            name = f"fxpress_int{bits}_ort"
            runners[name], refs[name], nbytes[name] = ort(om, a.threads), ref, weight_bytes(om)
            models[name] = om
            print(f"  {shape} int{bits}: {len(nbits_nodes(om))} MatMulNBits (block {a.group}, "
                  f"accuracy_level {level}), {len(om.graph.node)} nodes, rewrites {rewrites}")
            if bits == 4:  # what the attention fusion adds on its own: this row / the one above
                plain = export_nbits(cm.graph_module, (ids,), accuracy_level=level, attention=False)
                name = "fxpress_int4_nogqa_ort"
                runners[name], refs[name], nbytes[name] = ort(plain, a.threads), ref, weight_bytes(plain)
                models[name] = plain
            if not a.no_inductor:
                name = f"fxpress_int{bits}_ind"
                runners[name] = fxpress.lower(cm, backend="inductor", example_inputs=(ids,))
                refs[name] = ref
                nbytes[name] = nbytes[f"fxpress_int{bits}_ort"]
        with tempfile.TemporaryDirectory() as d:
            import onnx
            p = os.path.join(d, "fp32.onnx")
            onnx.save(fp_onnx, p)
            q = mnq.MatMulNBitsQuantizer(onnx.load(p), bits=4, block_size=a.group,
                                         is_symmetric=True, accuracy_level=level)
            q.process()
            theirs = q.model.model
        runners["ort_nbits_int4"], refs["ort_nbits_int4"] = ort(theirs, a.threads), refs["ort_fp32"]
        nbytes["ort_nbits_int4"] = weight_bytes(theirs)
        theirs_n = fuse_norms(theirs)[0]
        models["ort_nbits_int4"], models["ort_nbits_int4_norms"] = theirs, theirs_n
        runners["ort_nbits_int4_norms"] = ort(theirs_n, a.threads)
        refs["ort_nbits_int4_norms"], nbytes["ort_nbits_int4_norms"] = refs["ort_fp32"], weight_bytes(theirs_n)
        if not a.no_inductor:
            runners["inductor_fp32"] = fxpress.lower(ir_fp, backend="inductor", example_inputs=(ids,))
            refs["inductor_fp32"], nbytes["inductor_fp32"] = refs["ort_fp32"], nbytes["ort_fp32"]
            try:
                from torchao.quantization import Int8WeightOnlyConfig, quantize_
                tm = copy.deepcopy(model)
                quantize_(tm, Int8WeightOnlyConfig())
                comp = torch.compile(tm)
                runners["torchao_int8wo"] = lambda x, c=comp: c(x)
                with torch.no_grad():
                    refs["torchao_int8wo"] = tm(ids).numpy()
                nbytes["torchao_int8wo"] = nbytes["fxpress_int8_ort"]
            except Exception as e:  # noqa: BLE001  (a peer that does not build is reported)
                print(f"  torchao int8 weight-only: not run ({type(e).__name__}: {e})")
        if a.save:
            _save(a.save, shape, models)
        with torch.no_grad():
            outs = {r: _numpy(f(ids)) for r, f in runners.items()}
            # ORT and torch runners are timed in two interleaved passes: torch's OpenMP threads
            # (likely) keep spinning after a call and slow the ORT session that runs next: in
            # one mixed run MNQ's graph took 41.0 ms after a torch runner and 15.7 ms with only
            # its norms fused after an ORT runner (4 % apart when timed among ORT runners)
            ort_rows = [r for r in runners if r.startswith("ort_") or r.endswith("_ort")]
            ms = {}
            for group in (ort_rows, [r for r in runners if r not in ort_rows]):
                if group:
                    ms.update(interleaved_medians({r: runners[r] for r in group}, (ids,),
                                                  rounds=a.rounds, warmup=3,
                                                  per_round=a.per_round))
            ms = {r: ms[r] for r in runners}
        results[shape] = (ms, nbytes, {r: sqnr(refs[r], outs[r]) for r in runners})
        print(f"  {shape}: built and timed in {time.time() - t0:.0f} s")
        _table({shape: results[shape]})  # now: the next shape may take many minutes more
    print("\nall shapes:")
    _table(results)


def _save(folder: str, shape: str, models: dict) -> None:
    import onnx
    os.makedirs(folder, exist_ok=True)
    tag = shape.split()[0]
    for name, m in models.items():
        onnx.save(m, os.path.join(folder, f"{tag}_{name}.onnx"))


def _table(results):
    base = "ort_fp32"
    print("\n| shape | runner | ms | x ORT fp32 | x ORT MatMulNBits int4 | weight GB/s | "
          "SQNR vs its IR (dB) |\n|---|---|---|---|---|---|---|", flush=True)
    for shape, (ms, nb, db) in results.items():
        for r in ms:
            print(f"| {shape} | {r} | {ms[r]:.2f} | {ms[base] / ms[r]:.2f} | "
                  f"{ms['ort_nbits_int4'] / ms[r]:.2f} | {nb[r] / ms[r] / 1e6:.1f} | {db[r]:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
