"""Unseen-family zoo on ONNX Runtime: default dynamic and static int8 vs the fp32 build.

    python bench/zoo_latency.py [--families gpt2,levit] [--batch 8] [--rounds 10] [--out bench/out]

For each family of tests/zoo/test_zoo_unseen.py (its model builders, tiny configs, random
weights) three ORT artefacts are built with `fxpress.lower(..., "onnxruntime")`: the fp32
model, `Quantize(mode="dynamic")` and `Quantize()` (static, calibrated on the zoo's two
batches). They are timed at `--batch` in rounds of per-runner blocks (bench/run.py's
`block_times`: 50 ms pause, 3 warm-up, 5 timed calls, rotated order). An int8 build whose
median is slower than fp32 is rebuilt with the latency check (`latency_check="auto",
latency_backend="onnxruntime"`: each conv/linear timed float vs int8, slower int8 layers kept
float) and timed again; if that is still slower, the fp32 build is what ships ("fp32"). The
table says which ("check" / "fp32" in the fallback column). SQNR is vs the fp32 model on the
example (dB); coverage is the int8 share of the weight-bearing MACs (cm.report["coverage"]).
Writes <out>/zoo_latency.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(_ROOT))

import fxpress  # noqa: E402
from fxpress.timing import block_times  # noqa: E402
from fxpress.utils import atomic_write_text  # noqa: E402
from tests.zoo.test_zoo_unseen import FAMILIES, build, example, main_output, sqnr  # noqa: E402


def _build(name: str, batch: int):
    model, kw, dyn, calib = build(name, batch=2)
    bench_kw = example(FAMILIES[name][1], batch, seed=7)
    return model, kw, dyn, calib, bench_kw


def _compress(model, kw, dyn, calib, recipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxpress.compress(model, (), recipe, example_kwargs=kw, dynamic_shapes=dyn,
                                calibration=calib)


def _int8_share(cm) -> float:
    fam = cm.report["coverage"]["families"]
    return float(fam.get("int8", {}).get("macs", 0.0))


def _median_ms(times: list[float]) -> float:
    return 1e3 * statistics.median(times)


def _time(runners: dict, kw: dict, rounds: int) -> dict[str, float]:
    # block_times passes positional args; the zoo's models take keywords
    calls = {k: (lambda r: (lambda: r(**kw)))(r) for k, r in runners.items()}
    t = block_times(calls, (), rounds=rounds)
    return {k: _median_ms(v) for k, v in t.items()}


def bench_family(name: str, batch: int, rounds: int) -> list[dict]:
    model, kw, dyn, calib, bench_kw = _build(name, batch)
    fp32 = _compress(model, kw, dyn, calib, [])
    builds = {"fp32": (fp32, fxpress.lower(fp32, "onnxruntime"))}
    recipes = {"dynamic": dict(mode="dynamic"), "static": dict(mode="static")}
    for label, opts in recipes.items():
        cm = _compress(model, kw, dyn, calib, fxpress.Quantize(**opts))
        builds[label] = (cm, fxpress.lower(cm, "onnxruntime"))
    ms = _time({k: run for k, (_, run) in builds.items()}, bench_kw, rounds)
    with torch.no_grad():
        ref = main_output(model(**kw))
    rows = []
    for label in ("fp32", *recipes):
        cm, run = builds[label]
        fallback, t = "", ms[label]
        if label != "fp32" and t > ms["fp32"]:
            checked = _compress(model, kw, dyn, calib, fxpress.Quantize(
                **recipes[label], latency_check="auto", latency_backend="onnxruntime"))
            crun = fxpress.lower(checked, "onnxruntime")
            again = _time({"fp32": builds["fp32"][1], label: crun}, bench_kw, rounds)
            if again[label] <= again["fp32"]:
                cm, run, fallback = checked, crun, "check"
                t = again[label] * ms["fp32"] / again["fp32"]   # on the first run's fp32 scale
            else:
                cm, run, fallback = fp32, builds["fp32"][1], "fp32"
                t = ms["fp32"]
        with torch.no_grad():
            db = sqnr(ref, main_output(run(**kw))) if label != "fp32" else float("inf")
        rows.append({"family": name, "build": label, "ms": round(t, 3),
                     "x_fp32": round(ms["fp32"] / t, 2), "sqnr_db": round(db, 1),
                     "int8_macs": round(_int8_share(cm), 3), "fallback": fallback,
                     "ms_first": round(ms[label], 3),
                     "check_db": round(run.report["check"]["sqnr_db"], 1)})
    return rows


def table(rows: list[dict]) -> str:
    head = "| family | build | ms | x fp32 | SQNR dB | int8 MACs | fallback | int8 first ms |"
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['family']} | {r['build']} | {r['ms']:.3f} | {r['x_fp32']:.2f} | "
                     f"{r['sqnr_db']} | {100 * r['int8_macs']:.0f} % | {r['fallback'] or '-'} | "
                     f"{r['ms_first']:.3f} |")
    return "\n".join(lines)


def _write(out: Path, a, rows: list[dict], started: float) -> str:
    load = os.getloadavg()[0]
    md = (f"# Zoo on ONNX Runtime: default int8 vs fp32 (batch {a.batch}, {a.rounds} rounds of "
          f"blocks, load {load:.1f} at the end, {time.time() - started:.0f} s)\n\n" + table(rows)
          + "\n")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "zoo_latency.md", md)
    atomic_write_text(out / "zoo_latency.json", json.dumps(
        {"batch": a.batch, "rounds": a.rounds, "load": load, "rows": rows}, indent=1))
    return md


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--out", default=str(_ROOT / "bench" / "out"))
    a = ap.parse_args(argv)
    rows, started = [], time.time()
    for name in a.families.split(","):
        try:
            fam = bench_family(name, a.batch, a.rounds)
        except Exception as e:  # one family's failure is a row, not the end of the bench
            fam = [{"family": name, "build": "error", "ms": float("nan"), "x_fp32": float("nan"),
                    "sqnr_db": float("nan"), "int8_macs": 0.0,
                    "fallback": f"{type(e).__name__}: {str(e)[:120]}", "ms_first": float("nan"),
                    "check_db": float("nan")}]
        rows += fam
        print(table(fam).split("\n", 2)[2], flush=True)
        md = _write(Path(a.out), a, rows, started)   # after each family: a partial run keeps rows
    print(md)
    slower = [r for r in rows if r["build"] in ("dynamic", "static") and r["x_fp32"] < 1.0]
    return 1 if slower else 0


if __name__ == "__main__":
    sys.exit(main())
