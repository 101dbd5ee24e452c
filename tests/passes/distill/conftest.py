"""One intra-op thread for the distillation tests (restored after each test).

The networks here are tiny (8x8 digits, 6x6 synthetic images): a second thread only adds
hand-off cost, and on a busy 2-core box it made these tests several times slower.
"""
from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
