"""compress / lower / Recipe: the user's model is never touched; the result is an nn.Module."""
from __future__ import annotations

import copy

import pytest
import torch

import fxpress
from fxpress.passes.cleanup import ConstantFold, DeadCodeElimination, FoldBatchNorm
from tests import models

aten = torch.ops.aten


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_compress_leaves_user_model_bit_identical():
    model = models.resnet18(width=8, num_classes=10)
    model.train()  # a model mid-training: compress must not flip its mode either
    x = models.example_inputs("resnet18")
    before = _snapshot(model)
    ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}
    cm = fxpress.compress(model, x, [FoldBatchNorm(), ConstantFold(), DeadCodeElimination()])
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:  # bit-identical values, same storage
        assert torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype, k
        assert after[k].data_ptr() == ptrs[k], k
    assert model.training and all(m.training for m in model.modules())
    assert not any(p.data_ptr() in set(ptrs.values()) for p in cm.parameters())
    ref = copy.deepcopy(model).eval()
    with torch.no_grad():
        torch.testing.assert_close(cm(*x), ref(*x), atol=1e-5, rtol=1e-5)


def test_compressed_model_is_finetunable_with_a_plain_optimizer():
    model = models.digits_cnn()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    with pytest.raises(fxpress.InputError, match=r"size 16 in dim 0 .* expected 2 .*static"):
        fxpress.compress(model, x[:2], [FoldBatchNorm()], static_shapes=True)(x)
    assert fxpress.compress(model, x[:2], [FoldBatchNorm()])(x).shape == (16, 10)  # batch dynamic
    batch = torch.export.Dim("batch", min=1, max=1024)
    cm = fxpress.compress(model, x[:2], [FoldBatchNorm()], dynamic_shapes=({0: batch},))
    assert isinstance(cm, torch.nn.Module) and isinstance(cm.graph_module, torch.fx.GraphModule)
    before_user = _snapshot(model)
    params = [p for p in cm.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.SGD(params, lr=0.1)
    losses = []
    cm.train()  # a user's ordinary loop calls train(); export's modules alone would refuse it
    assert cm.training and all(m.training for m in cm.modules())
    for _ in range(5):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(cm(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert not cm.eval().training
    assert all(torch.equal(before_user[k], v) for k, v in model.state_dict().items())
    # the report: per-pass stats, indexable by pass name
    assert cm.report["fold_bn"]["folded"] == 2 and cm.report.passes[0].name == "fold_bn"
    assert cm.recipe == fxpress.Recipe([FoldBatchNorm()])


def test_lower_eager_accepts_compressed_graph_and_plain_module(tmp_path):
    model, inputs = models.build("densenet")
    with torch.no_grad():
        ref = model(*inputs)
    cm = fxpress.compress(model, inputs, [FoldBatchNorm(), DeadCodeElimination()])
    for thing in (cm, cm.graph_module, model):
        run = fxpress.lower(thing, backend="eager", example_inputs=inputs)
        torch.testing.assert_close(run(*inputs), ref, atol=1e-5, rtol=1e-5)
    run = fxpress.lower(cm, backend="eager")  # example inputs default to the ones compress saw
    path = run.save(tmp_path / "densenet.pt2")
    loaded = torch.export.load(path).module()
    torch.testing.assert_close(loaded(*inputs), ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(fxpress.InputError, match="needs example_inputs"):
        fxpress.lower(model, backend="eager")


def test_recipe_yaml_round_trip_and_forms(tmp_path):
    recipe = fxpress.Recipe([FoldBatchNorm(), ConstantFold(fold_dequantize=True), DeadCodeElimination()])
    path = recipe.save(tmp_path / "sub" / "r.yaml")
    text = path.read_text()
    assert text.startswith("passes:") and "fold_dequantize: true" in text
    assert fxpress.Recipe.load(path) == recipe
    assert fxpress.Recipe.coerce(str(path)) == recipe
    assert fxpress.Recipe.coerce(["fold_bn", {"constant_fold": {"fold_dequantize": True}}, "dce"]) == recipe
    assert fxpress.Recipe.coerce(FoldBatchNorm()) == fxpress.Recipe([FoldBatchNorm()])
    assert len(fxpress.Recipe.coerce(None)) == 0
    (tmp_path / "list.yaml").write_text("- fold_bn\n- {name: dce}\n")
    assert [e.name for e in fxpress.Recipe.load(tmp_path / "list.yaml")] == ["fold_bn", "dce"]
    (tmp_path / "bad.yaml").write_text("passes: {fold_bn: 1}\n")
    with pytest.raises(fxpress.RecipeError, match="a recipe is a list"):
        fxpress.Recipe.load(tmp_path / "bad.yaml")
    with pytest.raises(fxpress.RecipeError, match="must be a mapping"):
        fxpress.Recipe.coerce([{"fold_bn": 3}])
    with pytest.raises(fxpress.RecipeError, match="entry 0 is a str"):
        fxpress.Recipe(["fold_bn"])
    # a compress run with a YAML path gives the same IR as with the objects
    model, x = models.digits_cnn(), torch.randn(2, 1, 8, 8)
    a = fxpress.compress(model, x, str(path))
    b = fxpress.compress(model, x, recipe)
    torch.testing.assert_close(a(x), b(x), atol=0, rtol=0)
