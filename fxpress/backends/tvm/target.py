"""The llvm target for the CPU at hand, built from its *features* (fxpress.hw), not its name.

LLVM names a CPU from CPUID family/model: a Zen-4 VM whose hypervisor hides AVX-512 is
still `znver4`, and code built with `-mcpu=znver4` there dies with SIGILL. So the host name
is only a candidate: it is used when every ISA feature LLVM's own per-CPU table says it
implies (`codegen.llvm_get_cpu_features`) is one the host reports; otherwise the newest
generic level the host fully has (x86-64-v4/v3/v2/x86-64; `generic` on Arm) plus `mattr`
listing the host's other features, and `-feature` for what the rejected name implied.

    >>> from fxpress import hw
    >>> with hw.simulate(flags={"avx", "avx2", "fma", "f16c", "bmi1", "bmi2"}, cpu_name="znver4"):
    ...     cfg = target_config()                       # doctest: +SKIP
    >>> cfg["mcpu"], "-avx512f" in cfg["mattr"]        # doctest: +SKIP
    ('x86-64-v3', True)
"""
from __future__ import annotations

from typing import Any

from ... import hw

__all__ = ["HOST_ISA", "host_target", "target_config", "target_features", "target_lanes"]

# LLVM feature name -> cpuinfo flag, for the features whose absence makes code fault (SIMD,
# bit-manipulation, crypto vectors, AMX). A name implying one the host lacks is refused.
HOST_ISA = {
    "sse4.1": "sse4_1", "sse4.2": "sse4_2", "avx": "avx", "avx2": "avx2", "fma": "fma",
    "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "popcnt": "popcnt", "movbe": "movbe",
    "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512dq": "avx512dq", "avx512vl": "avx512vl",
    "avx512cd": "avx512cd", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16",
    "avx512fp16": "avx512_fp16", "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2",
    "avx512ifma": "avx512ifma", "avx512bitalg": "avx512_bitalg", "avx512vpopcntdq": "avx512_vpopcntdq",
    "avx512vp2intersect": "avx512_vp2intersect", "avxvnni": "avx_vnni", "amx-tile": "amx_tile",
    "amx-int8": "amx_int8", "amx-bf16": "amx_bf16", "gfni": "gfni", "vaes": "vaes",
    "vpclmulqdq": "vpclmulqdq",
    # Arm (Linux cpuinfo names)
    "neon": "asimd", "dotprod": "asimddp", "sve": "sve", "sve2": "sve2", "i8mm": "i8mm",
    "bf16": "bf16", "fullfp16": "fphp",
}
_X86_LEVELS = ("x86-64-v4", "x86-64-v3", "x86-64-v2", "x86-64")


def _codegen():
    from tvm.target import codegen
    return codegen


def target_features(cfg: dict | Any) -> set[str]:
    """LLVM's feature set for a target (dict or tvm Target), `mattr` applied."""
    import tvm
    t = cfg if isinstance(cfg, tvm.target.Target) else tvm.target.Target(cfg)
    return {str(f) for f in _codegen().llvm_get_cpu_features(t)}


def _implied(triple: str, mcpu: str) -> set[str]:
    """The checked ISA features LLVM's table says `mcpu` has."""
    return {f for f in target_features({"kind": "llvm", "mtriple": triple, "mcpu": mcpu}) if f in HOST_ISA}


def target_config(features: hw.HostFeatures | None = None, num_cores: int | None = None) -> dict:
    """The llvm target dict for `features` (default: `hw.host()`); see the module docstring."""
    cg = _codegen()
    feats = features or hw.host()
    triple = cg.llvm_get_system_triple()
    have = {llvm for llvm, flag in HOST_ISA.items() if flag in feats.flags}
    name = feats.cpu_name or cg.llvm_get_system_cpu()
    cfg: dict[str, Any] = {"kind": "llvm", "mtriple": triple,
                           "num-cores": num_cores or feats.physical_cores}
    arm = triple.startswith(("aarch64", "arm64"))
    ladder = [name] if name and name != "generic" else []
    ladder += ["generic"] if arm else list(_X86_LEVELS)
    refused: set[str] = set()
    for mcpu in ladder:
        if not cg.llvm_is_valid_cpu(mcpu, triple):
            continue
        implied = _implied(triple, mcpu)
        missing = implied - have
        if not missing:
            break
        if mcpu == name:
            refused = missing
    else:
        mcpu, implied = "", set()  # nothing fits: LLVM's baseline for the triple, features below
    if mcpu and mcpu != "generic":
        cfg["mcpu"] = mcpu
    plus = sorted(f"+{f}" for f in have - implied)
    # "-f" only documents what the refused name implied (the level chosen lacks it anyway); a
    # host reporting a feature without its prerequisite would have it disable a "+": drop them.
    for mattr in (plus + sorted(f"-{f}" for f in refused), plus):
        cfg.pop("mattr", None)
        if mattr:
            cfg["mattr"] = mattr
        got = target_features(cfg)
        if have <= got:
            break
    # what the host's own features imply (avx implies sse4.2 to LLVM even if cpuinfo omits it)
    base = {"kind": "llvm", "mtriple": triple, **({"mattr": plus} if plus else {})}
    extra = {f for f in got if f in HOST_ISA} - have - target_features(base)
    if extra:  # LLVM's table gave the generic level a feature hw did not report
        from ...errors import LoweringError
        raise LoweringError(f"tvm backend: no llvm target for this host without {sorted(extra)} "
                            f"(host features {feats.feature_key()}, candidate mcpu {name!r})")
    return cfg


def host_target(num_cores: int | None = None, features: hw.HostFeatures | None = None):
    """`tvm.target.Target` for `target_config` (the host unless `features` says otherwise)."""
    import tvm
    return tvm.target.Target(target_config(features, num_cores))


def target_lanes(target, features: hw.HostFeatures | None = None) -> int:
    """fp32 lanes for schedules: from hw for the host target, from LLVM's features for others."""
    if target.kind.name != "llvm":
        return 8
    if features is not None:
        return features.vector_lanes()
    feats = target_features(target)
    return 16 if "avx512f" in feats else 8 if "avx2" in feats or "avx" in feats else 4
