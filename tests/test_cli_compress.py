"""`fxpress compress`: recipe + model factory + calibration -> an int8 .onnx and a report."""
from __future__ import annotations

import json
import textwrap

import pytest
import torch

from fxpress.cli import main

MODEL_PY = textwrap.dedent('''
    import torch, torch.nn as nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
            self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            x = torch.relu(self.conv1(x))
            x = torch.relu(self.conv2(x))
            return self.fc(x.mean((2, 3)))

    def factory():
        torch.manual_seed(0)
        return Net().eval(), (torch.randn(4, 1, 8, 8),)

    def calib():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(4, 1, 8, 8, generator=g),) for _ in range(6)]
''')


@pytest.fixture
def project(tmp_path):
    (tmp_path / "netdef.py").write_text(MODEL_PY)
    (tmp_path / "r.yaml").write_text("passes:\n  - quantize: {mode: static}\n")
    return tmp_path


def test_compress_writes_int8_onnx_and_reports(project, capsys):
    import onnx
    import onnxruntime as ort
    out = project / "model.onnx"
    rc = main(["compress", "--recipe", str(project / "r.yaml"),
               "--model", f"{project / 'netdef.py'}:factory", "--calib", f"{project / 'netdef.py'}:calib",
               "--backend", "onnxruntime", "--out", str(out),
               "--report-json", str(project / "report.json"), "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "quantize" in text and "SQNR" in text and "latency" in text
    # the artefact: int8 initializers behind QDQ, and ORT runs it close to the fp32 model
    m = onnx.load(str(out))
    ops = {n.op_type for n in m.graph.node}
    assert "DequantizeLinear" in ops and "QuantizeLinear" in ops
    eight_bit = (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)  # the backend picks the signedness
    assert {i.name for i in m.graph.initializer if i.data_type in eight_bit and len(i.dims) == 4} \
        >= {"conv1_weight_int8_1", "conv2_weight_int8_6"} or \
        sum(1 for i in m.graph.initializer if i.data_type in eight_bit and len(i.dims) == 4) == 2
    import netdef  # imported by the CLI from the file path
    model, (x,) = netdef.factory()
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    ref = model(x).detach()
    sqnr = 10 * torch.log10(ref.pow(2).sum() / (ref - torch.from_numpy(y)).pow(2).sum())
    assert sqnr > 20, sqnr  # int8 static on a random net: well above 20 dB
    report = json.loads((project / "report.json").read_text())
    assert report["agreement"]["sqnr_db"] > 20
    assert "quant_convert" in [p["name"] for p in report["passes"]]
    assert report["artefact_bytes"] == out.stat().st_size


def test_compress_errors_name_what_is_wrong(project, capsys):
    rc = main(["compress", "--recipe", str(project / "missing.yaml"),
               "--model", f"{project / 'netdef.py'}:factory", "--out", str(project / "m.onnx"),
               "--no-progress"])
    assert rc == 1 and "recipe file not found" in capsys.readouterr().err
    rc = main(["compress", "--recipe", str(project / "r.yaml"),
               "--model", f"{project / 'netdef.py'}:nofactory", "--out", str(project / "m.onnx"),
               "--no-progress"])
    assert rc == 1 and "nofactory" in capsys.readouterr().err
    (project / "bad.yaml").write_text("passes:\n  - distill: {mode: teacherless}\n")
    rc = main(["compress", "--recipe", str(project / "bad.yaml"),
               "--model", f"{project / 'netdef.py'}:factory", "--out", str(project / "m.onnx"),
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "mode" in err and "offline" in err
    assert not (project / "m.onnx").exists()
