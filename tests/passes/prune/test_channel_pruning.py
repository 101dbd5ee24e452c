"""ChannelPruning: fuzzed graphs stay consistent; model zoo prunes, exports to ONNX, runs in ORT."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import fxpress
from fxpress.errors import RecipeError
from fxpress.passes.prune.schedule import step_ratios
from tests import fuzz, models
from tests.passes.prune._util import plan_and_prune, reduces_over_channels, zeroed_copy

_SEEDS = (3, 5, 11, 21, 23, 70)  # cnn (residual, dense, split, depthwise, grouped), mlp, transformer


@pytest.mark.parametrize("seed", _SEEDS)
def test_fuzzed_graphs_prune_consistently(seed):
    model, inputs = fuzz.random_net(seed)
    base = fxpress.capture(model, inputs)
    y0 = base(*inputs)
    for ratio in (0.3, 0.5, 0.7):
        gm = copy.deepcopy(base)
        dep, pruned = plan_and_prune(gm, inputs, ratio)
        y = gm(*inputs)
        assert y.shape == y0.shape
        for g in dep.groups:  # never a whole group, and records are well formed
            assert not pruned[g.comps].all()
            assert g.record(tuple(np.flatnonzero(pruned[g.comps]).tolist())).validate() == []
        if dep.groups and ratio == 0.5:
            assert pruned.any()
        if not reduces_over_channels(base):
            # removing the units == zeroing every parameter slice they own (exact to fp error)
            torch.testing.assert_close(y, zeroed_copy(base, dep, pruned)(*inputs), atol=1e-4, rtol=1e-4)


def _ort_run(cm, inputs, tmp_path):
    import onnxruntime as ort
    prog = torch.onnx.export(cm, inputs, dynamo=True, verbose=False)
    path = tmp_path / "m.onnx"
    prog.save(str(path))
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(sess.get_inputs(), inputs)}
    return torch.from_numpy(sess.run(None, feeds)[0])


@pytest.mark.parametrize("name", ["resnet18", "vit",
                                  pytest.param("mobilenet_v2", marks=pytest.mark.slow),
                                  pytest.param("densenet", marks=pytest.mark.slow),
                                  pytest.param("bert", marks=pytest.mark.slow)])
def test_model_zoo_prunes_exports_and_runs_in_ort(name, tmp_path):
    model, inputs = models.build(name)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cm = fxpress.compress(model, inputs, fxpress.ChannelPruning(ratio=0.5, round_to=4))
    st = cm.report["prune_channels"]
    assert st["macs_after"] < st["macs_before"] and st["channels_removed"] > 0
    assert st["unresolved"] == []
    y0, y = model(*inputs), cm(*inputs)
    assert y.shape == y0.shape
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # user model untouched
    for mod in cm.graph_module.modules():  # round_to=4 on every pruned producer
        w = getattr(mod, "weight", None)
        if isinstance(mod, torch.nn.Module) and isinstance(w, torch.Tensor) and w.dim() == 4 and w.shape[1] > 1:
            assert w.shape[0] % 4 == 0 or w.shape[0] == 10
    y_ort = _ort_run(cm, inputs, tmp_path)
    torch.testing.assert_close(y_ort, y.detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bad", [0, 1, 1.5, -0.1, "half"])
def test_ratio_outside_open_interval_is_recipe_error(bad):
    with pytest.raises(RecipeError) as e:
        fxpress.ChannelPruning(ratio=bad)
    assert e.value.field == "ratio"


def test_other_bad_options_name_the_field():
    for kw, field in [({"importance": "l3"}, "importance"), ({"scope": "world"}, "scope"),
                      ({"round_to": 0}, "round_to"), ({"steps": 3}, "steps"),
                      ({"caps": {"fc": 1.2}}, "caps['fc']")]:
        with pytest.raises(RecipeError) as e:
            fxpress.ChannelPruning(**kw)
        assert e.value.field == field
    r = fxpress.Recipe.from_list([{"channel_pruning": {"ratio": 0.3, "exclude": ["layer1"]}}])
    assert r.entries[0].exclude == ("layer1",)


@pytest.fixture(scope="module")
def r18():
    model, inputs = models.build("resnet18")
    return model, inputs, fxpress.capture(model, inputs)


def _prune(r18, config, **ctx):
    """Run the ChannelPruning passes on a copy of the captured IR (one capture per module)."""
    from fxpress.passes.base import PassContext
    from fxpress.passes.manager import PassManager
    model, inputs, gm = r18
    pc = PassContext(example_inputs=inputs, **ctx)
    gm, report = PassManager(config.passes()).run(copy.deepcopy(gm), pc)
    return gm, report


@pytest.mark.parametrize("importance", ["l1", "bn_scale", "taylor", "random"])
def test_importances_local_scope(r18, importance):
    model, inputs, _ = r18
    gm, _ = _prune(r18, fxpress.ChannelPruning(ratio=0.5, importance=importance, scope="local",
                                               round_to=1), calibration=[inputs, inputs])
    assert gm.get_submodule("layer1.0.conv1").weight.shape[0] == 4   # local: half of 8 in each group
    assert gm.get_submodule("layer4.1.conv1").weight.shape[0] == 32
    assert gm(*inputs).shape == (2, 10)


def test_exclude_caps_and_never_zero(r18):
    model, inputs, _ = r18
    gm, report = _prune(r18, fxpress.ChannelPruning(
        ratio=0.95, scope="local", round_to=8, max_ratio=0.99, exclude=("layer2.0.conv1",),
        caps={"layer3.*": 0.25}))
    assert gm.get_submodule("layer2.0.conv1").weight.shape == model.layer2[0].conv1.weight.shape  # whole
    assert gm.get_submodule("layer3.0.conv1").weight.shape[0] == 24   # cap 25% of 32 -> 24 kept
    assert gm.get_submodule("layer4.0.conv1").weight.shape[0] == 8    # 95% of 64 -> rounded up to 8
    assert "excluded" in report.sections["channel_pruning"]


def test_iterative_schedule_calls_finetune_each_step(r18):
    assert step_ratios(0.5, 4, "linear") == [0.125, 0.25, 0.375, 0.5]
    cubic = step_ratios(0.5, 3, "cubic")
    assert cubic[-1] == pytest.approx(0.5) and cubic[0] > 0.5 / 3
    seen = []

    def finetune(gm):
        seen.append(gm.get_submodule("layer4.0.conv1").weight.shape[0])
    _, report = _prune(r18, fxpress.ChannelPruning(
        ratio=0.5, scope="local", round_to=1, schedule="iterative", steps=3, curve="cubic"),
        finetune=finetune)
    assert len(seen) == 3 and seen[0] > seen[1] > seen[2] == 32
    assert report["prune_channels"]["steps"] == 3


def test_verify_speed_rolls_back_groups_that_got_slower(r18):
    model, inputs, gm = r18
    from fxpress.passes.analysis.dependency import analyze
    from fxpress.passes.prune.importance import choose_units, unit_scores
    from fxpress.passes.prune.speed import check_speed
    dep = analyze(gm)
    plan = choose_units(dep, unit_scores(gm, dep, "l2"), ratio=0.5, scope="local")
    calls = []

    def timer(ops, backend):  # pretend ops whose weight went 8 -> 4 channels got slower
        calls.append(ops)
        w = [o[1][1] for o in ops if len(o[1]) > 1 and isinstance(o[1][1], torch.Tensor)]
        if any(t.shape[0] == 4 for t in w):
            return 1.0
        return 0.5 + sum(t.numel() for t in w) * 1e-9
    kept, rows = check_speed(gm, dep, plan, example_inputs=inputs, timer=timer)
    rolled = {r["group"] for r in rows if not r["kept"]}
    assert rolled and all(dep.groups[g].name not in rolled for g in kept)
    assert any("layer1" in r for r in rolled)
    # and with real eager timings end to end
    _, report = _prune(r18, fxpress.ChannelPruning(ratio=0.5, verify_speed=True))
    assert "speed " in report.sections["channel_pruning"]
    assert "speed_rollbacks" in report["prune_channels"]
