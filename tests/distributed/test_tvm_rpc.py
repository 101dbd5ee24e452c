"""TVM MetaSchedule tuning over RPC: a tracker and two servers on 127.0.0.1 (subprocesses).

Tuning through the tracker writes records to the same database a later compile reuses
without tuning; a tracker that is not there is a LoweringError naming host and port.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

import fxpress
from fxpress.errors import LoweringError

tvm = pytest.importorskip("tvm")
from fxpress.backends.tvm import TuneOptions, compile_tvm
from fxpress.backends.tvm.tune import tracker_servers

KEY = "fxpress-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _rpc_cluster(servers: int = 2, start_timeout_s: float = 90.0):
    """A tracker and `servers` RPC servers registered under KEY; all stopped on exit."""
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "tvm.exec.rpc_tracker", "--host", "127.0.0.1",
                               "--port", str(port), "--port-end", str(port + 1), "--silent"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)]
    # servers start with the tracker (each imports TVM: seconds on 2 busy cores) and retry
    # their registration until it listens
    for _ in range(servers):
        sport = _free_port()
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "tvm.exec.rpc_server", "--host", "127.0.0.1", "--port", str(sport),
             "--port-end", str(sport + 1), "--tracker", f"127.0.0.1:{port}", "--key", KEY, "--silent"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True))
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or procs[0].poll() is not None:
                    pytest.fail("the TVM RPC tracker did not start")
                time.sleep(0.5)
        from tvm import rpc
        while True:  # every server registered
            info = rpc.connect_tracker("127.0.0.1", port).summary().get("queue_info", {}).get(KEY, {})
            if int(info.get("free", 0)) >= servers:
                break
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                pytest.fail(f"the RPC servers did not register with the tracker: {info}")
            time.sleep(0.5)
        yield port
    finally:  # each in its own session: its group holds the session processes a server forked
        for p in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait()


def test_tuning_through_tracker_writes_records_a_later_compile_reuses(tmp_path):
    model = nn.Sequential(nn.Linear(32, 32)).eval()
    inputs = (torch.randn(4, 32),)
    gm = fxpress.capture(model, inputs)
    with _rpc_cluster(2) as port:
        assert tracker_servers("127.0.0.1", port, KEY) == 2
        opts = TuneOptions(trials=4, trials_per_round=4, time_budget_s=90, population=16,
                           cache_dir=str(tmp_path), progress=False, tracker=("127.0.0.1", port, KEY))
        first = compile_tvm(gm, inputs, tune=opts)
        t = first.report["tuning"]
        # measured on the servers: one task, a round of 4 candidates, records written
        assert not t["cached"] and t["tasks"] == 1 and t["records"] >= 1, t
        assert t["runner"] == f"rpc 127.0.0.1:{port} key {KEY} (2 servers)", t
        assert t["failed"] < t["measured"], t
    # the cluster is gone: the second compile reads the database and starts no search
    again = compile_tvm(gm, inputs, tune=TuneOptions(trials=4, cache_dir=str(tmp_path), progress=False))
    assert again.report["tuning"]["cached"] and again.report["tuning"]["trials"] == 0
    assert again.report["schedules"]["tuned"] >= 1
    with torch.no_grad():
        torch.testing.assert_close(again(*inputs), gm(*inputs), atol=1e-4, rtol=1e-4)


def test_unreachable_tracker_is_lowering_error_naming_host_and_port():
    port = _free_port()  # nothing listens there
    gm = fxpress.capture(nn.Linear(4, 4).eval(), (torch.randn(2, 4),))
    opts = TuneOptions(trials=4, progress=False, use_cache=False, tracker=("127.0.0.1", port, KEY),
                       rpc_timeout_s=2)
    with pytest.raises(LoweringError, match=f"127.0.0.1:{port}.*cannot be reached"):
        compile_tvm(gm, (torch.randn(2, 4),), tune=opts)


def test_tracker_option_validated():
    with pytest.raises(fxpress.RecipeError, match="tracker"):
        TuneOptions(tracker=("127.0.0.1", "9190", KEY))
    with pytest.raises(fxpress.RecipeError, match="tracker"):
        TuneOptions(tracker=("127.0.0.1", 9190))
    assert TuneOptions(tracker=["h", 1, "k"]).tracker == ("h", 1, "k")
