"""EfficientNet-Lite0 int8 top-1 agreement with fp32, robustly: >= 100 calibration crops disjoint
from >= 192 evaluation crops (random windows of 30-100 % of the short side, i.e. scales, and
random flips of every real photo installed packages ship; fxpress.real), each recipe lowered to
ONNX Runtime (what bench/run.py times), beside the peers on the same crops, with a Wilson 95 %
interval on every agreement.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/effnet_accuracy.py \
        [--calib 128] [--eval 256] [--recipes default,bench,bench_adaround] [--peers ort,openvino]

Writes bench/out/effnet_accuracy.{json,md}. Recipes (fxpress.Quantize(mode="static", ...)):
"default" (bias correction "auto": on for this depthwise net), "adaround" (that plus
adaround=True: the correction runs in AdaRound's sweep), "bench" (bench/run.py's row:
equalize, bias_correction, float_outputs, conv_add="separate"), "bench_adaround" (that plus
adaround=True, bias correction in AdaRound's sweep). A suffix "+kfN" keeps the N most
sensitive layers float (Quantize(keep_float=N): each layer quantized alone, SQNR on the
calibration crops); the rows name them. --rounds N > 0 also times every runner built, batch 1,
in N rounds of per-runner blocks (fxpress.timing.block_medians), against ORT fp32.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

RECIPES = {
    "default": {},
    "adaround": {"adaround": True},
    "bench": {"equalize": True, "bias_correction": True, "float_outputs": True, "conv_add": "separate"},
    "bench_adaround": {"equalize": True, "bias_correction": True, "float_outputs": True,
                       "conv_add": "separate", "adaround": True},
}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval (95 % by default) of a proportion k / n, as fractions."""
    if n <= 0:
        raise ValueError("wilson: n must be > 0")
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def score(name: str, fn, evals: torch.Tensor, logits: torch.Tensor, extra: dict | None = None) -> dict:
    from fxpress.passes.quant import sqnr_db
    with torch.no_grad():
        out = torch.cat([torch.as_tensor(fn(evals[i:i + 1])).float() for i in range(len(evals))])
    k = int((out.argmax(-1) == logits.argmax(-1)).sum())
    lo, hi = wilson(k, len(evals))
    row = {"runner": name, "agree": k, "n": len(evals), "top1_agree": 100 * k / len(evals),
           "wilson95": [100 * lo, 100 * hi], "logits_sqnr_db": round(sqnr_db(logits, out), 2),
           **(extra or {})}
    print(f"  {name:58s} {k}/{len(evals)} = {row['top1_agree']:.1f} % "
          f"[{100 * lo:.1f}, {100 * hi:.1f}]  {row['logits_sqnr_db']:.2f} dB", flush=True)
    return row


def markdown(rows: list[dict], meta: dict) -> str:
    title = (f"# EfficientNet-Lite0 int8: top-1 agreement with fp32 ({meta['eval']} evaluation "
             f"crops, {meta['calib']} disjoint calibration crops of {meta['photos']} real photos)")
    lines = [title, "",
             ("| runner | agree | top-1 agreement | Wilson 95 % | logits dB vs fp32 | build s "
              "| median ms | x ORT fp32 |"),
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['runner']} | {r['agree']}/{r['n']} | {r['top1_agree']:.1f} % | "
                     f"{r['wilson95'][0]:.1f}-{r['wilson95'][1]:.1f} % | {r['logits_sqnr_db']:.2f} | "
                     f"{r.get('build_s', float('nan')):.0f} | {r.get('median_ms', float('nan')):.2f} | "
                     f"{r.get('x_ort_fp32', float('nan')):.2f} |")
    for r in rows:
        if r.get("most_sensitive"):
            lines.append(f"\n{r['runner']}: float layers {r['float_layers'] or 'none'}; most "
                         "sensitive alone (logits dB, nearest rounding): "
                         + ", ".join(f"{x['module']} {x['op']} {x['sqnr_db']}" for x in r["most_sensitive"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calib", type=int, default=128)
    ap.add_argument("--eval", type=int, default=256)
    ap.add_argument("--recipes", default="default,bench,bench_adaround")
    ap.add_argument("--peers", default="ort,openvino", help="comma list of ort, openvino ('' for none)")
    ap.add_argument("--rounds", type=int, default=0, help="also time every runner (0: do not)")
    ap.add_argument("--out", default=str(_ROOT / "bench" / "out"))
    a = ap.parse_args(argv)
    if a.calib < 1 or a.eval < 1:
        raise SystemExit("--calib and --eval must be >= 1")
    import fxpress
    from bench.models import efficientnet_lite0
    from fxpress.real import photo_paths
    torch.manual_seed(0)
    w = efficientnet_lite0(n_calib=a.calib, n_eval=a.eval)
    evals = torch.cat([b[0] for b in w.evaluation])
    with torch.no_grad():
        logits = torch.cat([w.model(evals[i:i + 32]) for i in range(0, len(evals), 32)])
    from fxpress.errors import LoweringError
    rows, fns, failed = [], {}, []
    for name in [r for r in a.recipes.split(",") if r]:
        base, _, kf = name.partition("+kf")
        if base not in RECIPES or (kf and not kf.isdigit()):
            raise SystemExit(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)} (+kfN)")
        opts = {**RECIPES[base], **({"keep_float": int(kf)} if kf else {})}
        t = time.perf_counter()
        cm = fxpress.compress(w.model, w.example, fxpress.Quantize(
            mode="static", calib_samples=a.calib, **opts), calibration=w.calibration)
        sec = cm.report.sections
        floated = (sec.get("quant_guard") or {}).get("float_modules", []) if kf else []
        worst = (sec.get("quant_sensitivity") or [])[:5]  # each layer alone, nearest rounding
        print(f"  {name}: float layers {floated}; most sensitive {worst}", flush=True)
        try:
            run = fxpress.lower(cm, "onnxruntime", example_inputs=w.example,
                                calibration=w.calibration)
        except LoweringError as e:  # reported as a row, the other recipes go on
            print(f"  {name}: LoweringError {e}", flush=True)
            failed.append({"runner": f"fxpress -> ORT ({name})", "error": str(e)[:300]})
            continue
        label = f"fxpress -> ORT ({name})"
        fns[label] = run
        rows.append(score(label, run, evals, logits,
                          {"build_s": time.perf_counter() - t, "recipe": opts, "float_layers": floated,
                           "most_sensitive": worst,
                           "kernels": dict(run.report.get("kernels") or {})}))
    from bench.peers import PEERS
    want = {"ort": "ORT quantize_static (QDQ, per-channel)", "openvino": "OpenVINO + NNCF nncf.quantize",
            "fp32": "ORT fp32"}
    with tempfile.TemporaryDirectory() as tmp:
        keys = [p for p in a.peers.split(",") if p] + (["fp32"] if a.rounds > 0 else [])
        for key in keys:
            peer = next(p for p in PEERS if p.name == want[key])
            t = time.perf_counter()
            fn, _ = peer.build(w, tmp)
            fns[peer.name] = fn
            rows.append(score(peer.name, fn, evals, logits, {"build_s": time.perf_counter() - t}))
        if a.rounds > 0:
            from fxpress.timing import block_medians
            ms = block_medians(fns, w.example, rounds=a.rounds)
            for r in rows:
                r["median_ms"] = ms[r["runner"]]
                r["x_ort_fp32"] = ms["ORT fp32"] / ms[r["runner"]]
    meta = {"calib": a.calib, "eval": a.eval, "photos": len(photo_paths()),
            "threads": torch.get_num_threads(), "rounds": a.rounds}
    from fxpress.utils import atomic_write_text
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "effnet_accuracy.json",
                      json.dumps({"meta": meta, "rows": rows, "failed": failed}, indent=1))
    md = markdown(rows, meta) + "".join(f"\n{f['runner']}: FAILED {f['error']}\n" for f in failed)
    atomic_write_text(out / "effnet_accuracy.md", md)
    print("\n" + md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
