"""fxpress.hw: features parsed from cpuinfo text, overrides scoped, keys and ceilings by ISA."""
from __future__ import annotations

import threading

import pytest

from fxpress import hw
from fxpress.errors import RecipeError

# Two logical CPUs of one physical core (hyper-threads) and one more core: 2 physical cores.
X86_CPUINFO = """processor\t: 0
model name\t: Some CPU @ 2.0GHz
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 avx512f avx512bw avx512vl avx512_vnni amx_tile amx_int8

processor\t: 1
physical id\t: 0
core id\t\t: 0
flags\t\t: fpu sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 avx512f avx512bw avx512vl avx512_vnni amx_tile amx_int8

processor\t: 2
physical id\t: 0
core id\t\t: 1
flags\t\t: fpu sse4_1 sse4_2 avx avx2 fma f16c bmi1 bmi2 avx512f avx512bw avx512vl avx512_vnni amx_tile amx_int8
"""

ARM_CPUINFO = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp

processor\t: 1
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp asimddp
"""

ZEN4_VM = {"sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "popcnt", "movbe"}


def test_parse_x86_cpuinfo_counts_physical_cores_and_reads_flags():
    f = hw.parse_cpuinfo(X86_CPUINFO, arch="x86_64")
    assert f.physical_cores == 2  # (0,0) twice + (0,1)
    assert f.model == "Some CPU @ 2.0GHz"
    assert f.avx2 and f.fma and f.avx512f and f.avx512bw and f.avx512_vnni and f.vnni and f.amx_int8
    assert not f.avx_vnni and not f.avx512dq and not f.neon
    assert f.vector_bits == 512 and f.vector_lanes() == 16
    assert f.int8_ceiling() == 4.0 and "VNNI" in f.int8_ceiling_note()


def test_parse_arm_cpuinfo_neon_dotprod_and_fallback_core_count():
    f = hw.parse_cpuinfo(ARM_CPUINFO, arch="aarch64")
    assert f.neon and f.dotprod and not f.avx2 and not f.vnni
    assert f.physical_cores == 2  # no core ids: one per processor entry
    assert f.vector_lanes() == 4 and f.int8_ceiling() == 4.0 and f.isa_level() == "neon+dotprod"


def test_avx2_only_host_has_ceiling_two_and_explicit_fields_write_flags():
    f = hw.HostFeatures(avx2=True, fma=True)
    assert f.flags == frozenset({"avx2", "fma"}) and f.vector_lanes() == 8
    assert f.int8_ceiling() == 2.0 and "vpmaddubsw" in f.int8_ceiling_note()
    assert hw.HostFeatures(flags=frozenset({"avx2", "avx512f"}), avx512f=False).flags == {"avx2"}
    assert hw.HostFeatures().int8_ceiling() == 1.0


def test_feature_key_depends_on_isa_flags_only():
    a = hw.HostFeatures(flags=frozenset(ZEN4_VM))
    b = hw.HostFeatures(flags=frozenset(ZEN4_VM | {"avx512f", "avx512bw"}))
    noise = hw.HostFeatures(flags=frozenset(ZEN4_VM | {"hypervisor", "constant_tsc"}), physical_cores=8)
    assert a.feature_key() != b.feature_key()
    assert a.feature_key() == noise.feature_key()  # non-ISA flags and core counts do not matter
    assert a.feature_key().startswith("x86_64-avx2-") and b.feature_key().startswith("x86_64-avx512-")


def test_override_is_scoped_and_per_thread():
    real = hw.host()
    seen = []
    with hw.simulate(flags=ZEN4_VM, cpu_name="znver4") as fake:
        assert hw.host() is fake and hw.host().cpu_name == "znver4" and not hw.host().avx512f
        t = threading.Thread(target=lambda: seen.append(hw.host()))
        t.start()
        t.join()
        with hw.override(hw.replace(fake, flags=fake.flags | {"avx512f"})):
            assert hw.host().avx512f
        assert not hw.host().avx512f
    assert hw.host() is real and seen == [real]  # another thread saw the real host


def test_override_rejects_other_types():
    with pytest.raises(RecipeError, match="HostFeatures"), hw.override({"avx2": True}):
        pass


def test_real_host_is_read_once_and_consistent_with_cpuinfo():
    assert hw.host() is hw.host()
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        pytest.skip("no /proc/cpuinfo on this OS")
    flags = set(next(line for line in text.splitlines() if line.startswith(("flags", "Features"))).split(":")[1].split())
    f = hw.host()
    assert f.source == "cpuinfo" and f.avx2 == ("avx2" in flags) and f.avx512f == ("avx512f" in flags)
    assert f.vnni == bool({"avx512_vnni", "avx_vnni"} & flags)
