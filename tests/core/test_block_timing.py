"""fxpress.timing.block_times (bench/run.py's and the demo's timing): per-runner blocks, rotated
order, warm-up calls untimed; the demo re-times each backend's rows that way."""
from __future__ import annotations

import time

from fxpress.commands.demo import _retime
from fxpress.commands.demo_report import Row
from fxpress.timing import block_medians, block_times


def test_blocks_call_each_runner_in_turn_and_time_only_the_timed_calls():
    log = []

    def runner(name, sleep_s):
        def f(*args):
            log.append(name)
            time.sleep(sleep_s)
        return f

    fns = {"a": runner("a", 0.0), "b": runner("b", 0.004)}
    times = block_times(fns, (), rounds=3, warm=2, timed=3, pause_s=0.0)
    assert {n: len(v) for n, v in times.items()} == {"a": 9, "b": 9}
    # blocks of warm + timed calls, the order rotated each round: a a a a a b b b b b | b.. a..
    assert log[:5] == ["a"] * 5 and log[5:10] == ["b"] * 5 and log[10:15] == ["b"] * 5
    assert min(times["b"]) >= 0.004 > max(times["a"])  # the sleeps are what was timed
    ms = block_medians(fns, (), rounds=2, warm=1, timed=2)
    assert ms["b"] >= 4.0 > ms["a"]


def test_demo_retimes_each_backend_in_blocks():
    calls = {"ort_a": 0, "ort_b": 0, "ind": 0}

    def runner(name):
        def f(*args):
            calls[name] += 1
        return f

    rows = [Row("fp32", "onnxruntime", 1, 1.0, 1, float("nan")),
            Row("int8", "onnxruntime", 1, 1.0, 1, float("nan")),
            Row("int8", "inductor", 1, 1.0, 1, float("nan"))]
    out = _retime(rows, [runner("ort_a"), runner("ort_b"), runner("ind")], (), rounds=6)
    assert all(r.latency_ms >= 0 for r in out) and all(r.latency_ms == r.latency_ms for r in out)
    assert calls == {"ort_a": 15, "ort_b": 15, "ind": 15}  # 3 rounds x (2 warm-up + 3 timed)
    assert [r.step for r in out] == [r.step for r in rows] and rows[0].latency_ms != rows[0].latency_ms
