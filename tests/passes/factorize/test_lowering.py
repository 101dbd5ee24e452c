"""All four factorizations lower through Inductor and ONNX Runtime and compute what the IR computes."""
import importlib.util

import numpy as np
import pytest
import torch

import fxpress

from ._util import aten, ops


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = torch.nn.Conv2d(8, 24, 3, padding=1)
        self.c2 = torch.nn.Conv2d(24, 32, 3, stride=2, padding=1)
        self.fc1 = torch.nn.Linear(32 * 4 * 4, 64)
        self.fc2 = torch.nn.Linear(64, 64)
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x):
        y = torch.relu(self.c2(torch.relu(self.c1(x)))).flatten(1)
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(y)))))


RECIPE = [fxpress.LowRank(method="tucker", rank=(6, 4), include=("c1",)),
          fxpress.LowRank(method="cp", rank=8, include=("c2",), cp_iters=30),
          fxpress.LowRank(method="svd", rank=8, include=("fc1",)),
          fxpress.LowRank(method="tt", rank=2, tt_order=2, include=("fc2",))]


@pytest.fixture(scope="module")
def compressed():
    torch.manual_seed(0)
    x = torch.randn(2, 8, 8, 8)
    cm = fxpress.compress(Net().eval(), (x,), RECIPE)
    return cm, x


def test_all_four_methods_fired(compressed):
    cm, _ = compressed
    for method in ("tucker", "cp", "svd", "tt"):
        assert cm.report[f"lowrank_{method}"]["factorized"] == 1, method
    c = ops(cm.graph_module)
    assert c[aten.conv2d.default] == 3 + 4 and c[aten.linear.default] == 2 + 1 and c[aten.mm.default] == 2


def _has(mod: str) -> bool:
    return importlib.util.find_spec(mod) is not None


@pytest.mark.slow
def test_lowers_through_inductor(compressed):
    cm, x = compressed
    with torch.no_grad():
        ref = cm(x)
        if _has("fxpress.backends.inductor"):
            got = fxpress.lower(cm, backend="inductor", example_inputs=(x,))(x)
        else:
            got = torch.compile(cm)(x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_lowers_through_onnxruntime(compressed):
    cm, x = compressed
    with torch.no_grad():
        ref = cm(x)
    if _has("fxpress.backends.onnxruntime"):
        got = fxpress.lower(cm, backend="onnxruntime", example_inputs=(x,))(x)
    else:  # the ORT backend is not in this tree yet: the dynamo exporter and a plain session
        import onnxruntime as ort
        prog = torch.onnx.export(cm, (x,), dynamo=True, verbose=False)
        sess = ort.InferenceSession(prog.model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
        names = {n.op_type for n in prog.model_proto.graph.node}
        assert "Conv" in names and ("MatMul" in names or "Gemm" in names)
    torch.testing.assert_close(torch.as_tensor(np.asarray(got)), ref, rtol=1e-4, atol=1e-4)
