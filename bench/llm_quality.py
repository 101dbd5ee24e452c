"""Weight-only quality on the real SmolLM2-135M-Instruct: perplexity and greedy agreement with fp32.

    .venv/bin/python bench/llm_quality.py               # every row (~15 min on 2 busy cores)
    .venv/bin/python bench/llm_quality.py --quick       # fewer tokens / prompts / new tokens
    .venv/bin/python bench/llm_quality.py --rows int8,gptq

Text: Python's reference-manual topics (fxpress.llm.quality.corpus_text; PSF documentation, the
longest real English text on this machine); perplexity over the first --tokens tokens (window
1024, stride 512), GPTQ/AWQ calibrated on 16 x 256 tokens from the corpus' end (disjoint).
Agreement: greedy new tokens from the 10 chat prompts of fxpress.llm.quality.PROMPTS (EOS
ignored), counted up to the first token that differs from the fp32 model's.

Each quantized row is the HF model with the IR's effective weights (fxpress.llm.quality.
effective_model): the numerics of the compressed IR, independent of a backend. Bars (issue 25):
int8 identical to fp32 for all new tokens on >= 8 of 10 prompts; int4 g128 GPTQ or AWQ
perplexity within +3 % of fp32 and below RTN's.

Measured 2026-12-07 (this script, 4096 tokens, 10 prompts x 64 tokens; fp32 perplexity 11.722):
int8 per row RTN +0.47 %, all 64 tokens equal on 0/10 (first difference at 31 0 5 9 36 16 11 30
27 0); int8 per row GPTQ +0.29 %, 1/10; int8 with the last down_proj float +0.39 %, 0/10. int4
g128: RTN +63.3 % (asymmetric +38.1 %), GPTQ +33.9 % (act-order asymmetric +11.3 %), AWQ +30.6 %
(asymmetric +21.7 %). Plain int8-per-row RTN applied to the HF weights outside fxpress gives the
same picture (last-position logits 26.9 dB vs fp32; bf16 weights 47 dB): this model's greedy
choices often have near-ties (prompt 2's first token: top-2 logits 29.458 / 29.413).

Session 8 (docs/results/session8_llmq.md): int4 g128 GPTQ act-order asymmetric with
sequential=True and scale_search="mse" +7.85 % (from +11.3 %); int8 g32 GPTQ sequential mse
-0.04 % perplexity but 0/10 prompts (int8 g32 RTN stays the best, 4/10). --agreement forced gives
the generate counts from one forward per prompt.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import fxpress
from fxpress.llm import quality as Q
from fxpress.llm.models import load_smollm2

# rows whose greedy agreement is measured by default (the int8 bar); --agree-all adds the rest
AGREE = ("int8", "int8_g128", "int8_g32", "int8_g32_asym", "int8_gptq", "int8_keeplast",
         "int8_gptq_seq", "int8_g32_gptq_seq")
ROWS = {
    "int8": ("int8 per row (default)", lambda: fxpress.WeightOnly(bits=8)),
    "int8_g128": ("int8 g128", lambda: fxpress.WeightOnly(bits=8, group_size=128)),
    "int8_g32": ("int8 g32", lambda: fxpress.WeightOnly(bits=8, group_size=32)),
    "int8_g32_asym": ("int8 g32 asymmetric", lambda: fxpress.WeightOnly(bits=8, group_size=32,
                                                                        symmetric=False)),
    "int8_gptq": ("int8 per row GPTQ", lambda: fxpress.WeightOnly(bits=8, method="gptq")),
    # the last layer's down_proj reads SmolLM2's largest activation outlier (|x| 477 on channel
    # 999 vs a median channel max of 3; ratio 157, 12-29 elsewhere): its column errors go straight
    # into the final norm and the logits
    "int8_keeplast": ("int8 per row, last down_proj float", lambda: fxpress.WeightOnly(
        bits=8, skip=("lm_head", "model.layers.29.mlp.down_proj"))),
    "rtn": ("int4 g128 RTN", lambda: fxpress.WeightOnly(bits=4, group_size=128)),
    "gptq": ("int4 g128 GPTQ", lambda: fxpress.WeightOnly(bits=4, group_size=128, method="gptq")),
    "gptq_ao": ("int4 g128 GPTQ act-order", lambda: fxpress.WeightOnly(
        bits=4, group_size=128, method="gptq", act_order=True)),
    "awq": ("int4 g128 AWQ", lambda: fxpress.WeightOnly(bits=4, group_size=128, method="awq")),
    "rtn_asym": ("int4 g128 RTN asymmetric", lambda: fxpress.WeightOnly(
        bits=4, group_size=128, symmetric=False)),
    "gptq_asym": ("int4 g128 GPTQ act-order asymmetric", lambda: fxpress.WeightOnly(
        bits=4, group_size=128, method="gptq", act_order=True, symmetric=False)),
    "awq_asym": ("int4 g128 AWQ asymmetric", lambda: fxpress.WeightOnly(
        bits=4, group_size=128, method="awq", symmetric=False)),
    "awq_keeplast": ("int4 g128 AWQ asymmetric, last down_proj float", lambda: fxpress.WeightOnly(
        bits=4, group_size=128, method="awq", symmetric=False,
        skip=("lm_head", "model.layers.29.mlp.down_proj"))),
    "rtn_g32": ("int4 g32 RTN (the GGUF's own blocks)", lambda: fxpress.WeightOnly(bits=4, group_size=32)),
    # session 8: per-group MSE scale search, true-sequential GPTQ (and both)
    "rtn_mse": ("int4 g128 RTN asymmetric, mse scales", lambda: fxpress.WeightOnly(
        bits=4, group_size=128, symmetric=False, scale_search="mse")),
    "gptq_mse": ("int4 g128 GPTQ act-order asymmetric, mse scales", lambda: fxpress.WeightOnly(
        bits=4, group_size=128, method="gptq", act_order=True, symmetric=False,
        scale_search="mse")),
    "gptq_seq": ("int4 g128 GPTQ act-order asymmetric, sequential", lambda: fxpress.WeightOnly(
        bits=4, group_size=128, method="gptq", act_order=True, symmetric=False, sequential=True)),
    "gptq_seq_mse": ("int4 g128 GPTQ act-order asymmetric, sequential, mse scales",
                     lambda: fxpress.WeightOnly(bits=4, group_size=128, method="gptq",
                                                act_order=True, symmetric=False, sequential=True,
                                                scale_search="mse")),
    "int8_gptq_seq": ("int8 per row GPTQ act-order, sequential, mse scales", lambda: fxpress.WeightOnly(
        bits=8, method="gptq", act_order=True, sequential=True, scale_search="mse")),
    "int8_g32_gptq_seq": ("int8 g32 GPTQ act-order, sequential, mse scales", lambda: fxpress.WeightOnly(
        bits=8, group_size=32, method="gptq", act_order=True, sequential=True, scale_search="mse")),
}
# rows lossless by construction on a dequantized Q4_1 model (its blocks of 32): never a bar
BY_CONSTRUCTION = ("rtn_g32",)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="int8,rtn,gptq,awq", help="comma list of " + ", ".join(ROWS))
    ap.add_argument("--agree-all", action="store_true",
                    help="greedy agreement for the int4 rows too (default: int8 rows only)")
    ap.add_argument("--tokens", type=int, default=4096, help="perplexity tokens (>= 4096 for the bar)")
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calib", type=int, default=16, help="calibration sequences (GPTQ/AWQ)")
    ap.add_argument("--calib-len", type=int, default=256, help="tokens per calibration sequence")
    ap.add_argument("--agreement", choices=("generate", "forced"), default="generate",
                    help="candidate's greedy tokens by generate(), or one teacher-forced forward "
                         "per prompt on fp32's tokens (the same count, ~30x cheaper)")
    ap.add_argument("--quick", action="store_true", help="1024 tokens, 3 prompts, 16 new tokens")
    a = ap.parse_args(argv)
    if a.quick:
        a.tokens, a.prompts, a.new_tokens = 1024, 3, 16
    torch.set_num_threads(a.threads)
    model, tok = load_smollm2()
    ids = Q.corpus_ids(tok)
    text = ids[:, : a.tokens]
    cal = Q.calibration_batches(ids, n=a.calib, seq_len=a.calib_len)
    prompts = Q.PROMPTS[: a.prompts]
    t = time.perf_counter()
    base = Q.perplexity(model, text)
    print(f"SmolLM2-135M-Instruct (dequantized GGUF), {text.shape[1]} tokens of pydoc topics, "
          f"{len(prompts)} prompts x {a.new_tokens} greedy new tokens, {a.threads} threads")
    print(f"fp32 perplexity {base:.4f} ({time.perf_counter() - t:.0f} s)", flush=True)
    refs = None
    rows = []
    for key in [r for r in a.rows.split(",") if r]:
        label, make = ROWS[key]
        t = time.perf_counter()
        cm = fxpress.compress(model, (ids[:, :16],), make(), calibration=cal)
        tq = time.perf_counter() - t
        qm = Q.effective_model(model, cm)
        ppl = Q.perplexity(qm, text)
        agree, full = [], None
        if key in AGREE or a.agree_all:
            if a.agreement == "forced":
                if refs is None:
                    refs = Q.greedy_tokens(model, tok, prompts, a.new_tokens)
                agree = Q.forced_agreement(qm, tok, prompts, refs)
            else:
                agree, refs = Q.greedy_agreement(model, qm, tok, prompts, new_tokens=a.new_tokens,
                                                 reference_tokens=refs)
            full = sum(x == a.new_tokens for x in agree)
        rows.append((key, label, ppl, agree, full))
        print(f"{label:40s} ppl {ppl:8.4f} ({100 * (ppl / base - 1):+6.2f} %)  "
              f"all {a.new_tokens} equal on {full}/{len(prompts)}  prefix {agree}  "
              f"(compress {tq:.0f} s)", flush=True)
    print(f"\ncalibration {a.calib} x {a.calib_len} tokens")
    print("| weights | perplexity | vs fp32 | prompts with all new tokens = fp32 | tokens equal before the first difference |")
    print("|---|---:|---:|---:|---|")
    print(f"| fp32 | {base:.3f} | | | |")
    for _, label, ppl, agree, full in rows:
        print(f"| {label} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f} % | "
              f"{'' if full is None else f'{full}/{len(agree)}'} | {' '.join(map(str, agree))} |")
    fair = [r for r in rows if r[0] not in BY_CONSTRUCTION]
    int8 = [(full, label) for key, label, _, _, full in fair if key.startswith("int8") and full is not None]
    if int8:
        full, label = max(int8)
        print(f"bar int8 >= 8/{len(prompts)} identical: best {full}/{len(prompts)} ({label})")
    int4 = [(ppl, label) for key, label, ppl, _, _ in fair
            if not key.startswith("int8") and ("GPTQ" in label or "AWQ" in label)]
    rtn = [ppl for key, label, ppl, _, _ in fair if key.startswith("rtn")]
    if int4 and rtn:
        ppl, label = min(int4)
        print(f"bar int4 g128 GPTQ/AWQ <= +3 %: best {100 * (ppl / base - 1):+.2f} % ({label}); "
              f"best RTN {100 * (min(rtn) / base - 1):+.2f} %")

if __name__ == "__main__":
    main()
