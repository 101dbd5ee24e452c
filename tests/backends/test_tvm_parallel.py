"""TVM CPU kernels run their parallel loops through the chunked launcher (backends/tvm/parallel.py).

Structure: the compiled library's launch pointer is ours and every parallel loop goes through
it; numerics: outputs are bit-identical to TVM's own static split of the same executable.
"""
from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn as nn

import fxpress

tvm = pytest.importorskip("tvm")
from fxpress.backends.tvm import compile_tvm, load  # noqa: E402
from fxpress.backends.tvm import parallel  # noqa: E402
from fxpress.backends.tvm.build import _VMRunner  # noqa: E402

needs_cc = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")


def _net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                      nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                      nn.Flatten(), nn.Linear(32, 10)).eval()
    return m, torch.randn(1, 3, 32, 32)


@needs_cc
def test_parallel_loops_take_chunks_and_match_the_static_split(tmp_path):
    m, x = _net()
    gm = fxpress.capture(m, (x,))
    run = compile_tvm(gm, (x,))
    chunks = parallel.CHUNKS_PER_THREAD * parallel._threads()
    assert run.report["parallel"] == f"dynamic ({chunks} chunks per parallel loop)"
    before = parallel.launches()
    y = run(x)
    launched = parallel.launches() - before
    assert launched >= 3, f"{launched} parallel loops went through the chunked launcher"  # 2 convs + more
    static = _VMRunner(run.executable, tvm.cpu(0), "cpu").run_flat([x])[0]  # TVM's own launcher
    assert torch.equal(y, static)
    with torch.no_grad():
        torch.testing.assert_close(y, gm(x), atol=1e-4, rtol=0)

    path = run.save(tmp_path / "net.so")
    loaded = load(path)
    assert loaded.parallel == run.report["parallel"]
    before = parallel.launches()
    assert torch.equal(loaded(x), y)
    assert parallel.launches() - before == launched


def test_static_split_when_asked_or_without_a_compiler(monkeypatch, tmp_path):
    monkeypatch.setenv("FXPRESS_TVM_PARALLEL", "static")
    assert parallel._make_launcher() == (None, "static (FXPRESS_TVM_PARALLEL=static)")
    monkeypatch.delenv("FXPRESS_TVM_PARALLEL")
    monkeypatch.setenv("FXPRESS_TVM_CACHE", str(tmp_path))  # no launcher built there yet
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    addr, how = parallel._make_launcher()
    assert addr is None and how.startswith("static (dynamic launcher unavailable:") and "no-such-cc" in how
    assert not list(tmp_path.rglob("*.so"))  # nothing half-written left behind
