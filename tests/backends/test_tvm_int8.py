"""TVM int8 convs and dense on x86 without AVX-512: the 256-bit dot-product intrinsics (intrin.py).

On a simulated AVX2-only host the int8 conv kernels are tensorized with vpmaddubsw +
vpmaddwd where the weights cannot saturate the int16 pair sums, keep LLVM's exact int32
code where they could, and use vpdpbusd on a simulated AVX-VNNI host. Numerics: within
one quantization step of the IR (integer accumulation is exact; float rescale rounding).
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

import fxpress
from fxpress import hw

tvm = pytest.importorskip("tvm")
from fxpress.backends.tvm import compile_tvm
from fxpress.backends.tvm.intrin import AVX2_DOT_8x4, VNNI_DOT_8x4, VNNI_DOT_16x4, pairs_fit

AVX2 = {"sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "popcnt", "movbe"}
N_TENSORIZABLE = 3  # every conv: the 3-channel stem is padded to 4 input channels (zero weights)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 32, 3, padding=1)
        self.c2 = nn.Conv2d(32, 16, 1)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(torch.relu(self.stem(x)))))


def _int8_graph(seven_bit: bool):
    from tests.backends.test_tvm import _pt2e_int8
    torch.manual_seed(0)
    x = (torch.randn(1, 3, 8, 8),)
    q = _pt2e_int8(fxpress.capture(Net().eval(), x), x)
    for node in q.graph.nodes:
        if node.op != "get_attr":
            continue
        owner, _, attr = node.target.rpartition(".")
        t = getattr(q.get_submodule(owner) if owner else q, attr)
        if t.dtype == torch.int8 and t.dim() == 4:
            if seven_bit:
                t.copy_(t.clamp(-64, 64))  # the reduce-range form: pair sums <= 128
            else:
                t[:, 0:2] = 127  # input channels 0 and 1: the pair 127 + 127 could saturate
    return q, x


def _max_step(gm) -> float:
    qd = torch.ops.quantized_decomposed
    return max(n.args[1] for n in gm.graph.nodes if n.target is qd.quantize_per_tensor.default)


def _compile(q, x, flags):
    with hw.simulate(flags=flags, cpu_name="znver3"):
        run = compile_tvm(q, x)
    asm = run.executable.mod.imports[0].inspect_source("asm")
    ops = {op: len(re.findall(rf"\b{op}\b", asm)) for op in ("vpmaddubsw", "vpmaddwd", "vpdpbusd")}
    return run, ops, asm


def _within_one_step(run, q, x):
    with torch.no_grad():
        diff = (run(*x) - q(*x)).abs()
    assert diff.max().item() <= _max_step(q), diff.max()


def test_avx2_host_tensorizes_int8_convs_with_pmaddubsw_and_matches_ir():
    q, x = _int8_graph(seven_bit=True)
    run, ops, asm = _compile(q, x, AVX2)
    kinds = run.report["schedules"]
    assert kinds.get(f"int8_intrinsic:{AVX2_DOT_8x4}") == N_TENSORIZABLE, kinds
    assert ops["vpmaddubsw"] > 0 and ops["vpmaddwd"] > 0 and ops["vpdpbusd"] == 0, ops
    assert "%zmm" not in asm
    _within_one_step(run, q, x)


def test_avx2_host_keeps_exact_code_where_weights_could_saturate():
    q, x = _int8_graph(seven_bit=False)
    run, ops, _ = _compile(q, x, AVX2)
    assert not any(k.startswith("int8_intrinsic") for k in run.report["schedules"]), run.report["schedules"]
    assert ops["vpmaddubsw"] == 0, ops
    _within_one_step(run, q, x)


def test_avx_vnni_host_uses_vpdpbusd_for_any_weights():
    q, x = _int8_graph(seven_bit=False)
    run, ops, _ = _compile(q, x, AVX2 | {"avx_vnni"})
    assert run.report["schedules"].get(f"int8_intrinsic:{VNNI_DOT_8x4}") == N_TENSORIZABLE
    assert ops["vpdpbusd"] > 0 and ops["vpmaddubsw"] == 0, ops
    _within_one_step(run, q, x)


AVX512_VNNI = AVX2 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512cd", "avx512_vnni"}


@pytest.mark.skipif(not {"avx512f", "avx512_vnni"} <= hw.host().flags, reason="needs AVX-512 VNNI to run")
def test_avx512_vnni_host_uses_zmm_vpdpbusd():
    q, x = _int8_graph(seven_bit=False)
    run, ops, asm = _compile(q, x, AVX512_VNNI)
    kinds = run.report["schedules"]
    # stem 3->16 and c2 32->16 fit a 16-channel zmm tile; all three have 16 | out channels
    assert kinds.get(f"int8_intrinsic:{VNNI_DOT_16x4}") == N_TENSORIZABLE, kinds
    assert re.search(r"vpdpbusd\s+%zmm", asm) and ops["vpmaddubsw"] == 0, ops
    _within_one_step(run, q, x)


def test_avx2_host_int8_dense_uses_the_intrinsic_and_matches_ir():
    from tests.backends.test_tvm import _pt2e_int8
    torch.manual_seed(0)
    x = (torch.randn(4, 32),)
    q = _pt2e_int8(fxpress.capture(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval(), x), x)
    for node in q.graph.nodes:
        if node.op == "get_attr":
            owner, _, attr = node.target.rpartition(".")
            t = getattr(q.get_submodule(owner) if owner else q, attr)
            if t.dtype == torch.int8:
                t.copy_(t.clamp(-64, 64))
    run, ops, _ = _compile(q, x, AVX2)
    kinds = run.report["schedules"]
    assert kinds["dense_template"] == 2 and kinds.get(f"int8_intrinsic:{AVX2_DOT_8x4}") == 2, kinds
    assert ops["vpmaddubsw"] > 0 and ops["vpmaddwd"] > 0, ops
    _within_one_step(run, q, x)


def test_pairs_fit_checks_adjacent_pairs_along_the_axis():
    w = np.zeros((3, 3, 8, 4), dtype=np.int8)
    w[:, :, 0], w[:, :, 1] = 64, -64
    assert pairs_fit(w, axis=2)
    w[1, 1, 2], w[1, 1, 3] = 100, -29
    assert not pairs_fit(w, axis=2)
    assert not pairs_fit(np.zeros((3,), dtype=np.int8), axis=0)  # odd length: no pairing


def test_tuned_int8_convs_keep_the_intrinsic(tmp_path):
    """Tuning measures the tensorized template candidates; the cached records replay them."""
    from fxpress.backends.tvm import TuneOptions
    q, x = _int8_graph(seven_bit=True)
    opts = TuneOptions(trials=12, trials_per_round=4, trials_per_task=2, time_budget_s=150, population=16,
                       cache_dir=str(tmp_path), progress=False)
    with hw.simulate(flags=AVX2, cpu_name="znver3"):
        first = compile_tvm(q, x, tune=opts)
        again = compile_tvm(q, x, tune=opts)
    t = first.report["tuning"]
    assert t["records"] >= N_TENSORIZABLE and t["failed"] < t["measured"], t
    assert t["trials"] <= 2 * t["tasks"], t  # the per-kernel cap held
    assert again.report["tuning"]["cached"] and again.report["schedules"]["tuned"] >= N_TENSORIZABLE
    asm = again.executable.mod.imports[0].inspect_source("asm")
    assert re.search(r"\bvpmaddubsw\b", asm) and "%zmm" not in asm
    _within_one_step(again, q, x)


def test_int8_graph_stays_nhwc_between_convs():
    """Quantize/pad lowerings ConvertLayout can move through: no NCHW<->NHWC transposes
    between int8 convs (relax clip and pad have no layout rule; each used to add a pair)."""
    from fxpress.backends.base import flat_graph
    from fxpress.backends.tvm.build import host_target, lower_relax
    from fxpress.backends.tvm.convert import to_relax
    q, x = _int8_graph(seven_bit=True)
    mod = lower_relax(to_relax(flat_graph(q), x).mod, host_target())
    names = [gv.name_hint for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)]
    convs = [n for n in names if "conv2d" in n]
    assert len(convs) == 3 and not any("transpose" in n for n in convs), names
    # the graph input's quantize + pad + to-NHWC, and the output back to NCHW: nothing else
    assert len(names) == 5 and sum("transpose" in n for n in names) == 2, names
