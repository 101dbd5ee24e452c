"""Each distillation mode on tiny synthetic problems, the Distill recipe entry, and its validation."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpress
from fxpress.errors import CalibrationError, InputError, PassError, RecipeError
from fxpress.passes.distill import Distill, Schedule, distill_offline, distill_online, distill_self
from fxpress.passes.distill.losses import kd_loss
from fxpress.passes.distill.taps import view


class Tiny(nn.Module):
    def __init__(self, c1: int = 8, c2: int = 8):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, c1, 3, padding=1), nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(c2, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.conv2(x))
        return self.fc(x.mean((2, 3)))


def _data(n_batches: int = 6, bs: int = 16, seed: int = 0, labels: bool = True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        x = torch.randn(bs, 1, 6, 6, generator=g)
        y = (x[:, 0, :3].mean((1, 2)) > 0).long() + (x[:, 0, 3:].mean((1, 2)) > 0).long()
        out.append((x, y) if labels else (x,))
    return out


def _kd_to(student, teacher, data) -> float:
    with torch.no_grad():
        return sum(float(kd_loss(view(student)(x) if isinstance(student, torch.fx.GraphModule)
                                 else student(x), teacher(x), 1.0)) for x, *_ in data) / len(data)


def test_offline_brings_student_towards_frozen_teacher():
    torch.manual_seed(0)
    teacher = Tiny(8, 8).eval()
    t_state = copy.deepcopy(teacher.state_dict())
    student = fxpress.capture(Tiny(4, 4).eval(), (torch.randn(2, 1, 6, 6),))
    data = _data(labels=False)
    before = _kd_to(student, teacher, data)
    stats = distill_offline(student, teacher, data, schedule=Schedule(epochs=4, lr=1e-2),
                            hints=["conv2"], attention=["bn1"])
    after = _kd_to(student, teacher, data)
    assert after < 0.5 * before, (before, after)
    h = stats["history"]
    assert h[-1]["hint"] < h[0]["hint"] and h[-1]["attention"] < h[0]["attention"]
    assert stats["adapter_init"] == {"conv2": "random"}  # 4 -> 8 channels, no pruning record
    for k, v in teacher.state_dict().items():  # the teacher is frozen
        assert torch.equal(v, t_state[k])


def test_offline_hint_adapter_starts_as_selection_of_pruned_channels():
    """A student pruned by fxpress.ChannelPruning carries ChannelGroup records: the hint adapter
    starts as their exact channel-selection matrix."""
    torch.manual_seed(0)
    teacher = Tiny(16, 16).eval()
    x = torch.randn(4, 1, 6, 6)
    pruned = fxpress.compress(teacher, (x,), [fxpress.ChannelPruning(ratio=0.5, round_to=1)])
    gm = pruned.graph_module
    assert gm.get_parameter("conv1.weight").shape[0] < 16
    stats = distill_offline(gm, teacher, _data(2), schedule=Schedule(epochs=1, lr=1e-3),
                            hints=["conv1"])
    assert stats["adapter_init"] == {"conv1": "selection"}


def test_offline_plain_when_alpha_zero_uses_labels_only():
    torch.manual_seed(0)
    teacher, student = Tiny().eval(), Tiny(4, 4)
    stats = distill_offline(student, teacher, _data(), schedule=Schedule(epochs=2, lr=1e-2), alpha=0.0)
    assert "ce" in stats["history"][0] and stats["history"][-1]["ce"] < stats["history"][0]["ce"]


def test_online_peers_learn_and_agree():
    torch.manual_seed(0)
    a, b = Tiny(4, 4).eval(), Tiny(4, 4).eval()
    data = _data(8)
    stats = distill_online([a, b], data, schedule=Schedule(epochs=5, lr=1e-2))
    h = stats["history"]
    assert h[-1]["ce0"] < h[0]["ce0"] and h[-1]["ce1"] < h[0]["ce1"]
    assert not a.training and not b.training  # modes restored
    with pytest.raises(InputError):
        distill_online([a], data)
    with pytest.raises(CalibrationError, match="labelled"):
        distill_online([a, b], _data(labels=False))


def test_self_distillation_trains_exit_and_leaves_no_heads_behind():
    torch.manual_seed(0)
    model = Tiny(8, 8).eval()
    gm = fxpress.capture(model, (torch.randn(2, 1, 6, 6),))
    nodes_before = [n.format_node() for n in gm.graph.nodes]
    data = _data(8)
    res = distill_self(gm, data, exits=["bn1"], schedule=Schedule(epochs=6, lr=1e-2))
    h = res.history
    assert h[-1]["ce_bn1"] < 0.8 * h[0]["ce_bn1"]
    logits = res.exit_logits(data[0][0])
    assert set(logits) == {"bn1", "final"} and logits["bn1"].shape == (16, 3)
    # the heads live outside the graph: the trained graph has exactly its old nodes
    assert [n.format_node() for n in gm.graph.nodes] == nodes_before
    assert not any("head" in name for name, _ in gm.named_parameters())


def test_distill_recipe_entry_in_compress_pipeline():
    torch.manual_seed(0)
    model = Tiny(16, 16).eval()
    ref = copy.deepcopy(model.state_dict())
    x = torch.randn(4, 1, 6, 6)
    data = _data(6)
    cm = fxpress.compress(model, (x,), [fxpress.ChannelPruning(ratio=0.5, round_to=1),
                                        fxpress.Distill(mode="offline", epochs=3, lr=1e-2)],
                          calibration=data)
    st = cm.report["distill"]
    assert st["loss_last_epoch"] < st["loss_first_epoch"]
    assert cm.report.sections["distill"][0]["mode"] == "offline"
    for k, v in model.state_dict().items():  # the user's model is never modified
        assert torch.equal(v, ref[k])
    for mode in ("online", "self"):
        cm2 = fxpress.compress(model, (x,), [fxpress.Distill(mode=mode, epochs=1, lr=1e-3)],
                               calibration=data)
        assert cm2.report["distill"]["mode"] == mode


def test_finetune_factories_plug_into_pruning_schedule():
    torch.manual_seed(0)
    teacher = Tiny(16, 16).eval()
    calls = []
    ft = fxpress.distill.offline(teacher, _data(4), epochs=1, lr=1e-3)

    def counting(gm):
        calls.append(gm.get_parameter("conv1.weight").shape[0])
        return ft(gm)

    fxpress.compress(teacher, (torch.randn(4, 1, 6, 6),),
                     [fxpress.ChannelPruning(ratio=0.5, schedule="iterative", steps=2, round_to=1)],
                     finetune=counting)
    # called after each pruning step, on the shrinking graph
    assert len(calls) == 2 and 16 > calls[0] > calls[1]


def test_config_validation_names_the_field():
    with pytest.raises(RecipeError) as e:
        Distill(mode="teacherless")
    assert e.value.field == "mode"
    with pytest.raises(RecipeError) as e:
        Distill(epochs=0)
    assert e.value.field == "epochs"
    with pytest.raises(RecipeError) as e:
        Distill(mode="online", hints=["conv1"])
    assert e.value.field == "mode"
    with pytest.raises(RecipeError) as e:
        Distill(peers=1)
    assert e.value.field == "peers"
    r = fxpress.Recipe([Distill(mode="offline", hints=["conv1", "conv2=block"])])
    assert fxpress.Recipe.from_list(r.to_list()) == r  # YAML-ready round trip (lists -> tuples)
    with pytest.raises(PassError) as e:
        fxpress.compress(Tiny().eval(), (torch.randn(2, 1, 6, 6),), [Distill()])
    assert isinstance(e.value.cause, CalibrationError)
