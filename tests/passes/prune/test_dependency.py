"""Dependency analysis: groups through residuals, concat/split offsets, depthwise, heads, flatten."""
from __future__ import annotations

import copy
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

import fxpress
from fxpress.passes.analysis.dependency import analyze
from tests import models
from fxpress.passes.analysis.shape_prop import propagate_shapes
from fxpress.passes.prune.channel_removal import remove_channels
from tests.passes.prune._util import plan_and_prune, zeroed_copy


class _Mixed(nn.Module):
    """Residual + depthwise + concat + split + squeeze-excite product + flatten->linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Conv2d(16, 8, 1)
        self.c = nn.Conv2d(16, 32, 1)
        self.fc = nn.Linear(32 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(x)))
        x = self.dw(x)
        y = torch.cat([self.a(x), self.b(x)], 1)
        y1, y2 = torch.split(self.c(y), [16, 16], 1)
        z = torch.cat([y1 * torch.sigmoid(y2.mean((2, 3), keepdim=True)), y2], 1)
        return self.fc(nn.functional.adaptive_avg_pool2d(z, 4).flatten(1))


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(0)
    m = models.randomize_bn(_Mixed().eval())
    x = torch.randn(2, 3, 8, 8)
    return m, (x,), fxpress.capture(m, (x,))


def test_groups_print_in_module_names(mixed):
    _, _, gm = mixed
    dep = analyze(gm)
    texts = [str(g) for g in dep.groups]
    assert texts[0] == ("conv1.out[0:16] => bn1[0:16] => conv2.out[0:16] => conv2.in[0:16] => bn2[0:16] "
                        "=> dw.out[0:16] => a.in[0:16] => b.in[0:16] (+ add@add)")
    assert "a.out[0:8] => c.in[0:8] (+ cat@cat)" in texts          # concat offsets
    assert "b.out[0:8] => c.in[8:16] (+ cat@cat)" in texts
    # split halves coupled by the SE product; fc columns follow flatten (16 columns per channel)
    se = next(g for g in dep.groups if g.name.startswith("c.out"))
    assert se.size == 16 and "fc.in[0:512]" in str(se) and "split@split_with_sizes" in str(se)
    assert {m.width for m in se.members if m.module in ("c", "fc")} == {2, 32}
    assert dep.unprunable == {"model output": ["fc.out[0:10]"]}
    for g in dep.groups:
        assert g.record().validate() == []


def test_split_sizes_and_depthwise_groups_rewritten(mixed):
    m, inputs, gm0 = mixed
    gm = copy.deepcopy(gm0)
    plan_and_prune(gm, inputs, 0.5, scope="local")
    split = next(n for n in gm.graph.nodes if "split" in str(n.target))
    assert split.args[1] == [8, 8]
    dw = next(n for n in gm.graph.nodes if n.target is torch.ops.aten.conv2d.default
              and len(n.args) > 6 and n.args[6] != 1)
    assert dw.args[6] == gm.dw.weight.shape[0] == 8
    assert gm.fc.weight.shape == (10, 8 * 2 * 16) and gm(*inputs).shape == (2, 10)


def test_attention_heads_are_units():
    model, inputs = models.build("vit")
    gm = fxpress.capture(model, inputs)
    dep = analyze(gm)
    heads = [g for g in dep.groups if "q_proj" in g.name]
    assert len(heads) == 2
    g = heads[0]
    assert g.size == 4 and g.width == 8  # 4 heads of 8 channels: whole heads go together
    text = str(g)
    for part in ("q_proj.out[0:32]", "k_proj.out[0:32]", "v_proj.out[0:32]", "o_proj.in[0:32]", "heads@"):
        assert part in text, text
    # remove heads 0 and 2 of every layer: the pruned graph computes exactly what the
    # original does with those heads' q/k/v rows and out-projection columns zeroed
    base = copy.deepcopy(gm)
    pruned = np.zeros(dep.num_comps, dtype=bool)
    for h in heads:
        pruned[h.comps[[0, 2]]] = True
    remove_channels(gm, dep, pruned)
    propagate_shapes(gm, inputs)
    views = [n for n in gm.graph.nodes if n.target is torch.ops.aten.view.default]
    assert all(-1 in n.args[1] or 2 in n.args[1] for n in views)  # head count inferred or rewritten
    q = gm.get_submodule("vit.vit.layers.0.attention.q_proj")
    assert q.weight.shape[0] == 16 and gm(*inputs).shape == (2, 10)
    torch.testing.assert_close(gm(*inputs), zeroed_copy(base, dep, pruned)(*inputs), atol=1e-5, rtol=1e-5)


class _Rolled(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(8, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.roll(self.a(x), 1, dims=1))))


def test_unresolved_coupling_is_named_and_kept_whole():
    m = _Rolled().eval()
    x = torch.randn(1, 3, 4, 4)
    cm = fxpress.compress(m, (x,), fxpress.ChannelPruning(ratio=0.5, round_to=1))
    st = cm.report["prune_channels"]
    assert any("aten.roll" in u for u in st["unresolved"]), st
    assert "unresolved coupling (kept whole)" in cm.report.sections["channel_pruning"]
    gm = cm.graph_module
    assert gm.a.weight.shape[0] == 8           # rolled channels stay whole
    assert gm.b.weight.shape[0] == 4           # the independent group is still pruned
    torch.testing.assert_close(cm(x).shape, m(x).shape)


def test_resnet50_analysis_under_two_seconds():
    m = models.resnet50(num_classes=1000)
    gm = fxpress.capture(m, (torch.randn(1, 3, 64, 64),))
    analyze(gm)  # first call pays imports
    t0 = time.perf_counter()
    dep = analyze(gm)
    dt = time.perf_counter() - t0
    assert dt < 2.0, dt
    # 16 bottlenecks x 2 inner groups + stem + 4 residual stages
    assert len(dep.groups) == 37
    assert sum(1 for g in dep.groups if "add@" in str(g)) == 4


@pytest.mark.slow
def test_fused_qkv_split_into_heads_gpt2():
    model, inputs = models.build("gpt2")
    gm = fxpress.capture(model, inputs)
    y0 = gm(*inputs)
    dep = analyze(gm)
    qkv = [g for g in dep.groups if "c_attn.out" in g.name]
    assert len(qkv) == 2 and all(g.size == 4 and g.width == 24 for g in qkv)  # 4 heads x (q, k, v) x 8
    assert all("split@" in str(g) and "heads@" in str(g) for g in qkv)
    plan_and_prune(gm, inputs, 0.5, scope="local")
    assert gm.get_submodule("gpt2.transformer.h.0.attn.c_attn").weight.shape[1] == 48
    assert gm(*inputs).shape == y0.shape
