"""TVM targets from host *features*: a CPU name whose AVX-512 is hidden never reaches mcpu.

The Zen-4 VM of issue 13: LLVM names it znver4, /proc/cpuinfo has no avx512*; code built
for -mcpu=znver4 dies with SIGILL there. Simulated here with fxpress.hw.simulate; the
compiled module must run on this box whatever it has.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fxpress
from fxpress import hw

tvm = pytest.importorskip("tvm")
from tvm.target import codegen

from fxpress.backends.tvm import compile_tvm, host_target
from fxpress.backends.tvm.target import HOST_ISA, target_config, target_features
from fxpress.backends.tvm.tune import database_dir, tuning_key

ZEN4_VM = {"sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "popcnt", "movbe",
           "vaes", "vpclmulqdq"}
AVX512 = {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd"}


@pytest.mark.parametrize("name", ["znver4", "skylake-avx512"])
def test_avx512_name_with_avx512_hidden_gives_target_without_avx512_and_runs(name):
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 36, 5)).eval()
    inputs = (torch.randn(1, 3, 6, 6),)
    gm = fxpress.capture(model, inputs)
    with hw.simulate(flags=ZEN4_VM, cpu_name=name):
        t = host_target()
        run = compile_tvm(gm, inputs)
    feats = target_features(t)
    assert not {f for f in feats if f.startswith("avx512")}, sorted(feats)
    assert t.attrs.get("mcpu") != name and "-avx512f" in [str(a) for a in t.attrs["mattr"]]
    assert {"avx2", "fma"} <= feats  # what the host does have is still used
    assert "avx512f" not in {str(f) for f in codegen.llvm_get_cpu_features(run.target)}
    asm = run.executable.mod.imports[0].inspect_source("asm")
    assert "%zmm" not in asm and "%ymm" in asm  # 256-bit AVX2 code, no 512-bit registers
    with torch.no_grad():
        torch.testing.assert_close(run(*inputs), gm(*inputs), atol=1e-4, rtol=1e-4)


def test_name_is_kept_when_the_host_has_every_feature_it_implies():
    with hw.simulate(flags=ZEN4_VM | AVX512 | {"avx512_vnni", "avx512_bf16", "avx512vbmi", "avx512_vbmi2",
                                               "avx512ifma", "avx512_bitalg", "avx512_vpopcntdq", "gfni"},
                     cpu_name="znver4"):
        cfg = target_config()
    assert cfg["mcpu"] == "znver4" and "avx512vnni" in target_features(cfg)


def test_avx2_only_host_with_unknown_name_gets_x86_64_v3():
    with hw.simulate(flags=ZEN4_VM, cpu_name="generic"):
        cfg = target_config()
    assert cfg["mcpu"] == "x86-64-v3" and "avx512f" not in target_features(cfg)
    with hw.simulate(flags={"sse4_1", "sse4_2", "popcnt"}, cpu_name="haswell"):
        cfg = target_config()
    assert "avx" not in target_features(cfg) and "avx2" not in target_features(cfg)
    # a host reporting avx2 without its SSE prerequisites: the "-sse4.1" would drop avx2
    with hw.simulate(flags={"avx", "avx2", "fma"}, cpu_name="znver4"):
        cfg = target_config()
    assert {"avx2", "fma"} <= target_features(cfg) and "avx512f" not in target_features(cfg)


def test_real_host_target_matches_its_cpuinfo_features():
    """Replaces the old mcpu == llvm_get_system_cpu() check: every checked ISA feature of the
    target is one the host reports, and the host's are all in the target."""
    t = host_target()
    f = hw.host()
    have = {llvm for llvm, flag in HOST_ISA.items() if flag in f.flags}
    feats = {x for x in target_features(t) if x in HOST_ISA}
    assert t.kind.name == "llvm" and t.attrs["num-cores"] >= 1
    assert feats <= have, feats - have
    assert have <= target_features(t), have - target_features(t)
    if t.attrs.get("mcpu") == codegen.llvm_get_system_cpu():
        assert "mattr" not in t.attrs or all(str(a).startswith("+") for a in t.attrs["mattr"])


def test_tuning_database_key_differs_between_feature_sets(tmp_path):
    t = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64-v3"})  # same target string for both
    avx2 = hw.HostFeatures(flags=frozenset(ZEN4_VM))
    avx512 = hw.HostFeatures(flags=frozenset(ZEN4_VM | AVX512))
    assert tuning_key("g" * 24, t, avx2) != tuning_key("g" * 24, t, avx512)
    assert database_dir(tmp_path, "g" * 24, t, avx2) != database_dir(tmp_path, "g" * 24, t, avx512)
    with hw.override(avx2):
        assert database_dir(tmp_path, "g" * 24, t) == database_dir(tmp_path, "g" * 24, t, avx2)


def test_schedule_vector_width_comes_from_hw():
    from fxpress.backends.tvm.target import target_lanes
    t = host_target()
    with hw.simulate(flags=ZEN4_VM):
        assert target_lanes(t, hw.host()) == 8
    with hw.simulate(flags=ZEN4_VM | AVX512):
        assert target_lanes(t, hw.host()) == 16
