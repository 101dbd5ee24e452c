"""Inductor's int8 kernels compute what the quantized IR says (>= 25 dB SQNR vs the IR).

ConvNeXt-, ResNeXt- and ViT-style nets, statically quantized with ``fxpress.Quantize``, are
lowered to Inductor (oneDNN qconv / qlinear) and compared with the IR run in PyTorch.

Where the kernels differed from the IR (16 / 24 / 10 dB on an AVX2 host): oneDNN's u8 x s8
kernels without VNNI sum two products into a saturating int16 (vpmaddubsw), so full-range
s8 weights clip; the IR's dequantize -> conv/linear never does. Weight forms chosen from
``fxpress.hw`` (passes/quant/weight_form.py: s7 or pair-safe s8 without VNNI) make those
kernels exact. The AVX2 kernels are exercised on any x86 host by running oneDNN with
``ONEDNN_MAX_CPU_ISA=AVX2`` in a child process (it is read once, at oneDNN's start).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
AVX2 = ("avx", "avx2", "fma", "f16c")
VNNI = AVX2 + ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
MIN_DB = 25.0


class _CNBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.dw = nn.Conv2d(d, d, 7, padding=3, groups=d)
        self.norm = nn.LayerNorm(d)
        self.pw1, self.act, self.pw2 = nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d)
        self.gamma = nn.Parameter(torch.full((d,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.pw2(self.act(self.pw1(self.norm(y)))) * self.gamma
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtish(nn.Module):
    """Patchify stem, depthwise 7x7 + LayerNorm + inverted MLP blocks with layer scale."""

    def __init__(self, d=16, n=1, classes=10):
        super().__init__()
        self.stem, self.stem_norm = nn.Conv2d(3, d, 4, stride=4), nn.GroupNorm(1, d)
        self.blocks = nn.Sequential(*[_CNBlock(d) for _ in range(n)])
        self.head_norm, self.head = nn.LayerNorm(d), nn.Linear(d, classes)

    def forward(self, x):
        y = self.blocks(self.stem_norm(self.stem(x)))
        return self.head(self.head_norm(y.mean((2, 3))))


class _XBlock(nn.Module):
    def __init__(self, cin, width, cout, groups, stride):
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.c2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.b2 = nn.BatchNorm2d(width)
        self.c3, self.b3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None if (cin == cout and stride == 1) else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        y = torch.relu(self.b2(self.c2(y)))
        y = self.b3(self.c3(y))
        return torch.relu(y + (x if self.down is None else self.down(x)))


class ResNeXtish(nn.Module):
    """Bottlenecks with grouped 3x3 convs (cardinality 4 / 8) and residual adds."""

    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.l1, self.l2 = _XBlock(16, 32, 32, 4, 1), _XBlock(32, 32, 32, 4, 1)
        self.l3 = _XBlock(32, 64, 64, 8, 2)
        self.fc = nn.Linear(64, classes)

    def forward(self, x):
        y = self.l3(self.l2(self.l1(self.stem(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 1), 1))


def _build(name: str):
    from tests.models import randomize_bn, vit
    torch.manual_seed(0)
    if name == "convnext":
        return ConvNeXtish().eval(), (2, 3, 32, 32)
    if name == "resnext":
        return randomize_bn(ResNeXtish()).eval(), (2, 3, 16, 16)
    return vit(hidden=32, layers=1, heads=4, image_size=16, patch=4).eval(), (2, 3, 16, 16)


def _tensor(y):
    return torch.cat([t.flatten() for t in torch.utils._pytree.tree_leaves(y)
                      if isinstance(t, torch.Tensor)])


def measure(name: str, flags: tuple | None) -> dict:
    """Quantize `name` for a host with `flags` (None: this host), lower to Inductor, compare."""
    import fxpress
    from fxpress import hw
    from fxpress.backends.inductor import compile_inductor
    from fxpress.passes.quant import sqnr_db
    model, shape = _build(name)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(*shape, generator=g),) for _ in range(4)]
    ctx = hw.simulate(flags=flags) if flags is not None else hw.override(hw.host())
    with ctx:
        cm = fxpress.compress(model, data[0], fxpress.Quantize(mode="static"), calibration=data)
    gm = cm.graph_module
    run = compile_inductor(gm, data[0])
    x = data[1][0]
    with torch.no_grad():
        ir, ind, fp = _tensor(gm(x)), _tensor(run(x)), _tensor(model(x))
    return {"net": name, "ind_vs_ir_db": min(sqnr_db(ir, ind), 999.0),
            "ir_vs_fp32_db": sqnr_db(fp, ir), "kernels": run.report.get("kernels", {}),
            "forms": sorted({r["form"] for r in cm.report.sections["quant_weight_forms"]})}


def test_inductor_matches_the_ir_on_this_host():
    # the host's own kernels and weight forms (VNNI: full-range s8; AVX2: s7 / pair-safe s8)
    r = measure("resnext", None)
    assert r["ind_vs_ir_db"] >= MIN_DB, r
    assert r["kernels"].get("qlinear", 0) + r["kernels"].get("qconv", 0) >= 2, r   # int8 ran
    assert r["ir_vs_fp32_db"] >= 15.0, r


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                    reason="oneDNN's AVX2 kernels exist on x86 only")
def test_avx2_kernels_match_the_ir_with_isa_aware_weight_forms():
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "PYTHONPATH": str(ROOT)}
    code = ("import json, sys; from tests.backends.test_inductor_numerics import measure as m; "
            "A = " + repr(AVX2) + "; V = " + repr(VNNI) + "; "
            "print('RESULT', json.dumps([m('convnext', A), m('resnext', A), m('vit', A), "
            "m('convnext', V)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=600, check=False)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line is not None, out.stderr[-3000:]
    *avx2, full = json.loads(line[len("RESULT "):])
    for r in avx2:  # 7-bit / pair-safe weights: the saturating kernels compute the IR exactly
        assert set(r["forms"]) <= {"s7", "s8_pairs"}, r
        assert r["ind_vs_ir_db"] >= MIN_DB, r
    # control: full-range s8 (what a VNNI host gets) clips in the same AVX2 kernels
    assert full["forms"] == ["s8"] and full["ind_vs_ir_db"] < MIN_DB, full
