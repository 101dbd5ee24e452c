"""Distillation losses against values worked out by hand on tiny tensors."""
from __future__ import annotations

import math

import pytest
import torch

from fxpress.errors import InputError
from fxpress.ir.meta import ChannelGroup, ChannelRef, set_record
from fxpress.passes.distill.losses import (
    HintAdapter,
    attention_loss,
    attention_map,
    hint_loss,
    kd_loss,
    kept_channels,
    mutual_loss,
)


def test_kd_loss_known_value_and_temperature_scaling():
    s = torch.tensor([[0.0, 0.0]])
    t = torch.tensor([[math.log(3.0), 0.0]])  # softmax -> (0.75, 0.25)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # 0.130812
    assert kd_loss(s, t, temperature=1.0).item() == pytest.approx(kl, abs=1e-6)
    # same soft targets at T=2 (logits doubled): the T² factor makes it 4× the KL
    assert kd_loss(s, 2 * t, temperature=2.0).item() == pytest.approx(4 * kl, abs=1e-6)
    # batchmean: a batch of the same row has the same loss; equal logits give 0
    assert kd_loss(s.repeat(3, 1), t.repeat(3, 1), 1.0).item() == pytest.approx(kl, abs=1e-6)
    assert kd_loss(t, t, 4.0).item() == pytest.approx(0.0, abs=1e-7)


def test_kd_loss_gradient_points_to_teacher():
    s = torch.zeros(1, 3, requires_grad=True)
    t = torch.tensor([[2.0, 0.0, 0.0]])
    kd_loss(s, t, 1.0).backward()
    # d/ds KL = p_s - p_t: negative where the teacher puts more mass
    p_t = torch.softmax(t, -1)
    assert torch.allclose(s.grad, torch.full((1, 3), 1 / 3) - p_t, atol=1e-6)


def test_kd_loss_shape_mismatch_is_typed():
    with pytest.raises(InputError, match="differ in shape"):
        kd_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_mutual_loss_is_mean_kl_to_detached_peers():
    z = torch.tensor([[0.0, 0.0]], requires_grad=True)
    p1 = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    p2 = torch.tensor([[0.0, 0.0]], requires_grad=True)
    kl = 0.75 * math.log(1.5) + 0.25 * math.log(0.5)
    loss = mutual_loss(z, [p1, p2], 1.0)
    assert loss.item() == pytest.approx(kl / 2, abs=1e-6)
    loss.backward()
    assert p1.grad is None and p2.grad is None  # peers are targets, not trained through this loss
    assert mutual_loss(z, []).item() == 0.0


def test_hint_loss_is_mse():
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    t = torch.tensor([[1.0, 0.0], [3.0, 8.0]])
    assert hint_loss(s, t).item() == pytest.approx((4 + 16) / 4)
    with pytest.raises(InputError, match="adapter"):
        hint_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 4, 3, 3))


def test_attention_map_and_loss_known_values():
    t = torch.tensor([3.0, 4.0]).view(1, 1, 1, 2)
    s = torch.tensor([4.0, 3.0]).view(1, 1, 1, 2)
    norm = math.sqrt(9 ** 2 + 16 ** 2)
    assert torch.allclose(attention_map(t), torch.tensor([[9 / norm, 16 / norm]]), atol=1e-6)
    d = (16 - 9) / norm
    assert attention_loss(s, t).item() == pytest.approx(2 * d * d, abs=1e-6)
    # channel counts may differ: the map averages |F|^2 over channels
    s2 = torch.cat([s, -s], 1)  # |.|^2 mean over 2 channels = same map as s
    assert attention_loss(s2, t).item() == pytest.approx(2 * d * d, abs=1e-6)
    # a scaled copy has the same attention (maps are normalised)
    assert attention_loss(5 * t, t).item() == pytest.approx(0.0, abs=1e-7)


def test_attention_resizes_smaller_student_map():
    t = torch.ones(2, 3, 4, 4)
    s = torch.ones(2, 5, 2, 2)
    assert attention_loss(s, t).item() == pytest.approx(0.0, abs=1e-7)


def test_hint_adapter_from_selection_reproduces_kept_teacher_channels():
    teacher = torch.randn(2, 4, 3, 3)
    kept = [3, 0]
    student = teacher[:, kept]  # a pruned copy computes exactly the kept channels
    a = HintAdapter.from_selection(kept, 4)
    out = a(student)
    assert torch.equal(out[:, kept], teacher[:, kept])
    assert torch.equal(out[:, [1, 2]], torch.zeros(2, 2, 3, 3))
    # the hint loss at step 0 measures exactly what pruning removed
    expected = teacher[:, [1, 2]].pow(2).sum() / teacher.numel()
    assert hint_loss(out, teacher).item() == pytest.approx(expected.item(), rel=1e-5)
    # 2-D features use the same matrix
    assert torch.equal(a(teacher[:, kept, 0, 0])[:, kept], teacher[:, kept, 0, 0])
    with pytest.raises(InputError):
        HintAdapter.from_selection([0, 0], 4)


def test_kept_channels_reads_channel_group_record():
    g = torch.fx.Graph()
    x = g.placeholder("x")
    y = g.call_function(torch.relu, (x,))
    g.output(y)
    gm = torch.fx.GraphModule(torch.nn.Module(), g)
    node = next(n for n in gm.graph.nodes if n.op == "call_function")
    set_record(node, ChannelGroup((ChannelRef(node.name, "conv1", 1, 0, 6, "out"),), 6, (1, 4)))
    assert kept_channels(gm, node) == (0, 2, 3, 5)
    assert kept_channels(gm, node, original_size=6) == (0, 2, 3, 5)
    assert kept_channels(gm, node, original_size=8) is None  # numbered against another size
