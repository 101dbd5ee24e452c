"""Bad input gets a typed error that names what was wrong (op + line, input, field)."""
from __future__ import annotations

import pytest
import torch

import fxpress
from fxpress.recipe import known_entries
from tests import models


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)

    def forward(self, x):
        y = self.fc(x)
        if y.sum() > 0:  # a Python branch on a tensor value: not capturable
            return y * 2
        return y


class _TwoInputs(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(6, 3)

    def forward(self, x, extra):
        return self.a(x) + self.b(extra)


def test_untraceable_model_names_op_and_source_line_and_suggests_fx():
    with pytest.raises(fxpress.CaptureError) as ei:
        fxpress.capture(_DataDependent().eval(), (torch.randn(2, 4),))
    e = ei.value
    assert e.op == "aten.item.default"  # the tensor -> Python value conversion the branch needs
    assert e.source is not None and __file__ in e.source
    assert "if y.sum() > 0" in e.source
    msg = str(e)
    assert 'frontend="fx"' in msg and "aten.item.default" in msg and "test_errors.py:" in msg
    assert "Traceback" not in msg and len(msg.splitlines()) <= 6


def test_fx_frontend_failure_is_a_capture_error_too():
    with pytest.raises(fxpress.CaptureError) as ei:
        fxpress.capture(_DataDependent().eval(), (torch.randn(2, 4),), frontend="fx")
    assert "if y.sum() > 0" in ei.value.source and ei.value.frontend == "fx"


def test_misshapen_input_names_the_input_and_the_module():
    model = _TwoInputs().eval()
    with pytest.raises(fxpress.InputError) as ei:
        fxpress.capture(model, (torch.randn(2, 4), torch.randn(2, 5)))
    e = ei.value
    assert (e.index, e.input_name) == (1, "extra")
    assert "input 1 (extra: tensor[2, 5] float32)" in str(e) and "'b'" in str(e)
    assert "input 0" not in str(e).splitlines()[0]


def test_wrong_input_count_and_dtype():
    with pytest.raises(fxpress.InputError, match=r"forward\(x, extra\): got 1 positional input"):
        fxpress.capture(_TwoInputs().eval(), (torch.randn(2, 4),))
    model, (ids, mask) = models.build("bert")
    with pytest.raises(fxpress.InputError) as ei:
        fxpress.capture(model, (ids.float(), mask))
    assert ei.value.input_name == "input_ids" and "bert.embeddings.word_embeddings" in str(ei.value)
    with pytest.raises(fxpress.InputError, match="input 0"):
        fxpress.capture(models.digits_cnn(), (torch.randn(2, 1, 16, 16),))  # flatten->fc1 mismatch


def test_unknown_recipe_entry_lists_known_passes(tmp_path):
    with pytest.raises(fxpress.RecipeError) as ei:
        fxpress.Recipe.coerce([{"fold_batchnorm": {}}])
    msg = str(ei.value)
    assert "fold_batchnorm" in msg
    for name in ("fold_bn", "dce", "constant_fold"):
        assert name in msg
    assert set(ei.value.accepted) == set(known_entries())
    path = tmp_path / "r.yaml"
    path.write_text("passes:\n  - fold_bn\n  - no_such_pass: {ratio: 0.5}\n")
    with pytest.raises(fxpress.RecipeError, match=r"unknown recipe entry 'no_such_pass' \(item 1\)"):
        fxpress.compress(models.digits_cnn(), torch.randn(1, 1, 8, 8), str(path))


def test_bad_recipe_option_and_files():
    with pytest.raises(fxpress.RecipeError, match="unknown option.*'fold_dequant'.*accepted: fold_dequantize"):
        fxpress.Recipe.coerce([{"constant_fold": {"fold_dequant": True}}])
    with pytest.raises(fxpress.RecipeError, match="not found"):
        fxpress.Recipe.load("/nonexistent/recipe.yaml")
    with pytest.raises(fxpress.RecipeError, match="unknown frontend.*accepted: export, fx"):
        fxpress.capture(models.digits_cnn(), torch.randn(1, 1, 8, 8), frontend="jit")
    with pytest.raises(fxpress.RecipeError, match="unknown backend"):
        fxpress.lower(models.digits_cnn(), backend="nope", example_inputs=torch.randn(1, 1, 8, 8))
    with pytest.raises(fxpress.CaptureError, match="needs an nn.Module"):
        fxpress.capture(lambda x: x, torch.randn(1))
