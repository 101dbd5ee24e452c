"""Calibrate: run the observed graph on calibration batches so every observer sees real data.

Batches are checked against the graph's inputs first (count, dtype, rank, the dims the IR's
signature does not declare dynamic: the batch by default, a sequence length where
``compress(..., dynamic_shapes=...)`` says so):
a mismatch is an InputError naming the input and the batch. An empty calibration, or an
observer that no batch reached, is a CalibrationError (never a silent min = max = 0).

Under a process group (fxpress.distributed) the calibration iterable is this rank's shard:
the batch/sample limits count all ranks' batches (round-robin order), and the observers are
merged after the last batch, so every rank records the statistics one process would.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ... import distributed
from ...errors import CalibrationError, InputError
from ...ir.meta import set_record
from ...utils import iter_batches
from ..base import Pass, PassContext, PassResult
from .insert_observers import observer_nodes

__all__ = ["Calibrate", "check_batch", "calibration_batches"]


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _batch_leaves(gm: fx.GraphModule, batch, n: int) -> list:
    """The batch's tensors in placeholder order (a dict batch of a keyword-captured model by its
    keys, positional batches as they are)."""
    from ...ir.signature import flatten_call
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None:
        try:
            return flatten_call(info.in_spec, tuple(batch), {})
        except InputError:
            pass
    return torch.utils._pytree.tree_leaves(batch)


def check_batch(gm: fx.GraphModule, batch: tuple, index: int) -> list[torch.Tensor]:
    """Flatten one batch and check it against the graph's placeholders; InputError names the input."""
    phs = _placeholders(gm)
    flat = _batch_leaves(gm, batch, len(phs))
    if len(flat) != len(phs):
        raise InputError(f"calibration batch {index} has {len(flat)} input tensor(s); the model "
                         f"takes {len(phs)} ({', '.join(p.name for p in phs)})", index=index)
    dynamic = _dynamic_dims(gm)
    for k, (ph, x) in enumerate(zip(phs, flat)):
        v = ph.meta.get("val")
        if not isinstance(v, torch.Tensor):
            continue
        if not isinstance(x, torch.Tensor):
            raise InputError(f"calibration batch {index}: input {ph.name!r} is a "
                             f"{type(x).__name__}, expected a tensor", input_name=ph.name, index=index)
        if x.dtype != v.dtype:
            raise InputError(f"calibration batch {index}: input {ph.name!r} has dtype "
                             f"{str(x.dtype).replace('torch.', '')}, the model was captured with "
                             f"{str(v.dtype).replace('torch.', '')}", input_name=ph.name, index=index)
        free = {0} | (dynamic[k] if k < len(dynamic) else set())
        if x.dim() != v.dim() or any(a != b for d, (a, b) in enumerate(zip(x.shape, v.shape))
                                     if d not in free):
            which = ", ".join(str(d) for d in sorted(free)) or "none"
            raise InputError(f"calibration batch {index}: input {ph.name!r} has shape "
                             f"{list(x.shape)}, the model was captured with {list(v.shape)} "
                             f"(only its dynamic dims may differ: {which}; declare more with "
                             "compress(..., dynamic_shapes=...))", input_name=ph.name, index=index)
    return flat


def _dynamic_dims(gm: fx.GraphModule) -> list[set[int]]:
    """Per placeholder, the dims the IR's signature records as dynamic (capture's batch dim, the
    user's dynamic_shapes). The leading (batch) dim is always free: calibration batches of
    another batch size were always accepted."""
    from ...ir.signature import KEY
    sig = getattr(gm, "meta", {}).get(KEY)
    if sig is None:
        return []
    return [set(d) for d in sig.dynamic_dims()]


def calibration_batches(ctx: PassContext, cfg, *, required: bool):
    """Up to cfg.calib_batches batches (else about cfg.calib_samples samples) as input tuples."""
    data = ctx.calibration
    if data is None:
        if required:
            raise CalibrationError("static quantization needs calibration data: "
                                   "compress(..., calibration=batches) with an iterable of input "
                                   "batches (a DataLoader works); ~200 samples is enough")
        data = [ctx.example_inputs]
    elif iter(data) is data:  # a one-shot iterator: keep it, later passes read the batches again
        data = ctx.calibration = list(data)
    samples = 0
    n_inputs = len(torch.utils._pytree.tree_leaves(tuple(ctx.example_inputs))) or None
    w = distributed.world()
    if w is not None:
        yield from distributed.lockstep(iter(iter_batches(data, n_inputs)), w,
                                        max_batches=cfg.calib_batches, max_samples=cfg.calib_samples)
        return
    for i, b in enumerate(iter_batches(data, n_inputs)):
        if cfg.calib_batches is not None and i >= cfg.calib_batches:
            return
        if cfg.calib_batches is None and samples >= cfg.calib_samples:
            return
        yield i, b
        first = next((t for t in torch.utils._pytree.tree_leaves(b) if isinstance(t, torch.Tensor)), None)
        samples += int(first.shape[0]) if first is not None and first.dim() else 1


@dataclass(frozen=True)
class Calibrate(Pass):
    """Feed calibration batches through the observed graph; record ObserverStats on observer nodes."""

    name: ClassVar[str] = "quant_calibrate"
    config: Any = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from ...progress import bar
        from .config import Quantize
        cfg = self.config or Quantize()
        obs = observer_nodes(gm)
        mods = {id(m): m for _, m in obs}.values()
        for m in mods:
            m.observing = True
        was_training = gm.training
        if cfg.mode == "qat":
            gm.eval()  # BN running statistics are not calibration's to change
        n_batches = n_samples = 0
        try:
            with torch.no_grad():
                batches = calibration_batches(ctx, cfg, required=cfg.mode == "static")
                for i, b in bar(batches, desc="calibrating", unit="batch"):
                    flat = check_batch(gm, b, i)
                    for m in mods:  # moving averages record it: a merge replays batch order
                        m.batch_index = i
                    gm(*b)
                    n_batches += 1
                    n_samples += int(flat[0].shape[0]) if flat and flat[0].dim() else 1
        finally:
            if cfg.mode == "qat":
                gm.train(was_training)
                for m in mods:
                    m.observing = False  # QAT: observe again only in training steps
        w = distributed.world()
        if w is not None:  # every rank's shard merged into every observer
            distributed.synchronize(mods, w)
            n_batches, n_samples = (sum(v) for v in zip(*distributed.gather((n_batches, n_samples), w)))
        if n_batches == 0:
            raise CalibrationError("calibration is empty: the iterable gave no batches, so no "
                                   "activation range can be observed")
        for m in mods:  # the samples calibration had (a tensor's dim 0 may be a broadcast 1)
            m.calib_samples, m._cached = n_samples, None
        for node, m in obs:
            if getattr(m, "is_dynamic", False):
                continue
            if m.num_batches == 0:
                raise CalibrationError(f"the observer of node {node.args[0].name!r} saw no data "
                                       "during calibration (the batches never reached it)")
            set_record(node, m.stats())
        return PassResult(gm, False, {"batches": n_batches, "samples": n_samples,
                                      "observers": len(obs)})
