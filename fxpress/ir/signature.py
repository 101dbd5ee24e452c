"""The IR's input signature: which inputs it takes, their dtypes, and which dimensions are dynamic.

Captured once, from torch.export's placeholders, before any pass re-propagates concrete shapes:

    gm = fxpress.capture(model, (torch.randn(2, 3, 32, 32),))   # batch dynamic by default
    sig = signature(gm)
    sig.inputs[0]            # InputSpec(name='x', dtype=torch.float32, shape=('batch', 3, 32, 32))
    sig.check([torch.randn(7, 3, 32, 32)])        # fine: the batch is dynamic
    sig.check([torch.randn(7, 1, 32, 32)])        # InputError: input 'x' dim 1 is 1, expected 3

Every lowered model checks its calls against it (count, dtype, rank, static dims) and every
backend reads `dynamic_dims()` to keep the same dimensions symbolic in its artefact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from ..errors import InputError

__all__ = ["InputSpec", "Signature", "signature", "set_signature", "signature_from_placeholders",
           "flatten_call", "check_ir_call", "record_dim_names", "output_names", "KEY", "DIM_NAMES"]

KEY = "fxpress.signature"
DIM_NAMES = "fxpress.dim_names"


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


@dataclass(frozen=True)
class InputSpec:
    """One flat input: its name, dtype and shape; a str entry names a dynamic dimension."""

    name: str
    dtype: torch.dtype | None  # None: not a tensor (a Python scalar the graph specialised on)
    shape: tuple[int | str, ...] = ()
    # integer inputs that index a table (token ids into an embedding): the values it accepts,
    # [low, high) — outside it ORT reads out of bounds and torch raises an IndexError deep inside
    index_range: tuple[int, int] | None = None

    def describe(self) -> str:
        if self.dtype is None:
            return f"{self.name}: non-tensor"
        return f"{self.name}: [{', '.join(str(d) for d in self.shape)}] {_dt(self.dtype)}"


@dataclass(frozen=True)
class Signature:
    """The flat inputs of an IR graph, in placeholder order."""

    inputs: tuple[InputSpec, ...]

    def dynamic_dims(self) -> list[dict[int, str]]:
        """Per flat input, {dim index: dim name} of its dynamic dimensions."""
        return [{i: d for i, d in enumerate(s.shape) if isinstance(d, str)} for s in self.inputs]

    @property
    def is_dynamic(self) -> bool:
        return any(self.dynamic_dims())

    def concrete(self, flat: Sequence[Any]) -> dict[str, int]:
        """The values the dynamic dimension names take in one call's flat inputs."""
        out: dict[str, int] = {}
        for spec, x in zip(self.inputs, flat):
            if isinstance(x, torch.Tensor):
                for i, d in enumerate(spec.shape):
                    if isinstance(d, str) and i < x.dim():
                        out.setdefault(d, int(x.shape[i]))
        return out

    def check(self, flat: Sequence[Any], *, where: str = "the model") -> None:
        """Raise InputError naming the input when `flat` does not fit (count, dtype, rank, static dims)."""
        if len(flat) != len(self.inputs):
            raise InputError(f"{where} takes {len(self.inputs)} input(s) "
                             f"({'; '.join(s.describe() for s in self.inputs)}), got {len(flat)}",
                             index=len(flat) if len(flat) > len(self.inputs) else None)
        for i, (spec, x) in enumerate(zip(self.inputs, flat)):
            if spec.dtype is None:
                continue
            if not isinstance(x, torch.Tensor):
                raise InputError(f"{where}: input {spec.name!r} must be a tensor "
                                 f"({spec.describe()}), got {type(x).__name__}",
                                 input_name=spec.name, index=i)
            if x.dtype != spec.dtype:
                raise InputError(f"{where}: input {spec.name!r} has dtype {_dt(x.dtype)}, expected "
                                 f"{_dt(spec.dtype)} ({spec.describe()})", input_name=spec.name, index=i)
            if x.dim() != len(spec.shape):
                raise InputError(f"{where}: input {spec.name!r} has rank {x.dim()} "
                                 f"(shape {list(x.shape)}), expected rank {len(spec.shape)} "
                                 f"({spec.describe()})", input_name=spec.name, index=i)
            if spec.index_range is not None and x.numel():
                lo, hi = spec.index_range
                xmin, xmax = int(x.min()), int(x.max())
                if xmin < lo or xmax >= hi:
                    raise InputError(f"{where}: input {spec.name!r} holds {xmin if xmin < lo else xmax}, "
                                     f"outside [{lo}, {hi}) (it indexes a table of {hi} rows, e.g. "
                                     "token ids into the vocabulary)", input_name=spec.name, index=i)
            for d, (want, got) in enumerate(zip(spec.shape, x.shape)):
                if isinstance(want, int) and want != got:
                    hint = ("" if self.is_dynamic else
                            "; the IR is static: compress(..., static_shapes=False) or pass "
                            "dynamic_shapes= for other sizes")
                    raise InputError(f"{where}: input {spec.name!r} has size {got} in dim {d} "
                                     f"(shape {list(x.shape)}), expected {want} "
                                     f"({spec.describe()}){hint}", input_name=spec.name, index=i)

    def fixed(self, flat: Sequence[Any]) -> "Signature":
        """This signature with every dynamic dim fixed to its size in `flat` (a static artefact)."""
        sizes = self.concrete(flat)
        return Signature(tuple(InputSpec(s.name, s.dtype, tuple(sizes.get(d, d) if isinstance(d, str)
                                                                 else d for d in s.shape),
                                         s.index_range)
                               for s in self.inputs))

    def with_index_ranges(self, gm: fx.GraphModule) -> "Signature":
        """This signature with `index_range` set on the integer inputs `gm` feeds straight into
        an embedding lookup (``aten.embedding``'s indices): [0, rows of the table)."""
        rows: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_function" and n.target is torch.ops.aten.embedding.default \
                    and len(n.args) >= 2 and getattr(n.args[1], "op", None) == "placeholder":
                w = n.args[0].meta.get("val") if isinstance(n.args[0], fx.Node) else None
                if isinstance(w, torch.Tensor) and w.dim() == 2:
                    name = n.args[1].name
                    rows[name] = min(rows.get(name, int(w.shape[0])), int(w.shape[0]))
        if not rows:
            return self
        phs = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        if len(phs) != len(self.inputs):
            return self
        return Signature(tuple(
            InputSpec(s.name, s.dtype, s.shape, (0, rows[ph]))
            if ph in rows and s.dtype is not None and not s.dtype.is_floating_point else s
            for s, ph in zip(self.inputs, phs)))

    def export_dynamic_shapes(self) -> tuple:
        """torch.export dynamic_shapes for the flat graph (one Dim per dim name, shared)."""
        dims: dict[str, Any] = {}
        return tuple({i: dims.setdefault(n, torch.export.Dim(n)) for i, n in d.items()} or None
                     for d in self.dynamic_dims())

    def examples(self, sizes: dict[str, int] | None = None) -> list[Any]:
        """Zero tensors that fit the signature (dynamic dims from `sizes`, else 2)."""
        sizes = sizes or {}
        return [torch.zeros([sizes.get(d, 2) if isinstance(d, str) else d for d in s.shape],
                            dtype=s.dtype) if s.dtype is not None else None for s in self.inputs]


def _dim(d, names: dict[str, str], index: int) -> int | str:
    if isinstance(d, int):
        return d
    expr = str(d)
    if isinstance(d, torch.SymInt) and d.node.expr.is_number:
        return int(d)
    # the user's Dim name where they gave one (record_dim_names); otherwise one name per
    # distinct symbol in the order met: "batch" for a leading dim, "dim<i>" for dim i
    if expr not in names:
        taken = set(names.values())
        name = "batch" if index == 0 else f"dim{index}"
        k = 1
        while name in taken:
            k += 1
            name = f"{'batch' if index == 0 else f'dim{index}'}_{k}"
        names[expr] = name
    return names[expr]


def record_dim_names(gm: fx.GraphModule, model, args: tuple, kwargs: dict | None,
                     dynamic_shapes) -> None:
    """Remember the names of the user's ``torch.export.Dim``s for the symbols export gave them
    (``gm.meta[DIM_NAMES]``: symbol -> name), so the signature, reports and the saved .onnx say
    "seq" where the user said ``Dim("seq")``. Call before anything re-propagates shapes."""
    import inspect
    if not dynamic_shapes:
        return
    try:
        bound = inspect.signature(model.forward).bind(*args, **(kwargs or {}))
    except (TypeError, ValueError):
        return
    if isinstance(dynamic_shapes, dict):
        specs = dynamic_shapes
    else:
        specs = dict(zip(bound.arguments, dynamic_shapes))
    per_tensor: dict[int, dict[int, str]] = {}

    def walk(value, spec):
        if isinstance(value, torch.Tensor):
            items = spec.items() if isinstance(spec, dict) else \
                enumerate(spec) if isinstance(spec, (list, tuple)) else ()
            dims = {int(i): d.__name__ for i, d in items
                    if isinstance(getattr(d, "__name__", None), str) and d.__name__.isidentifier()}
            if dims:
                per_tensor[id(value)] = dims
        elif isinstance(value, (list, tuple)) and isinstance(spec, (list, tuple)):
            for v, sp in zip(value, spec):
                walk(v, sp)
        elif isinstance(value, dict) and isinstance(spec, dict):
            for k, v in value.items():
                walk(v, spec.get(k))

    for name, value in bound.arguments.items():
        walk(value, specs.get(name))
    if not per_tensor:
        return
    import torch.utils._pytree as pytree
    leaves = pytree.tree_leaves((tuple(args), dict(kwargs or {})))
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    by_name = {n.name: n for n in phs}
    pairs = list(zip(phs, leaves)) if len(phs) == len(leaves) else \
        [(by_name[k], v) for k, v in (kwargs or {}).items() if k in by_name]
    names: dict[str, str] = {}
    for ph, leaf in pairs:
        val = ph.meta.get("val")
        for i, name in per_tensor.get(id(leaf), {}).items():
            if isinstance(val, torch.Tensor) and i < val.dim() and isinstance(val.shape[i], torch.SymInt):
                names.setdefault(str(val.shape[i]), name)
    if names:
        gm.meta[DIM_NAMES] = names


def signature_from_placeholders(gm: fx.GraphModule) -> Signature:
    """Read the signature from the placeholders' meta["val"] (symbolic dims become names)."""
    names: dict[str, str] = dict(getattr(gm, "meta", {}).get(DIM_NAMES, {}))
    specs = []
    for n in gm.graph.nodes:
        if n.op != "placeholder":
            continue
        v = n.meta.get("val")
        if isinstance(v, torch.Tensor):
            specs.append(InputSpec(n.name, v.dtype, tuple(_dim(d, names, i) for i, d in enumerate(v.shape))))
        else:
            specs.append(InputSpec(n.name, None))
    return Signature(tuple(specs))


def set_signature(gm: fx.GraphModule, sig: Signature) -> fx.GraphModule:
    gm.meta[KEY] = sig
    return gm


def signature(gm: fx.GraphModule) -> Signature:
    """The IR's recorded signature (falls back to its placeholders' current values)."""
    sig = getattr(gm, "meta", {}).get(KEY)
    return sig if sig is not None else signature_from_placeholders(gm)


def flatten_call(in_spec, args: tuple, kwargs: dict, sig: Signature | None = None, *,
                 where: str = "the model") -> list:
    """Flatten one call's (args, kwargs) by the IR's pytree spec and check it against `sig`.

    A call whose structure does not match (a missing or unknown keyword, an extra positional
    input) is an InputError listing what the model takes, never a raw pytree error.
    """
    import torch.utils._pytree as pytree
    if in_spec is None:
        flat = list(args) + list(kwargs.values())
    elif _kwargs_only(in_spec) and not kwargs and len(args) == 1 and isinstance(args[0], dict):
        # model(enc) for a model captured with example_kwargs: the dict is its keywords
        return flatten_call(in_spec, (), dict(args[0]), sig, where=where)
    elif _kwargs_only(in_spec) and not kwargs and args and \
            len(pytree.tree_leaves(args)) == in_spec.num_leaves:
        # positional batches (calibration tuples) for a keyword-captured model: its flat inputs
        flat = pytree.tree_leaves(args)
    else:
        expected = in_spec.child(1).context if in_spec.num_children == 2 else None
        if kwargs and expected is not None:
            unknown = [k for k in kwargs if k not in expected]
            if unknown:
                raise InputError(f"{where} got unexpected keyword input(s) {unknown}; it takes "
                                 f"{_takes(sig)}", input_name=unknown[0])
            kwargs = {k: kwargs[k] for k in expected if k in kwargs}
        try:
            flat, spec = pytree.tree_flatten((tuple(args), kwargs))
        except Exception as e:  # unflattenable objects in the call
            raise InputError(f"{where} cannot take these inputs ({e}); it takes {_takes(sig)}") from e
        if spec != in_spec:
            n_args = in_spec.child(0).num_children if in_spec.num_children == 2 else None
            missing = [k for k in expected if k not in kwargs] if expected is not None else []
            if missing and n_args is not None and len(args) == n_args:
                raise InputError(f"{where} is missing input(s) {missing}; it takes {_takes(sig)}",
                                 input_name=missing[0])
            detail = f"got {len(args)} positional and {sorted(kwargs)} keyword input(s)"
            if n_args is not None and len(args) > n_args:
                detail += f"; it takes {n_args} positional"
            raise InputError(f"{where} was called with inputs of another structure: {detail}; "
                             f"it takes {_takes(sig)}",
                             index=len(args) if n_args is not None and len(args) > n_args else None)
    if sig is not None:
        sig.check(flat, where=where)
    return flat


def _kwargs_only(in_spec) -> bool:
    return in_spec.num_children == 2 and in_spec.child(0).num_children == 0 \
        and in_spec.child(1).num_children > 0


def _takes(sig: Signature | None) -> str:
    return "; ".join(s.describe() for s in sig.inputs) if sig is not None else "other inputs"


def check_ir_call(module, args, kwargs):
    """forward pre-hook on the IR: the signature check in place of export's static-shape one.

    Returns the call as the IR's pytree spec has it, so a keyword-captured model also takes its
    inputs as one dict or as flat positional tensors (calibration batches)."""
    import torch.utils._pytree as pytree
    info = getattr(module.graph._codegen, "pytree_info", None)
    in_spec = info.in_spec if info is not None else None
    flat = flatten_call(in_spec, args, kwargs, signature(module),
                        where=f"the IR of {type(module).__name__}")
    if in_spec is None:
        return None
    return pytree.tree_unflatten(flat, in_spec)


def output_names(out_spec, n: int | None = None) -> list[str]:
    """Names for a model's flat outputs from its pytree output spec: the fields of a ModelOutput
    or dict ("last_hidden_state", "pooler_output"), "output" for one tensor, "output_0", ...
    for a tuple, "logits.0"-style paths for nesting. `n`: how many when there is no spec."""
    import torch.utils._pytree as pytree
    if out_spec is None or out_spec.is_leaf():
        count = 1 if out_spec is not None else (n or 1)
        return ["output"] if count == 1 else [f"output_{i}" for i in range(count)]
    dummy = pytree.tree_unflatten(list(range(out_spec.num_leaves)), out_spec)
    try:
        paths = [p for p, _ in pytree.tree_flatten_with_path(dummy)[0]]
    except Exception:  # noqa: BLE001  (a node type registered without key paths)
        return [f"output_{i}" for i in range(out_spec.num_leaves)]
    names = []
    for path in paths:
        parts = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path]
        names.append(".".join(parts) if not all(p.isdigit() for p in parts)
                     else "output_" + "_".join(parts))
    return names
