"""`torchrun --nproc_per_node 2 -m fxpress.cli compress ...`: both ranks calibrate on their
shares, rank 0 writes the artefact, and it is the artefact one process writes."""
import json

import numpy as np
import onnx
from onnx import numpy_helper

from fxpress.cli import main
from tests.test_cli_compress import MODEL_PY

from .launch import torchrun_cmd


def _initializers(path) -> dict:
    return {i.name: numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer}


def test_torchrun_compress_equals_one_process(tmp_path, capsys):
    (tmp_path / "netdef.py").write_text(MODEL_PY)
    # minmax: a distributed result equal to one process's is bit-identical, not just close
    (tmp_path / "r.yaml").write_text("passes:\n  - quantize: {mode: static, observer: minmax}\n")
    common = ["compress", "--recipe", str(tmp_path / "r.yaml"),
              "--model", f"{tmp_path / 'netdef.py'}:factory",
              "--calib", f"{tmp_path / 'netdef.py'}:calib", "--backend", "onnxruntime",
              "--no-progress"]
    two = tmp_path / "two"
    two.mkdir()
    proc = torchrun_cmd(["fxpress.cli", *common, "--out", str(two / "model.onnx"),
                         "--report-json", str(two / "report.json")], two, module=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.count("compressed ") == 1           # one report: rank 0's
    assert sorted(p.name for p in two.iterdir()) == ["model.onnx", "report.json"]
    report = json.loads((two / "report.json").read_text())
    calib = next(p for p in report["passes"] if p["name"] == "quant_calibrate")
    assert calib["stats"]["batches"] == 6                   # 3 per rank, counted over both

    assert main([*common, "--out", str(tmp_path / "one.onnx")]) == 0
    capsys.readouterr()
    one, dist = _initializers(tmp_path / "one.onnx"), _initializers(two / "model.onnx")
    assert one.keys() == dist.keys() and one
    assert all(np.array_equal(one[k], dist[k]) for k in one)
