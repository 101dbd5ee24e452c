"""Typed, frozen compression records carried in ``node.meta``.

Every record is a frozen dataclass with a ``KEY`` and a ``validate()`` that lists
problems (the verifier calls it). Records live under ``node.meta["fxpress"]``,
one per kind, and travel with the node through ``node_copy``/``deepcopy``.

    >>> set_record(node, QuantSpec(dtype="int8", qscheme="per_channel", symmetric=True, axis=0))
    >>> get_record(node, QuantSpec).quant_min
    -127
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, TypeVar

import torch
import torch.fx as fx

__all__ = [
    "Record", "Lineage", "QuantSpec", "QuantAnnotation", "ObserverStats", "ChannelRef", "ChannelGroup",
    "SparsityMask", "Factorization", "WeightForm", "LayerChoice", "ResidualQuant", "set_record", "get_record",
    "records", "drop_record",
    "lineage", "module_path", "META_KEY",
]

META_KEY = "fxpress"
R = TypeVar("R", bound="Record")


class Record:
    """Base of all records: a KEY and a validate() returning a list of problems."""

    KEY: ClassVar[str] = "record"

    def validate(self) -> list[str]:
        return []


@dataclass(frozen=True)
class Lineage(Record):
    """Where a node came from, in the user's terms."""

    KEY: ClassVar[str] = "lineage"
    module_path: str          # "layer1.0.conv1" ("" for the top-level module)
    module_type: str          # "Conv2d"
    original_op: str          # "aten.conv2d.default" or the op that a rewrite replaced
    source: str | None = None  # "model.py:42"

    def derived(self, op: str) -> "Lineage":
        """The same lineage for a node a rewrite made from this one."""
        return Lineage(self.module_path, self.module_type, op, self.source)


_QDTYPES = {"int8": (-128, 127), "uint8": (0, 255), "int32": (-(2**31), 2**31 - 1),
            "int4": (-8, 7), "float8_e4m3fn": (-448, 448)}


@dataclass(frozen=True)
class QuantSpec(Record):
    """How one tensor (an activation or a weight) is quantized."""

    KEY: ClassVar[str] = "qspec"
    dtype: str = "int8"              # int8 | uint8 | int32
    qscheme: str = "per_tensor"      # per_tensor | per_channel
    symmetric: bool = True
    axis: int | None = None          # channel axis for per_channel
    narrow_range: bool = False       # symmetric int8 uses [-127, 127]
    dynamic: bool = False            # qparams computed at run time
    observer: str = "minmax"
    shared_with: str | None = None   # name of the node whose qparams this one reuses
    # int8 weights in [-64, 64]: u8 x s8 pair sums (x86 vpmaddubsw without VNNI) stay within
    # int16 (2 * 255 * 64 = 32640), so such kernels are exact at full speed
    reduce_range: bool = False

    @property
    def quant_min(self) -> int:
        if self.reduce_range and self.dtype == "int8":
            return -64
        lo = _QDTYPES[self.dtype][0]
        return lo + 1 if (self.narrow_range and self.dtype == "int8") else lo

    @property
    def quant_max(self) -> int:
        if self.reduce_range and self.dtype == "int8":
            return 64
        return _QDTYPES[self.dtype][1]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def validate(self) -> list[str]:
        p = []
        if self.dtype not in _QDTYPES:
            p.append(f"QuantSpec.dtype {self.dtype!r} not in {sorted(_QDTYPES)}")
        if self.qscheme not in ("per_tensor", "per_channel"):
            p.append(f"QuantSpec.qscheme {self.qscheme!r} not per_tensor/per_channel")
        if self.qscheme == "per_channel" and self.axis is None:
            p.append("QuantSpec per_channel needs an axis")
        if self.reduce_range and self.dtype != "int8":
            p.append(f"QuantSpec.reduce_range is for int8 weights, not {self.dtype}")
        return p


@dataclass(frozen=True)
class QuantAnnotation(Record):
    """Which tensors of one op are quantized: per input edge (arg index) and its output.

    The quantizer only writes these; generic passes insert observers where they say.
    """

    KEY: ClassVar[str] = "qannot"
    inputs: tuple[tuple[int, QuantSpec], ...] = ()   # (arg index, spec) per quantized input
    output: QuantSpec | None = None

    def input_spec(self, index: int) -> QuantSpec | None:
        return dict(self.inputs).get(index)

    def validate(self) -> list[str]:
        p = [x for _, s in self.inputs for x in s.validate()]
        return p + (self.output.validate() if self.output is not None else [])


@dataclass(frozen=True, eq=False)
class ObserverStats(Record):
    """Range statistics an observer collected for one tensor, and the qparams chosen."""

    KEY: ClassVar[str] = "observed"
    observer: str
    min_val: torch.Tensor
    max_val: torch.Tensor
    num_batches: int
    scale: torch.Tensor | None = None
    zero_point: torch.Tensor | None = None

    def validate(self) -> list[str]:
        p = []
        if self.num_batches <= 0:
            p.append("ObserverStats saw no batches")
        if not (torch.isfinite(self.min_val).all() and torch.isfinite(self.max_val).all()):
            p.append("ObserverStats has non-finite range")
        if self.scale is not None and not bool((self.scale > 0).all()):
            p.append("ObserverStats scale must be > 0")
        return p


@dataclass(frozen=True)
class ChannelRef:
    """A slice of one dimension of one node's tensor that belongs to a channel group."""

    node: str           # fx node name
    module: str         # user module path, for printing
    dim: int
    start: int
    stop: int
    role: str           # out | in | norm | pass | head
    width: int = 1      # indices per unit of the group (a head's D, flatten's H*W); 0: scattered

    def __str__(self) -> str:
        side = {"out": ".out", "in": ".in"}.get(self.role, "")
        return f"{self.module or self.node}{side}[{self.start}:{self.stop}]"


@dataclass(frozen=True)
class ChannelGroup(Record):
    """Channels that must be removed together (Torch-Pruning's Group, over the ATen IR)."""

    KEY: ClassVar[str] = "channel_group"
    members: tuple[ChannelRef, ...]
    size: int
    pruned: tuple[int, ...] = ()
    note: str = ""

    def validate(self) -> list[str]:
        p = []
        for m in self.members:
            if m.width and m.stop - m.start != self.size * m.width:
                p.append(f"ChannelGroup member {m} spans {m.stop - m.start}, "
                         f"group size {self.size} x {m.width}")
        if any(i < 0 or i >= self.size for i in self.pruned):
            p.append("ChannelGroup.pruned index out of range")
        if len(set(self.pruned)) >= self.size and self.size:
            p.append("ChannelGroup would prune every channel")
        return p

    def __str__(self) -> str:
        return " => ".join(str(m) for m in self.members) + (f" ({self.note})" if self.note else "")


@dataclass(frozen=True, eq=False)
class SparsityMask(Record):
    """A weight sparsity mask recorded on the node that consumes the weight."""

    KEY: ClassVar[str] = "sparsity"
    pattern: str            # unstructured | 2:4
    param: str              # qualified attribute name of the weight
    mask: torch.Tensor      # bool, same shape as the weight

    @property
    def density(self) -> float:
        return float(self.mask.float().mean())

    def validate(self) -> list[str]:
        p = []
        if self.pattern not in ("unstructured", "2:4"):
            p.append(f"SparsityMask.pattern {self.pattern!r} not unstructured/2:4")
        if self.mask.dtype != torch.bool:
            p.append("SparsityMask.mask must be bool")
        if self.pattern == "2:4" and self.mask.numel() % 4 == 0:
            groups = self.mask.reshape(-1, 4).sum(-1)
            if bool((groups > 2).any()):
                p.append("SparsityMask 2:4 has a group of 4 with more than 2 nonzeros")
        return p


@dataclass(frozen=True)
class Factorization(Record):
    """A node that a factorization pass produced (each factor node carries it)."""

    KEY: ClassVar[str] = "factorization"
    method: str                       # svd | tucker | cp | tt
    rank: tuple[int, ...]
    original_shape: tuple[int, ...]
    original_node: str
    factor_index: int = 0
    num_factors: int = 1
    rel_error: float | None = None

    def validate(self) -> list[str]:
        p = []
        if self.method not in ("svd", "tucker", "cp", "tt"):
            p.append(f"Factorization.method {self.method!r} unknown")
        if any(r <= 0 for r in self.rank):
            p.append(f"Factorization.rank {self.rank} must be positive")
        if not 0 <= self.factor_index < self.num_factors:
            p.append("Factorization.factor_index out of range")
        return p


_WEIGHT_FORMS = ("s8", "s7", "s8_pairs", "u8u8")


@dataclass(frozen=True)
class WeightForm(Record):
    """How an int8 weight is meant to run on the CPU it was quantized for (on its dequantize node).

    s8: full-range s8 (VNNI/AMX/ARM: no int16 pair sums); s7: s8 within [-64, 64]; s8_pairs:
    full-range s8 whose adjacent K-pairs keep |w0| + |w1| <= 128 (both exact on the u8 x s8
    vpmaddubsw kernels of AVX2); u8u8: shift to u8 (exact, slower) where neither holds.
    Backends read ``form`` to decide s8 vs u8 weights.
    """

    KEY: ClassVar[str] = "weight_form"
    form: str            # s8 | s7 | s8_pairs | u8u8
    isa: str             # the host feature key it was chosen for ("avx2+fma", "avx512_vnni+...")
    reason: str = ""

    @property
    def signed(self) -> bool:
        """Whether the backend keeps the weight s8 (everything but u8u8)."""
        return self.form != "u8u8"

    def validate(self) -> list[str]:
        return [] if self.form in _WEIGHT_FORMS else \
            [f"WeightForm.form {self.form!r} not in {list(_WEIGHT_FORMS)}"]


@dataclass(frozen=True)
class LayerChoice(Record):
    """A measured per-layer decision (latency service): which form was kept and both timings."""

    KEY: ClassVar[str] = "layer_choice"
    kept: str                   # e.g. "float" | "int8" | "dense" | "factorized"
    candidates: tuple[str, ...]  # the forms timed, in order
    ms: tuple[float, ...]       # their timings (same order)
    backend: str = ""

    def validate(self) -> list[str]:
        return [] if len(self.candidates) == len(self.ms) and self.kept in self.candidates else \
            ["LayerChoice.kept must be one of its timed candidates"]


@dataclass(frozen=True)
class ResidualQuant(Record):
    """On a conv whose output feeds a residual add, from ``Quantize(conv_add="auto")``: the IR
    quantizes the conv output (ORT's QLinearConv -> QLinearAdd form, which ORT runs exactly); a
    backend with a conv + add int8 kernel (Inductor) may drop that Q/DQ pair and fuse the add
    into the conv (passes/quant/fold.py ``fuse_residual_quant``)."""

    KEY: ClassVar[str] = "residual_quant"
    add: str                    # the add node's name


@dataclass(frozen=True)
class WeightOnlySpec(Record):
    """A weight-only quantized linear weight (on its dequantize node): int4/int8 values in an
    int8 tensor, one scale (and zero point when asymmetric) per `group_size` inputs of a row."""

    KEY: ClassVar[str] = "weight_only"
    bits: int                 # 4 | 8
    group_size: int           # inputs per scale along K; -1: one scale per output row
    method: str               # rtn | gptq | awq
    symmetric: bool = True
    in_features: int = 0      # K
    out_features: int = 0     # N

    def validate(self) -> list[str]:
        p = []
        if self.bits not in (4, 8):
            p.append(f"WeightOnlySpec.bits {self.bits} not in (4, 8)")
        if self.method not in ("rtn", "gptq", "awq"):
            p.append(f"WeightOnlySpec.method {self.method!r} not rtn/gptq/awq")
        if self.group_size != -1 and self.group_size < 2:  # K need not be a multiple (last group padded)
            p.append(f"WeightOnlySpec.group_size {self.group_size} < 2")
        return p


def _store(node: fx.Node) -> dict:
    return node.meta.setdefault(META_KEY, {})


def set_record(node: fx.Node, record: Record) -> None:
    """Attach `record` to `node` (replacing a record of the same kind)."""
    # a fresh dict: node_copy shares meta values shallowly, records must not leak to the copy
    node.meta[META_KEY] = {**node.meta.get(META_KEY, {}), record.KEY: record}


def get_record(node: fx.Node, cls: type[R]) -> R | None:
    return node.meta.get(META_KEY, {}).get(cls.KEY)


def drop_record(node: fx.Node, cls: type[Record]) -> None:
    if META_KEY in node.meta and cls.KEY in node.meta[META_KEY]:
        node.meta[META_KEY] = {k: v for k, v in node.meta[META_KEY].items() if k != cls.KEY}


def records(node: fx.Node) -> dict[str, Record]:
    return dict(node.meta.get(META_KEY, {}))


def lineage(node: fx.Node) -> Lineage | None:
    return get_record(node, Lineage)


def module_path(node: fx.Node) -> str:
    """The user's module path for `node`, or the node name where none is known."""
    lin = lineage(node)
    return lin.module_path if lin and lin.module_path else node.name
