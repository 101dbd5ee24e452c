"""The `fxpress` command line: help, inspect, and clean hooks for the other commands."""
from __future__ import annotations

import pytest
import torch

from fxpress import cli
from fxpress.commands import inspect as inspect_cmd


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as ei:
        cli.main(["--help"])
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for name in ("inspect", "compress", "demo", "bench"):
        assert f"  {name}" in out


def test_inspect_prints_ops_macs_params_per_module(capsys):
    assert cli.main(["inspect", "tests.models:digits_cnn", "--input-shape", "1,1,8,8"]) == 0
    out = capsys.readouterr().out
    assert "inputs: x [1, 1, 8, 8] float32" in out
    assert "aten.conv2d.default      2" in out and "aten.linear.default      2" in out
    # MACs by hand: conv1 16*64*9 + conv2 32*64*144 + fc1 64*512 + fc2 10*64 = 337,536
    assert "total: MACs 337.54k" in out
    conv2 = next(ln for ln in out.splitlines() if ln.strip().startswith("conv2 "))
    assert conv2.split()[1:4] == ["Conv2d", "294.91k", "4.64k"]
    assert "relu" not in out.split("per module")[1]  # only modules that compute or hold weights


def test_inspect_uses_factory_inputs_and_dtypes(capsys, tmp_path):
    f = tmp_path / "mynet.py"
    f.write_text("import torch\n"
                 "def build():\n"
                 "    m = torch.nn.Sequential(torch.nn.Embedding(100, 8), torch.nn.Linear(8, 4))\n"
                 "    return m, (torch.zeros(2, 5, dtype=torch.long),)\n"
                 "def bare():\n"
                 "    return torch.nn.Linear(3, 2)\n")
    assert cli.main(["inspect", f"{f}:build", "--recipe", _recipe(tmp_path), "--graph"]) == 0
    out = capsys.readouterr().out
    assert "[2, 5] int64" in out.splitlines()[1] and "aten.embedding.default  1" in out
    assert "| dce |" in out and "%embedding = aten.embedding.default" in out
    assert cli.main(["inspect", f"{f}:bare", "--input-shape", "4,3"]) == 0
    assert "total: MACs 24" in capsys.readouterr().out
    assert inspect_cmd.parse_input_shape("2,16:long").dtype == torch.long


def _recipe(tmp_path) -> str:
    p = tmp_path / "r.yaml"
    p.write_text("passes:\n  - fold_bn\n  - dce\n")
    return str(p)


def test_inspect_bad_input_is_a_message_not_a_traceback(capsys, tmp_path):
    f = tmp_path / "bare.py"
    f.write_text("import torch\ndef bare():\n    return torch.nn.Linear(3, 2)\n")
    assert cli.main(["inspect", f"{f}:bare"]) == 1
    err = capsys.readouterr().err
    assert "InputError" in err and "--input-shape" in err and "Traceback" not in err
    assert cli.main(["inspect", "tests.models:no_such_factory", "--input-shape", "1"]) == 1
    assert "has no 'no_such_factory'" in capsys.readouterr().err
    assert cli.main(["inspect", "tests.models:digits_cnn", "--input-shape", "1,a"]) == 1
    assert "comma-separated ints" in capsys.readouterr().err


def test_missing_command_module_exits_2(capsys, monkeypatch):
    monkeypatch.setitem(cli.COMMANDS, "frobnicate", "a command nobody wrote")
    assert cli.main(["frobnicate"]) == 2
    assert "fxpress/commands/frobnicate.py is missing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as ei:
        cli.main(["nonsense"])
    assert ei.value.code == 2
