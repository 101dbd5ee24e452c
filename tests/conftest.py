"""Shared pytest set-up: deterministic seeds, a thread count that suits a 2-core CI box."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

# `from tests.models import ...` works however pytest was started (rootdir on sys.path).
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Latency-service timings (and other caches) of a test run stay in the run, not in ~/.cache.
if "FXPRESS_CACHE" not in os.environ:
    import tempfile
    os.environ["FXPRESS_CACHE"] = tempfile.mkdtemp(prefix="fxpress-test-cache-")

# Inductor's C++ wrapper (the default for static CPU compiles) costs ~8 s of C++ compile per
# model; the suite compiles dozens, so it runs the Python wrapper unless a test asks for C++
# (tests/backends/test_inductor.py::test_cpp_wrapper_*). An explicit setting wins.
os.environ.setdefault("FXPRESS_INDUCTOR_WRAPPER", "python")

# Two threads: CI has 2 cores; more threads only add contention between tests' tensors.
torch.set_num_threads(int(os.environ.get("FXPRESS_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state (order-independent results)."""
    torch.manual_seed(0)
    yield
