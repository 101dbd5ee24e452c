"""Quiet by default, typed when wrong: no third-party warning lines from fxpress's calls into
torch, progress bars only where asked, unknown config fields as RecipeErrors."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fxpress

ROOT = Path(__file__).resolve().parents[2]

_RUN = textwrap.dedent("""
    import torch, fxpress
    from tests import models
    model, x = models.build("digits_cnn")
    cm = fxpress.compress(model, x, fxpress.Quantize(mode="static"), calibration=[x, x])
    for backend in ("onnxruntime", "inductor"):
        run = fxpress.lower(cm, backend)
        assert run(*x).shape == (2, 10)
    print("DONE")
""")


def test_compress_and_lower_print_no_third_party_warning_lines():
    """Python's default warning filters (no -W, no PYTHONWARNINGS), a fresh process."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS",)}
    env.update(PYTHONPATH=str(ROOT), FXPRESS_INDUCTOR_WRAPPER="python")
    p = subprocess.run([sys.executable, "-c", _RUN], capture_output=True, text=True, env=env,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr[-3000:]
    assert p.stdout.strip().splitlines()[-1] == "DONE"
    lines = [ln for ln in (p.stdout + p.stderr).splitlines() if ln.strip() and ln.strip() != "DONE"]
    assert not [ln for ln in lines if "Warning" in ln or "torchvision" in ln or ln.startswith("W")], \
        "\n".join(lines[:20])


def test_progress_is_off_with_fxpress_progress_0_and_off_the_terminal(monkeypatch):
    from fxpress import progress
    monkeypatch.setenv("FXPRESS_PROGRESS", "0")
    assert progress.bar(range(3), desc="x").disable
    monkeypatch.setenv("FXPRESS_PROGRESS", "1")  # forced on, even off a terminal (CI logs)
    assert not progress.bar(range(3), desc="x").disable
    monkeypatch.delenv("FXPRESS_PROGRESS")
    with progress.quiet():
        assert progress.bar(range(3), desc="x").disable


def test_unknown_config_field_is_a_recipe_error_with_did_you_mean():
    with pytest.raises(fxpress.RecipeError, match=r"unknown option 'moed' for Quantize \(did you mean 'mode'\?\)") as e:
        fxpress.Quantize(moed="static")
    assert e.value.field == "moed" and "mode" in e.value.accepted and "observer" in e.value.accepted
    with pytest.raises(fxpress.RecipeError, match=r"did you mean 'ratio'"):
        fxpress.ChannelPruning(ration=0.5)
    with pytest.raises(fxpress.RecipeError, match=r"unknown option 'moed' for 'quantize' \(did you mean 'mode'\?\)"):
        fxpress.Recipe.from_list([{"quantize": {"moed": "static"}}])
    assert fxpress.Quantize(mode="dynamic").mode == "dynamic"  # known fields still work
