"""Cleanup passes, the PassManager, rewrite rules and the analyses."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

import fxpress
from fxpress.errors import PassError, VerificationError
from fxpress.ir import Lineage, lineage, set_record
from fxpress.passes.analysis import ShapeProp, propagate_shapes
from fxpress.passes.analysis.cost import Cost, CostAnalysis, cost_by_module, total_cost
from fxpress.passes.base import Pass, PassContext, PassResult
from fxpress.passes.cleanup import ConstantFold, DeadCodeElimination, FoldBatchNorm
from fxpress.passes.manager import PassManager
from fxpress.passes.rewrite import NodeRule, PatternRule, apply_rules
from tests import models

aten = torch.ops.aten


def _ops(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# ------------------------------------------------------------------ BN folding
@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_bn_folding_is_exact(name):
    model, inputs = models.build(name)
    gm = fxpress.capture(model, inputs)
    n_bn = _ops(gm).count(aten.batch_norm.default)
    gm, report = PassManager([FoldBatchNorm()], debug=True).run(gm, PassContext(example_inputs=inputs))
    assert report["fold_bn"]["folded"] == n_bn > 0 and report["fold_bn"]["skipped"] == []
    assert aten.batch_norm.default not in _ops(gm)
    assert not any("running_mean" in k for k, _ in gm.named_buffers())  # BN state gone
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)
    # the folded conv still speaks the user's names and says what it absorbed
    first = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default)
    assert lineage(first).module_path in ("conv1", "features.0.0")
    assert lineage(first).original_op == "aten.conv2d.default+batch_norm"


def test_bn_folding_skips_what_it_must_and_handles_linear():
    model, inputs = models.build("densenet")  # pre-activation BNs follow cat / relu, not a conv
    gm = fxpress.capture(model, inputs)
    gm, report = PassManager([FoldBatchNorm()]).run(gm, PassContext(example_inputs=inputs))
    skipped = report["fold_bn"]["skipped"]
    assert report["fold_bn"]["folded"] >= 1 and skipped
    assert all("not fed by conv/linear" in s for s in skipped)
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), model(*inputs), atol=1e-5, rtol=1e-5)

    lin = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU())
    models.randomize_bn(lin)
    lin.eval()
    x = torch.randn(5, 6)
    gm = fxpress.capture(lin, (x,))
    gm, report = PassManager([FoldBatchNorm()]).run(gm, PassContext(example_inputs=(x,)))
    assert report["fold_bn"]["folded"] == 1 and aten.batch_norm.default not in _ops(gm)
    torch.testing.assert_close(gm(x), lin(x), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ DCE / constant folding
class _Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 4)
        self.scale = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, x):
        w = self.fc.weight * self.scale.exp()  # parameter-only subgraph
        dead = torch.sin(x)  # noqa: F841  (dead code the IR starts with)
        return torch.nn.functional.linear(x, w, self.fc.bias)


def test_constant_fold_and_dce():
    model, x = _Scaled().eval(), torch.randn(3, 4)
    gm = fxpress.capture(model, (x,))
    assert aten.exp.default in _ops(gm)
    gm, report = PassManager([ConstantFold(), DeadCodeElimination()], debug=True).run(
        gm, PassContext(example_inputs=(x,)))
    assert report["constant_fold"]["folded"] == 1
    assert aten.exp.default not in _ops(gm) and aten.mul.Tensor not in _ops(gm)
    assert aten.sin.default not in _ops(gm)
    names = {k for k, _ in gm.named_parameters()} | {k for k, _ in gm.named_buffers()}
    assert "scale" not in names and "fc.weight" not in names and not any("unused" in k for k in names)
    folded = next(n for n in gm.graph.nodes if n.op == "get_attr" and "_folded" in str(n.target))
    assert lineage(folded) is not None
    torch.testing.assert_close(gm(x), model(x), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ PassManager
@dataclass(frozen=True)
class _Boom(Pass):
    name: ClassVar[str] = "boom"

    def run(self, gm, ctx):
        raise RuntimeError("kaboom")


@dataclass(frozen=True)
class _BreakIR(Pass):
    """Reads an attribute that does not exist: the verifier must catch it."""

    name: ClassVar[str] = "break_ir"

    def run(self, gm, ctx):
        out = next(n for n in gm.graph.nodes if n.op == "output")
        with gm.graph.inserting_before(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fx warns about exactly the bug we plant
            gm.graph.get_attr("no.such.weight")
        return PassResult(gm, True, {})


@dataclass(frozen=True)
class _CountDown(Pass):
    """Modifies the graph on its first `n` runs only (to exercise the fixed point)."""

    name: ClassVar[str] = "count_down"
    state: list

    def run(self, gm, ctx):
        self.state.append(1)
        return PassResult(gm, len(self.state) <= 2, {"run": len(self.state)})


@dataclass(frozen=True)
class _NeedsShapes(Pass):
    name: ClassVar[str] = "needs_shapes"
    requires: ClassVar[tuple[str, ...]] = ("shapes",)

    def run(self, gm, ctx):
        ok = all("val" in n.meta for n in gm.graph.nodes if n.op == "call_function")
        return PassResult(gm, False, {"had_shapes": ok})


@dataclass(frozen=True)
class _NeedsMagic(Pass):
    name: ClassVar[str] = "needs_magic"
    requires: ClassVar[tuple[str, ...]] = ("magic",)

    def run(self, gm, ctx):
        return PassResult(gm, False, {})


def _digits_ir():
    model, inputs = models.build("digits_cnn")
    return model, inputs, fxpress.capture(model, inputs)


def test_pass_failure_names_the_pass_and_the_ones_before():
    _, inputs, gm = _digits_ir()
    pm = PassManager([FoldBatchNorm(), DeadCodeElimination(), _Boom(), ConstantFold()])
    with pytest.raises(PassError) as ei:
        pm.run(gm, PassContext(example_inputs=inputs))
    e = ei.value
    assert e.pass_name == "boom" and e.previous == ["fold_bn", "dce"]
    assert "pass 'boom' failed: RuntimeError: kaboom" in str(e) and "fold_bn -> dce" in str(e)
    assert isinstance(e.__cause__, RuntimeError)
    with pytest.raises(PassError, match="requires 'magic'"):
        PassManager([_NeedsMagic()]).run(gm, PassContext())


def test_debug_mode_verifies_after_each_pass():
    _, inputs, gm = _digits_ir()
    with pytest.raises(VerificationError) as ei:
        PassManager([FoldBatchNorm(), _BreakIR()], debug=True).run(gm, PassContext(example_inputs=inputs))
    assert "after 'break_ir'" in str(ei.value) and "no.such.weight" in str(ei.value)
    _, inputs, gm = _digits_ir()  # without debug the broken IR goes unnoticed by the manager
    PassManager([_BreakIR()]).run(gm, PassContext(example_inputs=inputs))


def test_fixed_point_timing_stats_and_requirements():
    _, inputs, gm = _digits_ir()
    state: list = []
    gm, report = PassManager([_CountDown(state), _NeedsShapes()], fixed_point=True).run(
        gm, PassContext(example_inputs=inputs))
    assert len(state) == 3  # modified, modified, unchanged -> stop
    names = [r.name for r in report.passes]
    # shapes are (re)established before the pass that needs them, after every modification
    assert names == ["count_down", "shape_prop", "needs_shapes"] * 2 + ["count_down", "needs_shapes"]
    assert [r.iteration for r in report.passes if r.name == "count_down"] == [0, 1, 2]
    assert all(r.seconds >= 0 for r in report.passes) and report["needs_shapes"]["had_shapes"]
    assert "| count_down | yes |" in str(report)
    _, _, gm2 = _digits_ir()
    _, rep = PassManager([_CountDown([])], fixed_point=True, max_iter=1).run(gm2, PassContext())
    assert len(rep.passes) == 1


# ------------------------------------------------------------------ rewrite rules
def test_pattern_and_node_rules_count_hits_and_keep_lineage():
    _, inputs, gm = _digits_ir()
    ref = gm(*inputs)

    def pat(x, w, b):
        return aten.relu.default(aten.linear.default(x, w, b))

    def rep(x, w, b):
        return aten.clamp_min.default(aten.linear.default(x, w, b), 0.0)

    hits = apply_rules(gm, [PatternRule("relu_as_clamp", pat, rep)])
    assert hits["relu_as_clamp"] == 1  # fc1 -> relu; fc2 has no relu
    clamp = next(n for n in gm.graph.nodes if n.target is aten.clamp_min.default)
    assert lineage(clamp).original_op == "rewrite:relu_as_clamp"

    def halve_maxpool(gm, node):
        return None  # declines every match

    def relu_to_clamp(gm, node):
        with gm.graph.inserting_after(node):
            return gm.graph.call_function(aten.clamp_min.default, (node.args[0], 0.0))

    hits = apply_rules(gm, [NodeRule("decline", {aten.max_pool2d.default}, halve_maxpool),
                            NodeRule("relu_clamp", {aten.relu.default}, relu_to_clamp)])
    assert hits["decline"] == 0 and hits["relu_clamp"] == 2
    assert aten.relu.default not in _ops(gm)
    made = [lineage(n) for n in gm.graph.nodes if n.target is aten.clamp_min.default]
    # torch.relu is called in DigitsCNN.forward itself: the top-level module ("")
    assert {(lin.module_path, lin.module_type) for lin in made} == {("", "DigitsCNN")}
    assert sorted(lin.original_op for lin in made) == ["rewrite:relu_as_clamp"] + ["rewrite:relu_clamp"] * 2
    torch.testing.assert_close(gm(*inputs), ref)


# ------------------------------------------------------------------ analyses
def test_cost_in_module_names_matches_hand_count():
    model, _, gm = _digits_ir()  # (2, 1, 8, 8) -> conv1 16ch -> conv2 32ch -> pool -> fc1 64 -> fc2 10
    per = cost_by_module(gm)
    assert per["conv1"].macs == 2 * 16 * 8 * 8 * (1 * 3 * 3)
    assert per["conv2"].macs == 2 * 32 * 8 * 8 * (16 * 3 * 3)
    assert per["fc1"].macs == 2 * 64 * 512 and per["fc2"].macs == 2 * 10 * 64
    assert per["conv1"].params == 16 * 9 + 16 and per["fc2"].params == 10 * 64 + 10
    tot = total_cost(gm)
    assert tot.macs == sum(c.macs for c in per.values())
    assert tot.params == sum(t.numel() for t in model.state_dict().values())
    assert tot.bytes == sum(t.numel() * t.element_size() for t in model.state_dict().values())
    gm2, report = PassManager([CostAnalysis()]).run(gm, PassContext())
    assert report["cost"]["macs"] == tot.macs and [r.name for r in report.passes] == ["shape_prop", "cost"]
    assert Cost(1, 2, 3) + Cost(1, 1, 1) == Cost(2, 3, 4)


def test_shape_propagation_fills_new_nodes():
    _, inputs, gm = _digits_ir()
    relu = next(n for n in gm.graph.nodes if n.target is aten.relu.default)
    with gm.graph.inserting_after(relu):
        neg = gm.graph.call_function(aten.neg.default, (relu,))
    set_record(neg, Lineage("bn1", "BatchNorm2d", "aten.neg.default"))
    assert "val" not in neg.meta
    propagate_shapes(gm, inputs)
    assert tuple(neg.meta["val"].shape) == (2, 16, 8, 8)
    res = ShapeProp().run(gm, PassContext(example_inputs=inputs))
    assert not res.modified and res.stats["nodes"] == len(gm.graph.nodes)


def test_typed_user_error_inside_a_pass_keeps_its_type_and_names_the_pass():
    from dataclasses import dataclass
    from typing import ClassVar

    import fxpress
    from fxpress.errors import InputError
    from fxpress.passes.base import Pass, PassContext
    from fxpress.passes.manager import PassManager

    @dataclass(frozen=True)
    class Picky(Pass):
        name: ClassVar[str] = "picky"

        def run(self, gm, ctx):
            raise InputError("calibration batch 3: input 'x' has shape (2, 5)", input_name="x")

    gm = fxpress.capture(torch.nn.Linear(4, 2).eval(), (torch.randn(2, 4),))
    with pytest.raises(InputError) as ei:
        PassManager([Picky()]).run(gm, PassContext())
    assert isinstance(ei.value, PassError) and ei.value.pass_name == "picky"
    assert ei.value.input_name == "x" and "picky" in str(ei.value) and "'x'" in str(ei.value)
