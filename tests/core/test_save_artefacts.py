"""Every backend's artefact: named as the model names things, reloaded by fxpress.load behind the
checked call, and the Inductor package runs without fxpress."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import fxpress
from tests import models

ROOT = Path(__file__).resolve().parents[2]


def _sqnr(ref, out) -> float:
    return float(10 * torch.log10(ref.pow(2).mean() / (ref - out).pow(2).mean().clamp_min(1e-30)))


def _bert_cm():
    transformers = pytest.importorskip("transformers")
    from torch.export import Dim
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    batch, seq = Dim("batch"), Dim("seq", max=64)
    return fxpress.compress(model, _enc(2, 16), fxpress.Quantize(mode="dynamic"),
                            calibration=[_enc(4, 16, seed=2)], dynamic_shapes={"input_ids": {0: batch, 1: seq},
                                            "attention_mask": {0: batch, 1: seq}})


def _enc(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 128, (b, s), generator=g),
            "attention_mask": torch.ones(b, s, dtype=torch.long)}


def test_hf_bert_onnx_is_named_as_the_model_and_reloads_checked(tmp_path):
    onnx = pytest.importorskip("onnx")
    cm = _bert_cm()
    assert [s.shape for s in fxpress.ir.signature.signature(cm.graph_module).inputs] == \
        [("batch", "seq")] * 2  # the user's Dim names, not dim1
    run = fxpress.lower(cm, "onnxruntime")
    path = run.save(tmp_path / "bert.onnx")
    g = onnx.load(str(path)).graph
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(g.input) + list(g.output)}
    assert [v.name for v in g.input] == ["input_ids", "attention_mask"]
    assert [v.name for v in g.output] == ["last_hidden_state", "pooler_output"]
    assert dims == {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "seq"],
                    "last_hidden_state": ["batch", "seq", 32], "pooler_output": ["batch", 32]}
    back = fxpress.load(path)
    other = _enc(3, 7, seed=1)
    out, ref = back(**other), run(**other)
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    assert torch.equal(out.last_hidden_state, ref.last_hidden_state)
    assert torch.equal(out.pooler_output, ref.pooler_output)
    with pytest.raises(fxpress.InputError, match=r"missing input\(s\) \['attention_mask'\]") as e:
        back(input_ids=other["input_ids"])
    assert e.value.input_name == "attention_mask"
    bad = dict(other, input_ids=other["input_ids"].clone())
    bad["input_ids"][1, 2] = 500
    for f in (run, back):  # token ids outside the embedding: named, with the range
        with pytest.raises(fxpress.InputError, match=r"'input_ids' holds 500, outside \[0, 128\)"):
            f(**bad)


def test_wrong_suffix_is_a_recipe_error_naming_the_right_one(tmp_path):
    model, x = models.build("digits_cnn")
    run = fxpress.lower(model, "eager", example_inputs=x)
    with pytest.raises(fxpress.RecipeError, match=r"\.pt2 file"):
        run.save(tmp_path / "m.pt")
    with pytest.raises(fxpress.RecipeError, match=r"\.onnx file"):
        fxpress.lower(model, "onnxruntime", example_inputs=x).save(tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []


def test_eager_pt2_reloads_with_the_models_calling_convention(tmp_path):
    model, x = models.build("digits_cnn")
    cm = fxpress.compress(model, x, fxpress.Quantize(mode="static"), calibration=[x])
    run = fxpress.lower(cm, "eager")
    path = run.save(tmp_path / "m.pt2")
    back = fxpress.load(path)
    x5 = torch.randn(5, 1, 8, 8)
    assert torch.equal(back(x5), run(x5))
    with pytest.raises(fxpress.InputError, match="size 3 in dim 1"):
        back(torch.randn(5, 3, 8, 8))


_NO_FXPRESS = textwrap.dedent("""
    import sys, torch
    pkg, io = sys.argv[1:3]
    x, ref = torch.load(io)
    run = torch._inductor.aoti_load_package(pkg)
    y = run(x)
    y = y[0] if isinstance(y, (list, tuple)) else y
    assert "fxpress" not in sys.modules
    sq = 10 * torch.log10(ref.pow(2).mean() / (ref - y).pow(2).mean().clamp_min(1e-30))
    print(float(sq))
""")


@pytest.mark.slow  # AOTInductor compiles a C++ package (~40 s here)
def test_inductor_package_runs_without_fxpress_at_another_batch(tmp_path):
    model, x = models.build("digits_cnn")
    cm = fxpress.compress(model, x, fxpress.Quantize(mode="static"), calibration=[x])
    run = fxpress.lower(cm, "inductor")
    path = run.save(tmp_path / "m.pt2")
    x7 = torch.randn(7, 1, 8, 8)
    ref = run(x7)
    torch.save((x7, ref), tmp_path / "io.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", _NO_FXPRESS, str(path), str(tmp_path / "io.pt")],
                       capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    assert float(p.stdout.strip().splitlines()[-1]) > 40
    back = fxpress.load(path)  # and through fxpress: the model's calling convention, checked
    assert _sqnr(ref, back(x7)) > 40
    with pytest.raises(fxpress.InputError, match="dtype float64"):
        back(x7.double())
