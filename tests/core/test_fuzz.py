"""200 fuzzed graphs: capture, run, verify, and survive the cleanup passes with the same numerics."""
from __future__ import annotations

import torch
import pytest
from hypothesis import HealthCheck, given, settings

import fxpress
from fxpress.ir import lineage, verify
from fxpress.passes.base import PassContext
from fxpress.passes.cleanup import DeadCodeElimination, FoldBatchNorm
from fxpress.passes.manager import PassManager
from tests import fuzz

aten = torch.ops.aten
_CONVS = (aten.conv2d.default, aten.linear.default)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP spin-wait eating the other core."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=fuzz.nets(max_blocks=3))
def test_fuzzed_graphs_capture_run_and_fold(net):
    model, inputs = net
    with torch.no_grad():
        ref = model(*inputs)
    gm = fxpress.capture(model, inputs)
    # structure only: the shape re-check is covered in test_verify and costs ~0.1 s a graph
    assert verify(gm, check_shapes=False, raise_on_error=False) == []
    assert all(lineage(n) is not None for n in gm.graph.nodes if n.op != "output")
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), ref, atol=1e-5, rtol=1e-5)

    gm, report = PassManager([FoldBatchNorm(), DeadCodeElimination()]).run(
        gm, PassContext(example_inputs=inputs))
    bn_left = [n for n in gm.graph.nodes if n.target is aten.batch_norm.default]
    assert not [n for n in bn_left if n.args[0].target in _CONVS and len(n.args[0].users) == 1]
    assert report["fold_bn"]["folded"] + len(bn_left) == sum(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert verify(gm, check_shapes=False, raise_on_error=False) == []
    with torch.no_grad():
        torch.testing.assert_close(gm(*inputs), ref, atol=1e-4, rtol=1e-4)


def test_random_net_is_deterministic_and_covers_every_block_kind():
    a, b = fuzz.random_net(11), fuzz.random_net(11)
    assert a.spec == b.spec and repr(a) == repr(b)
    for (k1, v1), (k2, v2) in zip(a.model.state_dict().items(), b.model.state_dict().items(), strict=True):
        assert k1 == k2 and torch.equal(v1, v2)
    assert torch.equal(a.inputs[0], b.inputs[0])
    assert not a.model.training
    kinds = {blk.kind for s in range(200) for blk in fuzz.random_spec(s).blocks}
    assert {"conv", "depthwise", "grouped", "residual", "inverted", "dense", "split", "pool",
            "attention", "mlp", "patchify", "embed", "linear", "gap_linear", "flatten_linear",
            "mean_linear", "linear_head"} <= kinds
    # real submodules for passes to act on
    net = fuzz.random_net(3, family="transformer")
    assert any(isinstance(m, fuzz.Attention) for m in net.model.modules())
    assert all(isinstance(getattr(m, p), torch.nn.Linear) for m in net.model.modules()
               if isinstance(m, fuzz.Attention) for p in ("q_proj", "k_proj", "v_proj", "out_proj"))
