"""Frontends: capture + eager lowering reproduce the model; every node has a lineage record."""
from __future__ import annotations

import functools
from collections import Counter

import pytest
import torch

import fxpress
from fxpress.frontends.dynamo import call_with_dynamo_inputs, from_dynamo_graph
from fxpress.ir import Lineage, lineage, verify
from tests import models

aten = torch.ops.aten
ATOL = 1e-5


def _ops(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def _count(model, cls) -> int:
    return sum(isinstance(m, cls) for m in model.modules())


@functools.lru_cache(maxsize=None)
def _captured(name: str):
    """(model, inputs, IR) per named case, captured once per session (tests only read them)."""
    model, inputs = models.build(name)
    return model, inputs, fxpress.capture(model, inputs)


def _other_inputs(inputs: tuple) -> tuple:
    g = torch.Generator().manual_seed(1)
    return tuple(x + 0.5 * torch.randn(x.shape, generator=g) if x.is_floating_point()
                 else torch.randint(0, 100, x.shape, generator=g) if x.dtype == torch.long and x.max() > 1
                 else x for x in inputs)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "densenet", "bert", "gpt2", "vit"])
def test_capture_and_eager_lowering_match_model(name):
    model, inputs, gm = _captured(name)
    with torch.no_grad():
        ref = model(*inputs)
    run = fxpress.lower(gm, backend="eager", example_inputs=inputs)
    torch.testing.assert_close(run(*inputs), ref, atol=ATOL, rtol=1e-5)
    # and on other inputs: the IR is not specialised to the example's values
    other = _other_inputs(inputs)
    with torch.no_grad():
        torch.testing.assert_close(run(*other), model(*other), atol=ATOL, rtol=1e-5)
    assert verify(gm, raise_on_error=False) == []
    # one ATen op per conv / linear module (GPT-2's Conv1D projections are addmm)
    ops = _ops(gm)
    assert ops[aten.conv2d.default] == _count(model, torch.nn.Conv2d)
    assert ops[aten.linear.default] == _count(model, torch.nn.Linear)


def test_every_node_has_a_lineage_in_user_module_names():
    _, _, gm = _captured("resnet18")
    for n in gm.graph.nodes:
        if n.op != "output":
            assert isinstance(lineage(n), Lineage), n.name
    convs = [lineage(n) for n in gm.graph.nodes if n.target is aten.conv2d.default]
    paths = [lin.module_path for lin in convs]
    assert paths[:3] == ["conv1", "layer1.0.conv1", "layer1.0.conv2"]
    assert "layer2.0.downsample.0" in paths
    assert all(lin.module_type == "Conv2d" and lin.original_op == "aten.conv2d.default" for lin in convs)
    assert all(lin.source and lin.source.endswith(tuple(f":{i}" for i in range(1, 10000))) for lin in convs)
    _, _, bgm = _captured("bert")
    linear_paths = {lineage(n).module_path for n in bgm.graph.nodes if n.target is aten.linear.default}
    assert "bert.encoder.layer.0.attention.self.query" in linear_paths


def test_ir_owns_its_parameters_and_keeps_ties():
    model, _, gm = _captured("gpt2")
    user = {p.data_ptr() for p in model.parameters()}
    assert not any(p.data_ptr() in user for p in gm.parameters())
    # GPT-2 ties lm_head to the token embedding: the IR keeps one tensor for both
    assert gm.gpt2.lm_head.weight is gm.gpt2.transformer.wte.weight
    assert sum(p.numel() for p in gm.parameters()) == sum(p.numel() for p in model.parameters())


def test_sdpa_attention_captures_too():
    model = models.bert(attn_implementation="sdpa")
    inputs = models.example_inputs("bert")
    gm = fxpress.capture(model, inputs)
    assert _ops(gm)[aten.scaled_dot_product_attention.default] == 2
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), atol=ATOL, rtol=1e-5)


def test_dynamic_batch_dimension():
    model = models.digits_cnn()
    x = torch.randn(4, 1, 8, 8)
    batch = torch.export.Dim("batch", min=1, max=64)
    gm = fxpress.capture(model, (x,), dynamic_shapes=({0: batch},))
    y = torch.randn(9, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(gm(y), model(y), atol=ATOL, rtol=1e-5)


class _BufferFlag(torch.nn.Module):
    """Branches on a buffer's value: torch.export refuses, the fx frontend resolves it."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.register_buffer("mode", torch.tensor(1))

    def forward(self, x):
        if self.mode.item() == 1:
            return torch.relu(self.fc(x))
        return self.fc(x)


def test_fx_frontend_captures_what_export_rejects():
    model, x = _BufferFlag().eval(), torch.randn(3, 4)
    with pytest.raises(fxpress.CaptureError):
        fxpress.capture(model, (x,))
    gm = fxpress.capture(model, (x,), frontend="fx")
    assert _ops(gm)[aten.relu.default] == 1
    torch.testing.assert_close(gm(x), model(x), atol=ATOL, rtol=1e-5)
    assert lineage(next(n for n in gm.graph.nodes if n.target is aten.linear.default)).module_path == "fc"
    rmodel, rin = models.build("digits_cnn")
    rgm = fxpress.capture(rmodel, rin, frontend="fx")
    with torch.no_grad():
        torch.testing.assert_close(rgm(*rin), rmodel(*rin), atol=ATOL, rtol=1e-5)


def test_dynamo_frontend_gets_named_parameters_back():
    model, x = models.digits_cnn(), torch.randn(2, 1, 8, 8)
    seen = {}

    def backend(gm, example_inputs):
        ir = from_dynamo_graph(gm, example_inputs)
        seen["ir"] = ir
        return call_with_dynamo_inputs(ir, ir)

    torch._dynamo.reset()
    try:
        out = torch.compile(model, backend=backend)(x)
    finally:
        torch._dynamo.reset()
    ir = seen["ir"]
    with torch.no_grad():
        torch.testing.assert_close(out, model(x), atol=ATOL, rtol=1e-5)
    assert sum(n.op == "placeholder" for n in ir.graph.nodes) == 1  # params are attributes again
    assert {"conv1.weight", "bn1.running_mean", "fc2.bias"} <= {
        str(n.target) for n in ir.graph.nodes if n.op == "get_attr"}
    conv = next(n for n in ir.graph.nodes if n.target is aten.conv2d.default)
    assert lineage(conv).module_path == "conv1"
    assert verify(ir, raise_on_error=False) == []
