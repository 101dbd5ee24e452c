"""The Inductor lowering reports which kernel runs each conv/linear (report["layers"])."""
from __future__ import annotations

import torch

import fxpress
from fxpress.backends import onednn_conv
from tests.models import resnet18


def test_inductor_report_names_kernel_per_layer():
    torch.manual_seed(0)
    model = resnet18(width=8, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(1, 3, 32, 32, generator=g),) for _ in range(2)]
    cm = fxpress.compress(model, data[0], fxpress.Quantize(mode="static"), calibration=data)
    run = fxpress.lower(cm, backend="inductor", example_inputs=data[0])
    rows = run.report["layers"]
    assert len(rows) == 21                                   # 20 convs + fc
    layers = {r["layer"]: r["kernel"] for r in rows}
    assert layers["fc"] == "Inductor qlinear"
    packed = [r for r in rows if r["kernel"].startswith("packed oneDNN conv")]
    ok, _ = onednn_conv.available()
    if ok:   # VNNI / AMX hosts: every int8 conv is a packed oneDNN conv, counted like report["kernels"]
        assert len(packed) == 20 and run.report["kernels"]["qconv_packed"] == 20
        assert layers["conv1"] == "packed oneDNN conv"
    else:
        assert not packed and all(r["kernel"] in ("Inductor qconv", "Inductor qlinear") for r in rows)
    assert sum(1 for r in rows if r["kernel"] != "fp32") == 21
    x = data[1][0]
    assert fxpress.passes.quant.sqnr_db(cm(x), run(x)) > 25
