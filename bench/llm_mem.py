"""Peak resident memory per stage of compressing and lowering a random ~1B Llama to ONNX Runtime.

    .venv/bin/python bench/llm_mem.py --layers 4 --recipe fp32      # a layer-reduced config
    .venv/bin/python bench/llm_mem.py --recipe int4                 # the full ~1.17 B config

Stages (each line: the process's peak RSS during the stage, from VmHWM reset through
/proc/self/clear_refs, and its RSS after it): the model, `compress`, then inside `lower` the graph
build (`build_decoder`), the write of model.onnx + model.onnx.data, the InferenceSession, the
check against the IR, and a first `generate`. Figures are absolute (the process holds the user's
model throughout) and relative to the fp32 weight bytes of the model.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import fxpress
from fxpress.llm import ort as ort_mod
from fxpress.llm import ort_graph
from fxpress.llm.models import llama_1b_config, random_llama


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


ROWS: list[tuple[str, int, int, float]] = []
_OPEN: list[list[int]] = []  # per open stage: the highest peak of the stages nested in it


@contextmanager
def stage(name: str):
    gc.collect()
    reset_peak()  # a nested stage resets the outer's VmHWM: the outer keeps its inner peaks
    _OPEN.append([0])
    t = time.perf_counter()
    yield
    peak = max(_status("VmHWM"), _OPEN.pop()[0])
    if _OPEN:
        _OPEN[-1][0] = max(_OPEN[-1][0], peak)
    ROWS.append((name, peak, _status("VmRSS"), time.perf_counter() - t))
    print(f"  {name:28s} peak {ROWS[-1][1] / 2**30:6.2f} GiB  after {ROWS[-1][2] / 2**30:6.2f} GiB  "
          f"(anon {_status('RssAnon') / 2**30:.2f}, file {_status('RssFile') / 2**30:.2f}; {ROWS[-1][3]:.1f} s)",
          flush=True)


def _wrap(mod, attr: str, name: str):
    fn = getattr(mod, attr)

    def wrapped(*a, **k):
        with stage(name):
            return fn(*a, **k)
    setattr(mod, attr, wrapped)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="num_hidden_layers (default: the config's 22)")
    ap.add_argument("--recipe", choices=("fp32", "int4", "int8"), default="fp32")
    ap.add_argument("--vocab", type=int, default=49152, help="vocab size (bench/llm.py uses SmolLM2's 49152)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    over = {"vocab_size": a.vocab}
    if a.layers:
        over["num_hidden_layers"] = a.layers
    base = _status("VmRSS")
    _wrap(ort_graph, "build_decoder", "lower: build_decoder")
    _wrap(ort_mod, "write_model", "lower: write model files")
    _wrap(ort_mod, "check_against_ir", "lower: check vs IR")
    init = ort_mod.OrtCausalLM.__init__

    def session_init(self, *x, **k):
        with stage("lower: InferenceSession"):
            init(self, *x, **k)
    ort_mod.OrtCausalLM.__init__ = session_init
    with stage("model (random_llama)"):
        model = random_llama(llama_1b_config(**over))
    wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(f"random Llama {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters, "
          f"{wbytes / 2**30:.2f} GiB fp32 weights; process baseline {base / 2**30:.2f} GiB", flush=True)
    ids = torch.randint(100, a.vocab, (1, 16), generator=torch.Generator().manual_seed(0))
    recipe = [] if a.recipe == "fp32" else fxpress.WeightOnly(bits=int(a.recipe[3:]))
    with stage("compress"):
        cm = fxpress.compress(model, (ids,), recipe)
    with stage("lower (whole)"):
        lm = fxpress.lower(cm, backend="onnxruntime", threads=a.threads, lm_head="float" if a.recipe == "fp32" else "int8")
    with stage("first generate (16+8)"):
        lm.generate(ids, max_new_tokens=8)
    top = max(r[1] for r in ROWS)
    print(f"\n| stage ({a.recipe}, {model.config.num_hidden_layers} layers, weights "
          f"{wbytes / 2**30:.2f} GiB) | peak RSS GiB | x weights | RSS after GiB | s |")
    print("|---|---:|---:|---:|---:|")
    for name, peak, after, s in ROWS:
        print(f"| {name} | {peak / 2**30:.2f} | {(peak - base) / wbytes:.2f} | {after / 2**30:.2f} | {s:.1f} |")
    print(f"process peak {top / 2**30:.2f} GiB = {(top - base) / wbytes:.2f}x the fp32 weights above "
          f"the {base / 2**30:.2f} GiB baseline; session report {lm.report.get('session_s')} s")


if __name__ == "__main__":
    main()
