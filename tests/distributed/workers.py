"""Scenarios run on every rank under torchrun (see launch.py); each rank saves <scenario>.rank<r>.pt.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/workers.py calibration recipes

Rank 0 also computes the single-process reference inside ``fxpress.distributed.local()``
(same process, same thread count, so "bit-identical" compares like with like).
"""
from __future__ import annotations

import faulthandler
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fxpress
from fxpress import distributed
from fxpress.ir.meta import ObserverStats, get_record
from tests.digits import accuracy, batches, digits_data, trained_digits_cnn
from tests.models import digits_cnn

qd = torch.ops.quantized_decomposed
DYN = ({0: torch.export.Dim("batch")},)


def _trained():
    """The test session's trained DigitsCNN (launch.py saves it; training it again per rank
    would cost more than the scenario)."""
    path = Path(os.environ["FXPRESS_TEST_OUT"]) / "model.pt"
    if not path.exists():
        return trained_digits_cnn()
    model = digits_cnn(width=16)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


def qparams(cm) -> dict:
    """Everything calibration decides: observer stats, Q/DQ literals, the IR's tensors."""
    gm = cm.graph_module
    stats, literals = {}, {}
    for n in gm.graph.nodes:
        rec = get_record(n, ObserverStats)
        if rec is not None:
            stats[n.name] = (rec.scale.clone(), rec.zero_point.clone(), rec.num_batches)
        if n.op == "call_function" and n.target is qd.quantize_per_tensor.default:
            literals[n.name] = (n.args[1], n.args[2])
    state = {k: v.detach().clone() for k, v in gm.state_dict().items()}
    return {"stats": stats, "literals": literals, "state": state}


def calibration(w, out: Path) -> dict:
    model = _trained()
    (xtr, _), _ = digits_data()
    data = batches(xtr[:400], 50)                           # 8 batches
    configs = {
        # calib_samples=200 (default): one process stops after 4 batches; so must the ranks
        "minmax": fxpress.Quantize(mode="static", observer="minmax"),
        "moving_average": fxpress.Quantize(mode="static", observer="moving_average", calib_batches=8),
        "histogram": fxpress.Quantize(mode="static", observer="histogram", calib_batches=8),
        "mse": fxpress.Quantize(mode="static", observer="mse", calib_batches=8),
        "entropy": fxpress.Quantize(mode="static", observer="entropy", calib_batches=8),
        "smooth": fxpress.Quantize(mode="static", observer="minmax", smooth=0.5, calib_batches=8),
    }
    res = {name: qparams(fxpress.compress(model, xtr[:50], q, calibration=distributed.shard(data)))
           for name, q in configs.items()}
    # rank 1's shard is empty: the result is one process calibrating on rank 0's batches
    hist = configs["histogram"]
    mine = data[:3] if w.rank == 0 else []
    res["empty"] = qparams(fxpress.compress(model, xtr[:50], hist, calibration=mine))
    if w.rank == 0:
        with distributed.local():
            res["ref"] = {name: qparams(fxpress.compress(model, xtr[:50], q, calibration=data))
                          for name, q in configs.items()}
            res["ref"]["empty"] = qparams(fxpress.compress(model, xtr[:50], hist, calibration=data[:3]))
    return res


def _qat_train(cm, net, xtr, ytr, rows: slice, steps: int = 28) -> None:
    """The user's loop: the same global batches of 64 every run; each rank takes its `rows`."""
    opt = torch.optim.Adam(net.parameters(), lr=3e-4)
    perm = torch.randperm(len(ytr), generator=torch.Generator().manual_seed(0))
    cm.train()
    for step in range(steps):
        idx = perm[(step * 64) % (len(ytr) - 64):][:64][rows]
        loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    cm.eval()


def qat(w, out: Path) -> dict:
    model = _trained()
    (xtr, ytr), (xte, yte) = digits_data()
    q = fxpress.Quantize(mode="qat", freeze_bn_after=20)
    calib = batches(xtr, 64, limit=4)
    cm = fxpress.compress(model, xtr[:32], q, calibration=distributed.shard(calib),
                          dynamic_shapes=DYN)
    _qat_train(cm, DDP(cm), xtr, ytr, slice(32 * w.rank, 32 * w.rank + 32))
    conv = fxpress.convert(cm)
    res = {"params": {k: v.detach().clone() for k, v in cm.named_parameters()},
           "q": qparams(conv), "acc": accuracy(conv, xte, yte, batch=50)}
    if w.rank == 0:
        with distributed.local():
            one = fxpress.compress(model, xtr[:32], q, calibration=calib, dynamic_shapes=DYN)
            _qat_train(one, one, xtr, ytr, slice(0, 64))
            res["ref_acc"] = accuracy(fxpress.convert(one), xte, yte, batch=50)
    res["fp32_acc"] = accuracy(model, xte, yte)
    return res


def distill(w, out: Path) -> dict:
    teacher = _trained()
    (xtr, ytr), (xte, yte) = digits_data()
    student = fxpress.compress(teacher, xtr[:32], fxpress.ChannelPruning(ratio=0.5),
                               dynamic_shapes=DYN)
    before = accuracy(student, xte, yte)
    init = {k: v.detach().clone() for k, v in student.named_parameters()}
    data = distributed.shard([(xtr[i:i + 32], ytr[i:i + 32]) for i in range(0, 32 * 24, 32)])
    ft = fxpress.distill.offline(teacher, data, epochs=1, lr=1e-3, hints=["conv2"])
    hist = ft(DDP(student))
    # self distillation: exit heads created on each rank start from rank 0's
    own = fxpress.compress(teacher, xtr[:32], fxpress.ChannelPruning(ratio=0.25), dynamic_shapes=DYN)
    fxpress.distill.self_distill(data, epochs=1, lr=1e-3, max_steps=6)(DDP(own))
    return {"params": {k: v.detach().clone() for k, v in student.named_parameters()}, "init": init,
            "self": {k: v.detach().clone() for k, v in own.named_parameters()},
            "history": hist["history"], "adapter_init": hist["adapter_init"],
            "before": before, "after": accuracy(student, xte, yte)}


def recipes(w, out: Path) -> dict:
    """Rank 1 asks for another observer: every rank must refuse, naming rank 1 and the field."""
    model = _trained()
    (xtr, _), _ = digits_data()
    q = fxpress.Quantize(mode="static", observer=("histogram", "minmax")[w.rank])
    try:
        fxpress.compress(model, xtr[:50], q, calibration=distributed.shard(batches(xtr[:200], 50)))
    except fxpress.RecipeError as e:
        return {"error": str(e), "field": e.field}
    return {"error": None}


def prune(w, out: Path) -> dict:
    """Iterative Taylor pruning on shards that disagree (rank 1's is noise): the decisions are
    rank 0's on every rank, not each rank's own."""
    model = _trained()
    (xtr, _), _ = digits_data()
    data = batches(xtr[:200], 50) if w.rank == 0 else \
        batches(torch.rand(200, 1, 8, 8, generator=torch.Generator().manual_seed(1)), 50)
    cfg = fxpress.ChannelPruning(ratio=0.5, importance="taylor", schedule="iterative", steps=2,
                                 round_to=1)

    def shapes(cm):
        return {k: tuple(v.shape) for k, v in cm.graph_module.state_dict().items()}

    cm = fxpress.compress(model, xtr[:50], cfg, calibration=data)
    with distributed.local():
        alone = fxpress.compress(model, xtr[:50], cfg, calibration=data)
    return {"shapes": shapes(cm), "state": {k: v.clone() for k, v in cm.graph_module.state_dict().items()},
            "alone": {k: v.clone() for k, v in alone.graph_module.state_dict().items()},
            "alone_shapes": shapes(alone)}


SCENARIOS = {f.__name__: f for f in (calibration, qat, distill, recipes, prune)}


def main() -> int:
    # A native abort (CI once saw rank 0 end in "terminate called without an active exception",
    # with no Python frame) prints the Python and C++ stacks of every thread.
    faulthandler.enable(all_threads=True)
    torch._C._set_print_stack_traces_on_fatal_signal(True)
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    w = distributed.world()
    out = Path(os.environ["FXPRESS_TEST_OUT"])
    try:
        for name in sys.argv[1:]:
            torch.save(SCENARIOS[name](w, out), out / f"{name}.rank{w.rank}.pt")
            print(f"rank {w.rank}: {name} saved", flush=True)
        # No rank tears its gloo pairs down while the other is still inside a collective.
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter finalization: the results are saved and the group destroyed; static
    # destructors of the native thread pools are not what these tests check.
    os._exit(code)
