"""CLI parity with the Python API: (model, dict) factories, CalibrationError without --calib,
an Inductor artefact, files written with the user's umask."""
from __future__ import annotations

import os
import stat
import textwrap

import pytest
import torch

import fxpress
from fxpress.cli import main

NETS = textwrap.dedent('''
    import torch, torch.nn as nn

    def hf_bert():
        import transformers
        cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                      intermediate_size=64, vocab_size=128)
        torch.manual_seed(0)
        model = transformers.BertModel(cfg).eval()
        enc = {"input_ids": torch.randint(0, 128, (2, 12)),
               "attention_mask": torch.ones(2, 12, dtype=torch.long)}
        return model, enc  # the model(**enc) style

    def enc_batches():
        g = torch.Generator().manual_seed(1)
        return [{"input_ids": torch.randint(0, 128, (2, 12), generator=g),
                 "attention_mask": torch.ones(2, 12, dtype=torch.long)} for _ in range(2)]

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(torch.relu(self.conv(x)).mean((2, 3)))

    def net():
        torch.manual_seed(0)
        return Net().eval(), (torch.randn(2, 1, 8, 8),)

    def calib():
        g = torch.Generator().manual_seed(1)
        return [(torch.randn(2, 1, 8, 8, generator=g),) for _ in range(3)]
''')


@pytest.fixture
def project(tmp_path):
    (tmp_path / "nets.py").write_text(NETS)
    (tmp_path / "static.yaml").write_text("passes:\n  - quantize: {mode: static}\n")
    (tmp_path / "dynamic.yaml").write_text("passes:\n  - quantize: {mode: dynamic}\n")
    return tmp_path


def test_model_dict_factory_inspects_and_compresses(project, capsys):
    pytest.importorskip("transformers")
    nets = project / "nets.py"
    assert main(["inspect", f"{nets}:hf_bert"]) == 0
    out = capsys.readouterr().out
    assert "input_ids [2, 12] int64" in out and "attention_mask [2, 12] int64" in out
    onnx_path = project / "bert.onnx"
    assert main(["compress", "--model", f"{nets}:hf_bert", "--recipe", str(project / "dynamic.yaml"),
                 "--calib", f"{nets}:enc_batches", "--backend", "onnxruntime",
                 "--out", str(onnx_path), "--no-progress"]) == 0
    assert "SQNR" in capsys.readouterr().out
    run = fxpress.load(onnx_path)
    enc = {"input_ids": torch.randint(0, 128, (3, 12)),
           "attention_mask": torch.ones(3, 12, dtype=torch.long)}
    assert run(**enc).last_hidden_state.shape == (3, 12, 32)


def test_inspect_without_calib_raises_the_apis_calibration_error(project, capsys):
    nets = project / "nets.py"
    assert main(["inspect", f"{nets}:net", "--recipe", str(project / "static.yaml")]) == 1
    err = capsys.readouterr().err
    assert "CalibrationError" in err and "calibration" in err and "Traceback" not in err
    assert main(["inspect", f"{nets}:net", "--recipe", str(project / "static.yaml"),
                 "--calib", f"{nets}:calib"]) == 0
    assert "quant_convert" in capsys.readouterr().out


@pytest.mark.slow  # AOTInductor compiles a C++ package (~30 s here)
def test_compress_to_an_inductor_package_with_the_users_umask(project, capsys):
    nets = project / "nets.py"
    out = project / "m.pt2"
    old = os.umask(0o022)
    try:
        assert main(["compress", "--model", f"{nets}:net", "--recipe", str(project / "static.yaml"),
                     "--calib", f"{nets}:calib", "--backend", "inductor", "--out", str(out),
                     "--no-progress", "--report-json", str(project / "r.json")]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE((project / "r.json").stat().st_mode) == 0o644
    run = torch._inductor.aoti_load_package(str(out))  # torch alone loads it
    y = run(torch.randn(5, 1, 8, 8))
    assert (y[0] if isinstance(y, (list, tuple)) else y).shape == (5, 4)


def test_written_files_follow_the_umask(tmp_path):
    from fxpress.utils import atomic_write_text
    old = os.umask(0o027)
    try:
        p = atomic_write_text(tmp_path / "a.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o640
