"""Saved backend artefacts, reloaded behind the lowered model's checked call (``fxpress.load``).

    run = fxpress.load("m.onnx")      # ONNX Runtime session
    run = fxpress.load("m.pt2")       # AOTInductor package or torch.export program
    run(x)                            # InputError naming the input where x does not fit

Each artefact carries the signature and pytree specs of the model it was saved from (ONNX
``metadata_props``, AOTInductor package metadata, a torch.export program's own specs), so a
reloaded artefact is called with the model's args/kwargs and returns its output structure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError, LoweringError
from .base import Lowered

__all__ = ["LoadedArtefact", "load", "kind_of", "load_genai_folder", "spec_metadata",
           "specs_from_metadata"]

_ONNX_DTYPES = {1: torch.float32, 2: torch.uint8, 3: torch.int8, 5: torch.int16, 6: torch.int32,
                7: torch.int64, 9: torch.bool, 10: torch.float16, 11: torch.float64,
                16: torch.bfloat16}


class LoadedArtefact(Lowered):
    """A reloaded artefact: `run_flat` is the runtime's; calls are checked like a lowering's."""

    def __init__(self, backend: str, run_flat: Callable[[Sequence], list], signature, in_spec,
                 out_spec, path: Path, report: dict | None = None):
        self.backend = backend
        self._run, self.signature = run_flat, signature
        self._in_spec, self._out_spec = in_spec, out_spec
        self.path = path
        self.report = {"path": str(path), **(report or {})}

    def run_flat(self, flat_inputs):
        with torch.no_grad():
            return list(self._run(list(flat_inputs)))

    def save(self, path) -> Any:
        raise LoweringError(f"{self.path.name} is already a saved artefact: copy the file")


def load(path: Path, kind: str, **options: Any):
    if kind == "onnx":
        return _load_onnx(path, **options)
    if kind == "aoti":
        return _load_aoti(path, **options)
    if kind == "export":
        return _load_export(path, **options)
    if kind == "tvm":
        from .tvm.build import load as load_tvm
        return load_tvm(path)
    raise InputError(f"{path}: unknown artefact kind {kind!r}", input_name="path")


def _load_onnx(path: Path, threads: int | None = None, optimization: str = "all"):
    import onnx

    from .onnxruntime import _Session
    model = onnx.load(str(path))
    sig, in_spec, out_spec = specs_from_metadata({p.key: p.value for p in model.metadata_props})
    if sig is None:  # an .onnx written elsewhere: its own graph inputs are the signature
        sig = _onnx_signature(model)
    session = _Session(model, threads, optimization)
    by_name = {s.name: i for i, s in enumerate(sig.inputs)}
    order = [by_name.get(n) for n in session.input_names]
    if None in order:
        order = list(range(len(session.input_names)))  # positional, as the graph lists them
    n_out = len(session.output_names)

    def run(flat):
        outs = session(*[flat[i] for i in order])
        return outs[:n_out]
    if out_spec is not None and out_spec.num_leaves != n_out:
        out_spec = None  # constant outputs were folded away: flat outputs
    return LoadedArtefact("onnxruntime", run, sig, in_spec, out_spec, path,
                          {"kernels": dict(session.kernels)})


def _onnx_signature(model):
    from ..ir.signature import InputSpec, Signature
    inits = {i.name for i in model.graph.initializer}
    specs = []
    for v in model.graph.input:
        if v.name in inits:
            continue
        t = v.type.tensor_type
        shape = tuple(d.dim_param or d.dim_value for d in t.shape.dim)
        specs.append(InputSpec(v.name, _ONNX_DTYPES.get(t.elem_type), shape))
    return Signature(tuple(specs))


def _load_aoti(path: Path, **options):
    from ..saving import quiet_torch
    if options:
        raise InputError(f"an AOTInductor package takes no load options, got {sorted(options)}",
                         input_name=next(iter(options)))
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (ops a package may call back into)
    with quiet_torch():
        compiled = torch._inductor.aoti_load_package(str(path))
    meta = dict(compiled.get_metadata())
    sig, in_spec, out_spec = specs_from_metadata(meta)
    if sig is None:
        raise InputError(f"{path}: an AOTInductor package without fxpress's signature metadata; "
                         "load it with torch._inductor.aoti_load_package", input_name="path")

    def run(flat):
        out = compiled(*flat)
        return list(out) if isinstance(out, (list, tuple)) else [out]
    return LoadedArtefact("inductor", run, sig, in_spec, out_spec, path)


def _load_export(path: Path, **options):
    import json

    from ..ir.signature import signature_from_placeholders
    from ..saving import quiet_torch
    if options:
        raise InputError(f"a torch.export program takes no load options, got {sorted(options)}",
                         input_name=next(iter(options)))
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    extra = {"fxpress.json": ""}
    with quiet_torch():
        ep = torch.export.load(str(path), extra_files=extra)
        module = ep.module()
    sig, in_spec, out_spec = specs_from_metadata(json.loads(extra["fxpress.json"] or "{}"))
    # the program itself takes the flat inputs and returns flat outputs (EagerLowered.save)
    sig = sig or signature_from_placeholders(module)

    def run(flat):
        with quiet_torch():
            out = module(*flat)
        return list(out) if isinstance(out, (list, tuple)) else [out]
    return LoadedArtefact("eager", run, sig, in_spec, out_spec, path)


# ------------------------------------------------------------------ what a file holds
def kind_of(p: Path) -> str:
    """What a saved file holds: 'compressed', 'aoti', 'export', 'tvm' or 'onnx' (InputError else)."""
    import zipfile
    head = p.open("rb").read(4)
    if head[:2] == b"PK":
        with zipfile.ZipFile(p) as z:
            names = z.namelist()
        if any(n.endswith("/data.pkl") or n == "data.pkl" for n in names) and \
                not any("/aotinductor/" in n or "/models/" in n for n in names):
            return "compressed"
        if any("/aotinductor/" in n for n in names):
            return "aoti"
        if any("/models/" in n or n.startswith("models/") for n in names):
            return "export"
    if head == b"\x7fELF" or p.suffix in (".so", ".dylib", ".dll"):
        return "tvm"
    if p.suffix == ".onnx" or _looks_onnx(p):
        return "onnx"
    raise InputError(f"{p}: not a file fxpress can load (a CompressedModel file, .onnx, "
                     ".pt2 from AOTInductor or torch.export, TVM .so, or an ORT GenAI folder)",
                     input_name="path")


def _looks_onnx(p: Path) -> bool:
    try:
        import onnx
        onnx.load(str(p), load_external_data=False)
        return True
    except Exception:  # noqa: BLE001
        return False


def load_genai_folder(p: Path, **options):
    try:
        from ..llm import load_genai_folder  # llm-ort's loader
    except ImportError as e:
        raise LoweringError(f"{p}: an ORT GenAI folder; this fxpress build has no "
                            f"fxpress.llm.load_genai_folder ({e})") from e
    return load_genai_folder(p, **options)


# ------------------------------------------------------------------ metadata for artefacts
def spec_metadata(lowered) -> dict[str, str]:
    """String metadata an artefact carries so `load` can check calls and rebuild outputs:
    the signature and the pytree specs of `lowered` (a Lowered)."""
    import json
    from ..saving import _dumps_spec
    sig = [{"name": s.name, "dtype": None if s.dtype is None else str(s.dtype).replace("torch.", ""),
            "shape": list(s.shape), "index_range": s.index_range} for s in lowered.signature.inputs]
    out = {"fxpress.signature": json.dumps(sig)}
    for key, spec in (("fxpress.in_spec", lowered._in_spec), ("fxpress.out_spec", lowered._out_spec)):
        d = _dumps_spec(spec)
        if d is not None and d[0] == "json":
            out[key] = d[1]
    return out


def specs_from_metadata(meta: dict[str, str]):
    """(Signature | None, in_spec, out_spec) from `spec_metadata`'s strings."""
    import json
    from ..ir.signature import InputSpec, Signature
    from ..saving import _loads_spec
    sig = None
    if "fxpress.signature" in meta:
        sig = Signature(tuple(InputSpec(s["name"], None if s["dtype"] is None else getattr(torch, s["dtype"]),
                                        tuple(s["shape"]),
                                        tuple(s["index_range"]) if s.get("index_range") else None)
                              for s in json.loads(meta["fxpress.signature"])))
    ins = _loads_spec(("json", meta["fxpress.in_spec"])) if "fxpress.in_spec" in meta else None
    outs = _loads_spec(("json", meta["fxpress.out_spec"])) if "fxpress.out_spec" in meta else None
    return sig, ins, outs
