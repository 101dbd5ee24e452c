"""AdaRound on the real EfficientNet-Lite0: top-1 agreement with fp32 on the 96 held-out crops
bench/run.py uses, IR and lowered (ORT, Inductor), with and without Quantize(adaround=...).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/adaround_effnet.py \
        [--calib 100] [--iterations 500] [--backends ir,onnxruntime,inductor] [--recipes default,bench]

Calibration: the 32 crops bench/run.py calibrates on, then crops of a second seed (other views
of the same photos) up to --calib. Recipes: "default" = Quantize(mode="static") (bias correction
"auto": on for this depthwise net); "no_bc" / "bc": bias_correction False / True; "bench" = the
fxpress row of bench/run.py (equalize, bias_correction, float_outputs, conv_add="separate");
"bench_no_bc" = that without bias correction; each without and with adaround.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import fxpress
from fxpress.passes.quant import sqnr_db
from fxpress.real import (
    EFFICIENTNET_MEAN_STD,
    agreement,
    efficientnet_lite0,
    photo_crops,
    photo_sets,
)

RECIPES = {
    "default": {},
    "no_bc": {"bias_correction": False},
    "bc": {"bias_correction": True},
    "bench": {"equalize": True, "bias_correction": True, "float_outputs": True, "conv_add": "separate"},
    "bench_no_bc": {"equalize": True, "bias_correction": False, "float_outputs": True,
                    "conv_add": "separate"},
}


def data(n_calib: int):
    calib, evals = photo_sets(32, 96)
    if n_calib > 32:
        mean, std = EFFICIENTNET_MEAN_STD
        extra = (photo_crops(n_calib - 32, seed=1) / 255.0 - mean) / std
        calib = torch.cat([calib, extra])
    return [(calib[i:i + 1],) for i in range(min(n_calib, len(calib)))], evals


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=100)
    ap.add_argument("--iterations", type=int, default=500)
    ap.add_argument("--backends", default="ir,onnxruntime,inductor")
    ap.add_argument("--recipes", default="default,eq_bc,bench")
    ap.add_argument("--json", default=None, help="write the rows here")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = efficientnet_lite0()
    calib, evals = data(a.calib)
    with torch.no_grad():
        logits = model(evals)
    ref = logits.argmax(-1)
    rows = []
    for recipe in a.recipes.split(","):
        for ada in (False, a.iterations):
            cfg = fxpress.Quantize(mode="static", adaround=ada, calib_samples=a.calib, **RECIPES[recipe])
            t = time.perf_counter()
            cm = fxpress.compress(model, calib[0], cfg, calibration=calib)
            took = time.perf_counter() - t
            stats = {p.name: p.stats for p in cm.report.passes}.get("quant_adaround", {})
            for be in a.backends.split(","):
                if be == "ir":
                    fn = cm
                else:
                    extra = {"calibration": calib} if be == "onnxruntime" else {}
                    fn = fxpress.lower(cm, be, example_inputs=calib[0], **extra)
                with torch.no_grad():
                    out = torch.cat([fn(evals[i:i + 1]) for i in range(len(evals))])
                row = {"recipe": recipe, "adaround": ada, "backend": be,
                       "top1_agree": round(100 * agreement(ref, out.argmax(-1)), 1),
                       "logits_sqnr_db": round(sqnr_db(logits, out), 2),
                       "compress_s": round(took, 1), "adaround_stats": stats}
                rows.append(row)
                print(json.dumps(row), flush=True)
            if ada:
                layers = cm.report.sections["adaround"]
                kept = [r for r in layers if r["kept"] != "adaround"]
                gain = [r["mse_nearest"] / r["mse_adaround"] for r in layers if r.get("mse_adaround")]
                print(f"  adaround: {len(layers) - len(kept)} layers, kept nearest {len(kept)}, "
                      f"mse nearest/adaround median {sorted(gain)[len(gain) // 2]:.2f}", flush=True)
    if a.json:
        from fxpress.utils import atomic_write_text
        atomic_write_text(a.json, json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
