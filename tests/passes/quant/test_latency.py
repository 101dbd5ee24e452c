"""The latency service and Quantize(latency_check="auto"): keep float where int8 is slower, cache.

Decisions come from a fake timer (a dict of ms per form), so the tests are structural: they
say which layers were kept float for given timings, and that a second ask is served from
the in-memory and the on-disk cache without timing. One test runs the real builders once
(tiny shapes) to check they lower the layer's two forms to the backend's kernels.
"""
import json

import torch
import torch.nn as nn

import fxpress
from fxpress.ir.meta import LayerChoice, get_record
from fxpress.latency import LatencyService, default_timer
from fxpress.passes.quant.latency_check import layer_builders

qd = torch.ops.quantized_decomposed
aten = torch.ops.aten


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.Conv2d(3, 8, 3, padding=1)
        self.big = nn.Conv2d(8, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4 * 4, 4)

    def forward(self, x):
        y = torch.relu(self.small(x))
        y = torch.relu(self.big(y))
        return self.fc(torch.flatten(y, 1))


def _data():
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(2, 3, 4, 4, generator=g),) for _ in range(2)]


class FakeTimer:
    """ms per (layer input channels, form): int8 slower than float for the 3-channel conv only."""

    def __init__(self):
        self.calls = []

    def __call__(self, keys, builders):
        self.calls.append(keys)
        out = {}
        for form, key in keys.items():
            cin = key.shapes[0][1]
            slow_int8 = cin == 3
            out[form] = {"float": 1.0, "int8": 2.0 if slow_int8 else 0.5}[form]
        return out


def _float_layers(gm):
    """Modules whose weight is still a float get_attr feeding the op (not a dequantize)."""
    out = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in (aten.conv2d.default, aten.linear.default) \
                and n.args[1].op == "get_attr":
            out.add(str(n.args[1].target).rsplit(".", 1)[0])
    return out


def test_keeps_a_layer_float_when_the_timer_says_int8_is_slower(tmp_path):
    timer = FakeTimer()
    svc = LatencyService("inductor", timer=timer, cache_dir=tmp_path)
    q = fxpress.Quantize(mode="static", latency_check="auto")
    cfg_passes = q.passes()
    # the service is the pass's: swap in ours (same config otherwise)
    from dataclasses import replace

    from fxpress.passes.quant.latency_check import LatencyCheck
    cfg_passes = [replace(p, service=svc) if isinstance(p, LatencyCheck) else p for p in cfg_passes]
    assert sum(isinstance(p, LatencyCheck) for p in cfg_passes) == 1
    cm = fxpress.compress(Net().eval(), _data()[0], cfg_passes, calibration=_data())
    gm = cm.graph_module
    assert _float_layers(gm) == {"small"}
    dq_w = [n for n in gm.graph.nodes if n.target is qd.dequantize_per_channel.default]
    assert len(dq_w) == 2                                  # big and fc stay int8
    rows = {r["module"]: r for r in cm.report.sections["quant_latency"]["layers"]}
    assert rows["small"]["kept"] == "float" and (rows["small"]["float_ms"], rows["small"]["int8_ms"]) == (1.0, 2.0)
    assert rows["big"]["kept"] == "int8" and (rows["big"]["float_ms"], rows["big"]["int8_ms"]) == (1.0, 0.5)
    assert rows["fc"]["kept"] == "int8"
    small = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default
                 and str(n.args[1].target) == "small.weight")
    assert get_record(small, LayerChoice) == LayerChoice("float", ("float", "int8"), (1.0, 2.0), "inductor")
    # numerics: the float layer is the fp32 layer (same output as a plain float conv would give)
    x = _data()[0][0]
    assert torch.isfinite(cm(x)).all()
    assert len(timer.calls) == 3 and svc.timed == 6

    # second ask: same service -> from memory; a fresh service on the same dir -> from disk
    n_calls = len(timer.calls)
    fxpress.compress(Net().eval(), _data()[0], cfg_passes, calibration=_data())
    assert len(timer.calls) == n_calls
    fresh = LatencyService("inductor", timer=timer, cache_dir=tmp_path)
    cfg2 = [replace(p, service=fresh) if isinstance(p, LatencyCheck) else p for p in cfg_passes]
    cm2 = fxpress.compress(Net().eval(), _data()[0], cfg2, calibration=_data())
    assert len(timer.calls) == n_calls and fresh.timed == 0 and fresh.hits == 6
    assert _float_layers(cm2.graph_module) == {"small"}
    on_disk = json.loads((tmp_path / "latency.json").read_text())
    assert len(on_disk) == 6 and all(fresh.isa in k and '"backend": "inductor"' in k for k in on_disk)


def test_cache_key_separates_isa_and_backend(tmp_path):
    from fxpress import hw
    timer = FakeTimer()
    with hw.simulate(flags={"avx2", "fma"}):
        a = LatencyService("inductor", timer=timer, cache_dir=tmp_path)
    b = LatencyService("inductor", timer=timer, cache_dir=tmp_path)     # this host
    c = LatencyService("onnxruntime", timer=timer, cache_dir=tmp_path)
    shapes = ((1, 8, 4, 4), (16, 8, 3, 3))
    for svc in (a, b, c):
        svc.compare("aten.conv2d.default", shapes, "float32", {"float": None, "int8": None})
    assert len(timer.calls) == 3 and a.isa != b.isa
    b.compare("aten.conv2d.default", shapes, "float32", {"float": None, "int8": None})
    assert len(timer.calls) == 3 and b.hits == 2


def test_latency_check_off_times_nothing():
    q = fxpress.Quantize(mode="static")
    assert q.latency_check == "off"
    from fxpress.passes.quant.latency_check import LatencyCheck
    assert not any(isinstance(p, LatencyCheck) for p in q.passes())


def test_real_builders_lower_both_forms_to_inductor_kernels():
    gm = fxpress.capture(Net().eval(), _data()[0])
    from fxpress.passes.analysis.shape_prop import propagate_shapes
    propagate_shapes(gm, _data()[0])
    big = next(n for n in gm.graph.nodes if n.target is aten.conv2d.default
               and str(n.args[1].target) == "big.weight")
    sig, builders = layer_builders(gm, big, "inductor")
    assert sig[0] == (2, 8, 4, 4) and sig[1] == (16, 8, 3, 3)
    f_run, (x,) = builders["float"]()
    q_run, _ = builders["int8"]()
    assert q_run.report["kernels"].get("qconv") == 1 and not f_run.report["kernels"]
    ref = torch.nn.functional.conv2d(x, gm.big.weight, gm.big.bias, 1, 1)
    torch.testing.assert_close(f_run(x), ref, rtol=1e-4, atol=1e-4)
    # int8 form: within a few quantization steps of fp32 (activation step 0.05)
    assert float((q_run(x) - ref).abs().max()) < 0.5
    built = {"float": lambda: (f_run, (x,)), "int8": lambda: (q_run, (x,))}  # no second compile
    ms = default_timer({"float": None, "int8": None}, built, rounds=3)
    assert set(ms) == {"float", "int8"} and all(v > 0 for v in ms.values())
