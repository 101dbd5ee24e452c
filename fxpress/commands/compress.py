"""`fxpress compress`: capture a model, run a recipe, lower it, write the artefact, print a report.

    fxpress compress --recipe r.yaml --model pkg.module:factory --calib pkg.data:batches \\
                     --backend onnxruntime --out model.onnx

MODEL is ``package.module:factory`` or ``path/file.py:factory`` returning the model or
``(model, example_inputs)`` or ``(model, dict)`` (keyword inputs, ``model(**enc)``; else give
``--input-shape``, once per input). The artefact's suffix is the backend's: ``.onnx``
(onnxruntime), ``.pt2`` (inductor: an AOTInductor package; eager: a torch.export program),
``.so`` (tvm). CALIB is
``package.module:function`` (or ``file.py:function``) returning an iterable of batches
(``(x,)`` or labelled ``(x, y)``: labels let a ``distill`` entry use hard-label terms),
or a ``.pt`` file holding such a list. Progress goes to stderr; the report to stdout.

Under ``torchrun --nproc_per_node N -m fxpress.cli compress ...`` every rank calibrates on
its round-robin share of the batches (observers merged over gloo, the same IR on every
rank); rank 0 lowers, writes --out and prints the report.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import CalibrationError, InputError, LoweringError
from ..progress import quiet
from .inspect import call_args, load_factory, model_and_inputs

__all__ = ["build_report", "load_calibration", "main"]

_BACKENDS = ("onnxruntime", "inductor", "tvm", "eager")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fxpress compress", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--model", required=True, help="package.module:factory or file.py:factory")
    p.add_argument("--recipe", required=True, help="recipe YAML/JSON file")
    p.add_argument("--calib", help="package.module:function, file.py:function or batches.pt")
    p.add_argument("--calib-batches", type=int, default=None,
                   help="use only the first N calibration batches")
    p.add_argument("--input-shape", action="append", default=[],
                   help="example input shape, e.g. 1,3,224,224 (append :long for ids); once per input")
    p.add_argument("--backend", default="onnxruntime", choices=_BACKENDS)
    p.add_argument("--out", required=True, help="where to write the lowered artefact (e.g. model.onnx)")
    p.add_argument("--report-json", help="also write the report as JSON here")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    return p


def load_calibration(spec: str | None, limit: int | None = None) -> list | None:
    """Batches from 'pkg.mod:fn' / 'file.py:fn' (called with no arguments) or a torch.save'd list."""
    if spec is None:
        return None
    if spec.endswith((".pt", ".pth")):
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"--calib {spec!r}: no such file")
        data = torch.load(path, weights_only=True)
    else:
        data = load_factory(spec)()
    if isinstance(data, torch.Tensor):
        data = [data]
    try:
        batches = []
        for b in data:
            batches.append(b)
            if limit is not None and len(batches) >= limit:
                break
    except TypeError as e:
        raise InputError(f"--calib {spec!r}: expected an iterable of batches, got "
                         f"{type(data).__name__}") from e
    if not batches:
        raise CalibrationError(f"--calib {spec!r} yielded no batches")
    return batches


class _Progress:
    """Named stages on one tqdm bar (stderr; silent when disabled or not a terminal)."""

    def __init__(self, stages: list[str], enabled: bool):
        from tqdm.auto import tqdm
        self.bar = tqdm(total=len(stages), desc="fxpress compress", unit="stage", file=sys.stderr,
                        disable=None if enabled else True, leave=False)
        self.t0 = time.perf_counter()
        self.times: dict[str, float] = {}

    def stage(self, name: str):
        self.bar.set_postfix_str(name)
        return _Stage(self, name)

    def close(self):
        self.bar.close()


class _Stage:
    def __init__(self, prog: _Progress, name: str):
        self.prog, self.name = prog, name

    def __enter__(self):
        self.t = time.perf_counter()

    def __exit__(self, *exc):
        self.prog.times[self.name] = time.perf_counter() - self.t
        if exc[0] is None:
            self.prog.bar.update(1)
        return False


def _size(n_bytes: float) -> str:
    return f"{n_bytes / 1024:.1f} KB" if n_bytes < 1 << 20 else f"{n_bytes / (1 << 20):.2f} MB"


def _param_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for t in list(module.parameters()) + list(module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def _agreement(model, run, batches: list, example_inputs: tuple | dict) -> dict[str, float]:
    """Output agreement of the lowered artefact with the original model (fp32 eager)."""
    from ..passes.distill.trainer import first_output, split_batch
    if isinstance(example_inputs, dict):  # keyword inputs (model(**enc)): the example itself
        inputs = [example_inputs]
    else:
        inputs = [split_batch(b, len(example_inputs))[0] for b in (batches or [example_inputs])][:8]
        inputs = [i for i in inputs if all(tuple(a.shape) == tuple(e.shape)
                                           for a, e in zip(i, example_inputs))] or [example_inputs]
    num = den = 0.0
    agree = total = 0
    max_err = 0.0
    for inp in inputs:
        args, kwargs = call_args(inp)
        ref = first_output(model(*args, **kwargs)).float()
        out = first_output(run(*args, **kwargs)).float()
        num += float(ref.pow(2).sum())
        den += float((ref - out).pow(2).sum())
        max_err = max(max_err, float((ref - out).abs().max()))
        if ref.dim() >= 2 and ref.shape[-1] > 1:
            agree += int((ref.argmax(-1) == out.argmax(-1)).sum())
            total += ref[..., 0].numel()
    import math
    res = {"sqnr_db": 10 * math.log10(num / den) if den > 0 else float("inf"), "max_abs_err": max_err}
    if total:
        res["top1_agreement"] = agree / total
    return res


def build_report(args, model, cm, run, out_path: Path, batches, example_inputs, times) -> dict[str, Any]:
    from ..timing import median_ms
    report: dict[str, Any] = {
        "model": args.model, "recipe": args.recipe, "backend": args.backend, "out": str(out_path),
        "artefact_bytes": out_path.stat().st_size if out_path.is_file() else None,
        "params_bytes_before": _param_bytes(model), "params_bytes_after": _param_bytes(cm.graph_module),
        "passes": [{"name": r.name, "modified": r.modified, "ms": round(r.seconds * 1e3, 1),
                    "stats": {k: v for k, v in r.stats.items() if isinstance(v, (int, float, str, bool))}}
                   for r in cm.report.passes],
        "stage_seconds": {k: round(v, 3) for k, v in times.items()},
    }
    report["agreement"] = _agreement(model, run, batches, example_inputs)
    a, kw = call_args(example_inputs)
    report["latency_ms"] = {"eager_fp32": median_ms(lambda: model(*a, **kw), (), runs=10, warmup=2),
                            args.backend: median_ms(lambda: run(*a, **kw), (), runs=10, warmup=2)}
    return report


def _format(report: dict[str, Any], cm) -> str:
    head = (f"compressed {report['model']} with {report['recipe']} -> {report['out']} "
            f"({report['backend']})")
    lines = [head, "", str(cm.report), ""]
    lines.append(f"weights: {_size(report['params_bytes_before'])} -> {_size(report['params_bytes_after'])}"
                 + (f"; artefact {_size(report['artefact_bytes'])}" if report["artefact_bytes"] else ""))
    a = report["agreement"]
    agree = f", top-1 agreement {a['top1_agreement'] * 100:.1f}%" if "top1_agreement" in a else ""
    lines.append(f"vs the original (fp32 eager): SQNR {a['sqnr_db']:.1f} dB, max |err| "
                 f"{a['max_abs_err']:.4g}{agree}")
    lat = report["latency_ms"]
    lines.append("latency (median ms, example inputs): " +
                 ", ".join(f"{k} {v:.3f}" for k, v in lat.items()))
    lines.append("stages (s): " + ", ".join(f"{k} {v:.2f}" for k, v in report["stage_seconds"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from .. import distributed
    started = not torch.distributed.is_initialized()
    w = distributed.init_from_env()  # under torchrun: one rank per process, gloo
    try:
        return _run(args, w)
    finally:
        if w is not None and started:
            torch.distributed.destroy_process_group()


def _run(args, w) -> int:
    """Every rank compresses on its shard of the calibration batches (one IR on all ranks);
    rank 0 alone lowers, writes the artefact and reports."""
    import fxpress

    from .. import distributed
    from ..recipe import Recipe
    from ..utils import atomic_write_text

    lead = w is None or w.rank == 0
    progress = not args.no_progress and lead
    prog = _Progress(["load", "compress", "lower", "save", "report"], progress)
    try:
        with prog.stage("load"):
            recipe = Recipe.load(args.recipe)
            model, example_inputs = model_and_inputs(args.model, args.input_shape)
            batches = load_calibration(args.calib, args.calib_batches)
        with prog.stage("compress"), (contextlib.nullcontext() if progress else quiet()):
            # The calibration pass shows the one per-batch bar; --no-progress silences it.
            mine = distributed.shard(batches, w) if batches is not None and w is not None else batches
            cm = fxpress.compress(model, example_inputs, recipe, calibration=mine)
        if not lead:
            return 0
        with distributed.local():  # rank 0 alone from here: no collectives
            with prog.stage("lower"):
                options = {"calibration": batches} if args.backend == "onnxruntime" and batches else {}
                run = fxpress.lower(cm, backend=args.backend, **options)  # cm's own example
            out_path = Path(args.out)
            with prog.stage("save"):
                try:
                    run.save(out_path)
                except NotImplementedError as e:
                    raise LoweringError(f"backend {args.backend!r} writes no artefact ({e})") from e
            with prog.stage("report"):
                report = build_report(args, model, cm, run, out_path, batches, example_inputs,
                                      prog.times)
    finally:
        prog.close()
    print(_format(report, cm))
    print("\nsummary:")
    run.summary()  # size, MACs by dtype, SQNR vs fp32, the lowering check and latency
    if args.report_json:
        atomic_write_text(args.report_json, json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
