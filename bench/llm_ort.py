"""fxpress's ONNX Runtime causal LM against ORT GenAI's own build of the same model, in one process.

    .venv/bin/python bench/llm_ort.py [--model smollm2|llama1b] [--prompt 128] [--new 128]
                                      [--threads 2] [--rounds 3] [--peer-dir DIR]

Rows: prefill ms (the prompt in one call) and decode tokens/s (greedy, one token a step over
the KV cache) for fxpress fp32 / int8 (WeightOnly bits=8 g32) / int4 (g32), each with its
default lm_head (int8 for weight-only), int4-h4 (int4 g32 with an int4 head: ORT GenAI's
configuration), and ORT GenAI's builder int4 (its defaults: block 32,
accuracy level 4, int4 lm_head) with intra_op_num_threads = --threads. Runners are timed in
rounds, one runner after the other per round; each row is the median over rounds. Also the
greedy tokens of each runner before the first difference with fxpress fp32, and whether the
folder fxpress saved generates the same greedy tokens in onnxruntime_genai.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fxpress  # noqa: E402
from fxpress.llm.models import load_smollm2, smollm2_dir  # noqa: E402


def prompt_ids(tok, n: int) -> torch.Tensor:
    import inspect
    text = " ".join(inspect.getdoc(m) or "" for m in (json, os, shutil, statistics, subprocess))
    ids = tok(text, return_tensors="pt").input_ids[:, :n]
    assert ids.shape[1] == n, ids.shape
    return ids


def time_fxpress(lm, ids, new: int):
    state = lm.start(1, ids.shape[1] + new + 1)
    t0 = time.perf_counter()
    logits = lm.step(state, ids, torch.ones_like(ids), torch.arange(ids.shape[1])[None])
    t1 = time.perf_counter()
    toks = [int(logits.argmax(-1))]
    total = ids.shape[1]
    for _ in range(new - 1):
        total += 1
        nxt = torch.tensor([[toks[-1]]])
        logits = lm.step(state, nxt, torch.ones(1, total, dtype=torch.long), torch.tensor([[total - 1]]))
        toks.append(int(logits.argmax(-1)))
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (new - 1) / (t2 - t1), toks


def time_genai(model, ids, new: int):
    import onnxruntime_genai as og
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=ids.shape[1] + new, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids.numpy().astype(np.int32))  # the prompt's forward
    gen.generate_next_token()                         # picks the first new token from its logits
    t1 = time.perf_counter()
    toks = [int(gen.get_next_tokens()[0])]
    for _ in range(new - 1):
        gen.generate_next_token()
        toks.append(int(gen.get_next_tokens()[0]))
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (new - 1) / (t2 - t1), toks


def with_threads(folder: Path, threads: int, out: Path) -> Path:
    """A copy of an ORT GenAI folder whose session runs `threads` intra-op threads."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(folder, out)
    cfg = json.loads((out / "genai_config.json").read_text())
    cfg["model"]["decoder"]["session_options"]["intra_op_num_threads"] = threads
    (out / "genai_config.json").write_text(json.dumps(cfg, indent=2))
    return out


def agree(a, b) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "llama1b"])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--peer-dir", default=None, help="ORT GenAI int4 folder (built if absent)")
    ap.add_argument("--skip", default="", help="comma list of rows to skip (fp32,int8,int4,int4-h4,genai)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    if args.model == "smollm2":
        model, tok = load_smollm2()
        src = smollm2_dir()
    else:
        from fxpress.llm.models import llama_1b_config, random_llama
        model = random_llama(llama_1b_config())
        tok = None
        src = None
    ids = prompt_ids(tok, args.prompt) if tok is not None else \
        torch.randint(0, model.config.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(0))
    work = Path(tempfile.mkdtemp(prefix="fxpress-bench-llm-"))
    runners = {}
    # row -> (recipe, lm_head); "int4-h4" is ORT GenAI's configuration (int4 head too)
    recipes = {"fp32": (None, "auto"), "int8": (fxpress.WeightOnly(bits=8, group_size=32), "auto"),
               "int4": (fxpress.WeightOnly(bits=4, group_size=32), "auto"),
               "int4-h4": (fxpress.WeightOnly(bits=4, group_size=32), "int4")}
    cms = {}
    for name, (recipe, head) in recipes.items():
        if name in skip:
            continue
        t0 = time.perf_counter()
        key = repr(recipe)
        cm = cms[key] = cms.get(key) or fxpress.compress(model, (ids[:, :8],), recipe)
        lm = fxpress.lower(cm, backend="onnxruntime", threads=args.threads, check=False, lm_head=head)
        print(f"# fxpress {name}: lowered in {time.perf_counter() - t0:.1f} s, lm_head "
              f"{lm.report.get('lm_head')}, levels {sorted(set(lm.report.get('accuracy_levels', {}).values()))}",
              flush=True)
        runners[f"fxpress {name}"] = ("fx", lm)
        if name == "int4":
            saved = lm.save(work / "fxpress-int4", tokenizer=tok)
    if "genai" not in skip and src is not None:
        import onnxruntime_genai as og
        peer = Path(args.peer_dir) if args.peer_dir else work / "genai-int4-src"
        if not (peer / "genai_config.json").is_file():
            subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src),
                            "-o", str(peer), "-p", "int4", "-e", "cpu"], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        runners["ORT GenAI int4 (builder)"] = ("og", og.Model(str(with_threads(peer, args.threads,
                                                                                 work / "genai-int4"))))
    results = {k: [] for k in runners}
    for r in range(args.rounds):
        for name, (kind, obj) in runners.items():
            fn = time_fxpress if kind == "fx" else time_genai
            results[name].append(fn(obj, ids, args.new))
    ref = results.get("fxpress fp32", [[None, None, None]])[0][2]
    cpu = subprocess.run(["sh", "-c", "grep -m1 'model name' /proc/cpuinfo"], capture_output=True,
                         text=True).stdout.strip()
    flags = open("/proc/cpuinfo").read()
    print(f"\n{args.model}, batch 1, {args.threads} threads, prompt {args.prompt}, {args.new} new tokens, "
          f"{args.rounds} rounds; {cpu}; avx512_vnni={'avx512_vnni' in flags} amx={'amx_tile' in flags}; "
          f"load {os.getloadavg()[0]:.1f}")
    print("| runner | prefill ms | decode tok/s | greedy tokens = fxpress fp32 |")
    print("|---|---:|---:|---:|")
    for name, rows in results.items():
        pre = statistics.median(r[0] for r in rows)
        dec = statistics.median(r[1] for r in rows)
        same = "-" if ref is None else f"{agree(rows[0][2], ref)}/{args.new}"
        print(f"| {name} | {pre:.0f} | {dec:.1f} | {same} |")
    if "fxpress int4" in runners and tok is not None:
        import onnxruntime_genai as og
        g = og.Model(str(with_threads(work / "fxpress-int4", args.threads, work / "fxpress-int4-t")))
        _, _, toks = time_genai(g, ids, 32)
        mine = results["fxpress int4"][0][2][:32]
        print(f"\nsaved fxpress int4 folder in onnxruntime_genai: {agree(toks, mine)}/32 greedy tokens "
              "equal to lm.generate's")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
