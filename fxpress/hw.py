"""What the CPU at hand can do, read once from its *features*, never from its name.

A VM can report a CPU model whose AVX-512 its hypervisor hides (LLVM then names it
`znver4`, yet `vpdpbusd` raises SIGILL), so every ISA-dependent decision -- TVM's
`mcpu`/`mattr`, the int8 weight form, the tuning-database key, vector widths -- asks this
module, which reads the flags the kernel reports (`/proc/cpuinfo` on Linux; LLVM's host
features through TVM elsewhere; a bare conservative record when neither is there).

    >>> from fxpress import hw
    >>> f = hw.host()
    >>> f.avx2, f.vnni, f.physical_cores          # doctest: +SKIP
    (True, False, 2)
    >>> with hw.simulate(flags={"avx2", "fma"}, cpu_name="znver4"):
    ...     hw.host().avx512f
    False
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import os
import platform
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

__all__ = ["ISA_FLAGS", "HostFeatures", "host", "override", "parse_cpuinfo", "read_host", "replace", "simulate"]

# The flags that change what code may run or how fast int8 is: the feature key hashes
# these (not every cpuinfo flag, or a microcode-bug flag would invalidate tuning records).
ISA_FLAGS = frozenset({
    "sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "popcnt", "movbe",
    "avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "avx512vbmi", "avx512_vbmi2", "avx512ifma", "avx512_bitalg", "avx512_vpopcntdq",
    "avx_vnni", "amx_tile", "amx_int8", "amx_bf16", "gfni", "vaes", "vpclmulqdq",
    "asimd", "asimddp", "sve", "sve2", "i8mm", "bf16", "fphp", "asimdhp",
})

# bool field -> the cpuinfo flags that mean it (Arm's kernel says asimd for NEON)
_FIELD_FLAGS = {
    "avx2": ("avx2",), "fma": ("fma",), "avx512f": ("avx512f",), "avx512bw": ("avx512bw",),
    "avx512dq": ("avx512dq",), "avx512vl": ("avx512vl",), "avx512cd": ("avx512cd",),
    "avx512_vnni": ("avx512_vnni",), "avx_vnni": ("avx_vnni",), "avx512_bf16": ("avx512_bf16",),
    "amx_tile": ("amx_tile",), "amx_int8": ("amx_int8",), "amx_bf16": ("amx_bf16",),
    "neon": ("asimd", "neon"), "dotprod": ("asimddp",),
}

_CURRENT: contextvars.ContextVar[HostFeatures | None] = contextvars.ContextVar("fxpress_hw", default=None)


@dataclass(frozen=True)
class HostFeatures:
    """The host's ISA features; `flags` is the truth, the bool fields are views of it.

    A bool left at None is derived from `flags`; one given explicitly is written into
    `flags` (so `HostFeatures(avx2=True, fma=True)` is an AVX2 host with flags {avx2, fma}).
    `cpu_name` is LLVM's name for the CPU where known: only a *candidate* `mcpu` that the
    TVM backend accepts when every feature the name implies is in `flags`.
    """

    flags: frozenset = frozenset()
    arch: str = "x86_64"
    cpu_name: str = ""
    model: str = ""                     # cpuinfo's "model name": a label for printouts, never a decision
    physical_cores: int = 1
    source: str = "given"               # cpuinfo | llvm | conservative | given | simulated
    avx2: bool | None = None
    fma: bool | None = None
    avx512f: bool | None = None
    avx512bw: bool | None = None
    avx512dq: bool | None = None
    avx512vl: bool | None = None
    avx512cd: bool | None = None
    avx512_vnni: bool | None = None
    avx_vnni: bool | None = None
    avx512_bf16: bool | None = None
    amx_tile: bool | None = None
    amx_int8: bool | None = None
    amx_bf16: bool | None = None
    neon: bool | None = None
    dotprod: bool | None = None
    vnni: bool = field(init=False, default=False)   # avx512_vnni or avx_vnni

    def __post_init__(self):
        flags = {str(f).lower() for f in self.flags}
        for name, aliases in _FIELD_FLAGS.items():
            given = getattr(self, name)
            if given is True:
                flags.add(aliases[0])
            elif given is False:
                flags.difference_update(aliases)
        object.__setattr__(self, "flags", frozenset(flags))
        for name, aliases in _FIELD_FLAGS.items():
            object.__setattr__(self, name, any(a in flags for a in aliases))
        object.__setattr__(self, "vnni", self.avx512_vnni or self.avx_vnni)
        object.__setattr__(self, "physical_cores", max(int(self.physical_cores), 1))

    @property
    def x86(self) -> bool:
        return self.arch in ("x86_64", "amd64", "i686", "x86")

    @property
    def vector_bits(self) -> int:
        """Widest SIMD register the host runs (512 AVX-512, 256 AVX/AVX2, 128 SSE/NEON)."""
        if self.avx512f:
            return 512
        if self.avx2 or "avx" in self.flags:
            return 256
        return 128

    def vector_lanes(self, bits: int = 32) -> int:
        """Elements of `bits` per vector register: fp32 lanes are 16 on AVX-512, 8 on AVX2."""
        return self.vector_bits // bits

    def isa_level(self) -> str:
        """A short readable name of what matters for int8/fp32 kernels, e.g. 'avx512+vnni+amx'."""
        if self.x86:
            base = "avx512" if self.avx512f else "avx2" if self.avx2 else "sse"
        else:
            base = "neon" if self.neon else self.arch
        extra = [n for n, on in (("vnni", self.vnni), ("amx", self.amx_int8), ("dotprod", self.dotprod)) if on]
        return "+".join([base, *extra])

    def feature_key(self) -> str:
        """Stable short key of the ISA features, e.g. 'x86_64-avx2-1a2b3c4d'; keys caches and DBs."""
        isa = sorted(f for f in self.flags if f in ISA_FLAGS)
        digest = hashlib.sha256(f"{self.arch}|{','.join(isa)}".encode()).hexdigest()[:8]
        return f"{self.arch}-{self.isa_level()}-{digest}"

    def int8_ceiling(self) -> float:
        """Expected best int8/fp32 speed-up per MAC: ~4 with VNNI/AMX or dotprod, ~2 AVX2-only, else 1."""
        if self.vnni or self.amx_int8 or self.dotprod:
            return 4.0
        if self.avx2 or self.neon:
            return 2.0
        return 1.0

    def int8_ceiling_note(self) -> str:
        """One line for bench printouts naming the ISA and why the ceiling is what it is."""
        c = self.int8_ceiling()
        if self.vnni or self.amx_int8:
            why = "u8xs8 dot products in one instruction (VNNI" + ("/AMX" if self.amx_int8 else "") + ")"
        elif self.dotprod:
            why = "sdot/udot int8 dot products"
        elif self.avx2:
            why = "no VNNI: vpmaddubsw + vpmaddwd, int16 pair sums"
        elif self.neon:
            why = "NEON without dotprod: widening multiplies"
        else:
            why = "no int8 SIMD dot product"
        return f"{self.isa_level()} ({self.physical_cores} physical cores): int8 ceiling ~{c:g}x fp32 -- {why}"


def parse_cpuinfo(text: str, arch: str | None = None) -> HostFeatures:
    """A record from the text of /proc/cpuinfo (x86 `flags` or Arm `Features` lines).

    >>> parse_cpuinfo("processor: 0\\nphysical id: 0\\ncore id: 0\\nflags: fpu avx2 fma\\n").avx2
    True
    """
    flags: set[str] = set()
    cores: set[tuple[str, str]] = set()
    procs, model = 0, ""
    for block in text.split("\n\n"):
        kv = {}
        for line in block.splitlines():
            if ":" in line:
                k, v = line.split(":", 1)
                kv[k.strip().lower()] = v.strip()
        if "processor" in kv:
            procs += 1
        model = model or kv.get("model name", "")
        line = kv.get("flags") or kv.get("features")
        if line and not flags:  # every processor lists the same flags; take the first
            flags = set(line.split())
        if "physical id" in kv and "core id" in kv:
            cores.add((kv["physical id"], kv["core id"]))
    n = len(cores) or procs or os.cpu_count() or 1
    return HostFeatures(flags=frozenset(flags), arch=arch or platform.machine().lower() or "x86_64",
                        physical_cores=n, model=model, source="cpuinfo")


# LLVM feature names -> cpuinfo names, for hosts without /proc/cpuinfo (macOS, Windows)
_LLVM_TO_FLAG = {"avx512vnni": "avx512_vnni", "avxvnni": "avx_vnni", "avx512bf16": "avx512_bf16",
                 "amx-tile": "amx_tile", "amx-int8": "amx_int8", "amx-bf16": "amx_bf16",
                 "sse4.1": "sse4_1", "sse4.2": "sse4_2", "neon": "asimd", "dotprod": "asimddp",
                 "bmi": "bmi1", "avx512fp16": "avx512_fp16", "avx512vbmi2": "avx512_vbmi2"}


def _from_llvm() -> HostFeatures | None:
    try:
        import tvm
        from tvm.target import codegen
        cpu = codegen.llvm_get_system_cpu()
        feats = codegen.llvm_get_cpu_features(tvm.target.Target({"kind": "llvm", "mcpu": cpu}))
    except Exception:  # no TVM, or a TVM without LLVM: fall back to the conservative record
        return None
    flags = frozenset(_LLVM_TO_FLAG.get(str(f), str(f)) for f in feats)
    return HostFeatures(flags=flags, arch=platform.machine().lower(), cpu_name=cpu,
                        physical_cores=os.cpu_count() or 1, source="llvm")


def read_host() -> HostFeatures:
    """Read the real host (uncached; `host()` caches it)."""
    try:
        with open("/proc/cpuinfo") as f:
            rec = parse_cpuinfo(f.read())
        if rec.flags:
            return rec
    except OSError:  # not Linux
        pass
    return _from_llvm() or HostFeatures(arch=platform.machine().lower() or "unknown",
                                        physical_cores=os.cpu_count() or 1, source="conservative")


@functools.cache
def _real_host() -> HostFeatures:
    return read_host()


def host() -> HostFeatures:
    """The host's features: the innermost `override`/`simulate` in this context, else the real host."""
    return _CURRENT.get() or _real_host()


@contextlib.contextmanager
def override(features: HostFeatures) -> Iterator[HostFeatures]:
    """Within the block (this thread/context only) `host()` returns `features`."""
    if not isinstance(features, HostFeatures):
        from .errors import RecipeError
        raise RecipeError("hw.override takes a HostFeatures record", field="features",
                          value=type(features).__name__)
    token = _CURRENT.set(features)
    try:
        yield features
    finally:
        _CURRENT.reset(token)


def simulate(flags: Iterable[str] = (), cpu_name: str = "", arch: str = "x86_64",
             physical_cores: int = 2, **fields) -> contextlib.AbstractContextManager[HostFeatures]:
    """`override` with a host built from cpuinfo-style flags, e.g. the Zen-4 VM with AVX-512 hidden:

    >>> with simulate(flags={"avx", "avx2", "fma", "f16c", "bmi2"}, cpu_name="znver4") as f:
    ...     f.int8_ceiling()
    2.0
    """
    rec = HostFeatures(flags=frozenset(flags), arch=arch, cpu_name=cpu_name,
                       physical_cores=physical_cores, source="simulated", **fields)
    return override(rec)


def replace(features: HostFeatures, **changes) -> HostFeatures:
    """A copy of `features` with fields changed (bool fields re-derive from the new flags)."""
    base = {f.name: getattr(features, f.name) for f in dataclasses.fields(features)
            if f.init and f.name not in _FIELD_FLAGS}
    base.update(changes)
    return HostFeatures(**base)
