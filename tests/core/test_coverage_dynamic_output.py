"""Dynamic-output ops (boolean-mask indexing, nonzero) are refused with a typed CaptureError that
names the op and the user's source line, not an untyped RuntimeError from shape propagation."""
from __future__ import annotations

import pytest
import torch

import fxpress


class _Masked(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        return y[y > 0].sum()  # the line the error must name


class _NonZero(torch.nn.Module):
    def forward(self, x):
        return torch.nonzero(x > 0).float().sum()


def test_boolean_mask_is_a_capture_error_naming_op_and_line():
    with pytest.raises(fxpress.CaptureError, match=r"aten\.nonzero") as e:
        fxpress.compress(_Masked(), (torch.randn(2, 4),), [fxpress.Quantize(mode="dynamic")])
    assert e.value.op == "aten.nonzero.default"
    assert e.value.source is not None and "test_coverage_dynamic_output.py" in e.value.source
    assert "y[y > 0]" in e.value.source
    assert "boolean-mask" in str(e.value)


def test_nonzero_is_a_capture_error():
    with pytest.raises(fxpress.CaptureError, match=r"nonzero") as e:
        fxpress.capture(_NonZero(), (torch.randn(2, 4),))
    assert "torch.nonzero(x > 0)" in (e.value.source or "")
