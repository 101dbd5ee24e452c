"""Taps: intermediate nodes as extra graph outputs that share the graph's parameters."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpress
from fxpress.errors import RecipeError
from fxpress.passes.distill.taps import resolve_tap, tap, view


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.ReLU())
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.block(x)
        return {"logits": self.fc(x.mean((2, 3))), "aux": x.sum()}


@pytest.fixture
def captured():
    torch.manual_seed(0)
    m = Net().eval()
    x = torch.randn(2, 1, 6, 6)
    return m, x, fxpress.capture(m, (x,))


def test_tap_returns_intermediates_and_keeps_output_structure(captured):
    m, x, gm = captured
    code_before = gm.code
    t = tap(gm, ["bn1", "block", "conv1"])
    out, feats = t(x)
    ref = m(x)
    assert set(out) == {"logits", "aux"} and torch.allclose(out["logits"], ref["logits"])
    assert torch.allclose(feats["bn1"], m.bn1(m.conv1(x)), atol=1e-6)
    assert torch.allclose(feats["block"], m.block(F.relu(m.bn1(m.conv1(x)))), atol=1e-6)
    assert torch.allclose(feats["conv1"], m.conv1(x), atol=1e-6)
    # `gm` is untouched: same code, same single output structure
    assert gm.code == code_before and set(gm(x)) == {"logits", "aux"}
    # a module path resolves to the module's last node; a node name to itself
    assert resolve_tap(gm, "block").target is torch.ops.aten.relu.default
    assert resolve_tap(gm, "conv2d").name == "conv2d"


def test_tap_shares_parameters_so_training_it_trains_the_graph(captured):
    _, x, gm = captured
    t = tap(gm, ["block"])
    assert t.get_parameter("conv1.weight") is gm.get_parameter("conv1.weight")
    assert sum(1 for _ in t.parameters()) == sum(1 for _ in gm.parameters())
    w0 = gm.get_parameter("block.0.weight").detach().clone()
    opt = torch.optim.SGD(t.parameters(), lr=0.1)
    _, feats = t(x)
    feats["block"].pow(2).mean().backward()  # a loss on the tapped feature only
    assert gm.get_parameter("block.0.weight").grad is not None
    opt.step()
    assert not torch.equal(gm.get_parameter("block.0.weight"), w0)


def test_tap_survives_torch_compile(captured):
    """Taps are graph outputs: dynamo captures them in one graph, values and gradients match."""
    _, x, gm = captured
    t = tap(gm, ["bn1", "block"])
    compiled = torch.compile(t, backend="aot_eager", fullgraph=True)
    out_e, f_e = t(x)
    out_c, f_c = compiled(x)
    assert torch.allclose(out_c["logits"], out_e["logits"], atol=1e-6)
    for k in f_e:
        assert torch.allclose(f_c[k], f_e[k], atol=1e-6)
    f_c["bn1"].sum().backward()
    g_c = gm.get_parameter("conv1.weight").grad.clone()
    gm.zero_grad()
    t(x)[1]["bn1"].sum().backward()
    assert torch.allclose(g_c, gm.get_parameter("conv1.weight").grad, atol=1e-5)


def test_tap_on_plain_fx_graph_without_pytree_codegen():
    m = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    gm = torch.fx.symbolic_trace(m)
    t = tap(gm, ["1"])  # fx node name of the ReLU
    x = torch.randn(5, 3)
    out, feats = t(x)
    assert torch.allclose(out, m(x)) and torch.allclose(feats["1"], m[1](m[0](x)))


def test_view_runs_other_batch_sizes(captured):
    """A static IR insists on the example batch size; the view runs any batch (and so does the
    default, batch-dynamic IR)."""
    m, x, gm = captured
    x5 = torch.randn(5, 1, 6, 6)
    static = fxpress.capture(m, (x,), static_shapes=True)
    with pytest.raises(fxpress.InputError, match="size 5 in dim 0"):
        static(x5)
    assert torch.allclose(view(static)(x5)["logits"], m(x5)["logits"], atol=1e-6)
    assert torch.allclose(gm(x5)["logits"], m(x5)["logits"], atol=1e-6)


def test_unknown_tap_point_names_field_and_candidates(captured):
    _, _, gm = captured
    with pytest.raises(RecipeError) as e:
        tap(gm, ["layer9"])
    assert e.value.field == "taps" and "conv1" in str(e.value)
