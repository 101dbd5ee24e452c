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

# Two threads: CI has 2 cores; more threads only add contention between tests' tensors.
torch.set_num_threads(int(os.environ.get("FXPRESS_TEST_THREADS", "2")))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same global RNG state (order-independent results)."""
    torch.manual_seed(0)
    yield
