"""The small training loop every distillation mode shares: data, optimiser, modes, progress.

A batch is an input tuple, optionally followed by integer class labels:
``(x,)``, ``x``, ``(x, y)`` for a one-input model. Labels are used for the
hard-label cross-entropy term when present; without them the losses are purely
distillation losses (the teacher, the peers or the deepest exit supply targets).

A student wrapped in DistributedDataParallel is accepted: the trainers run its inner module
(taps, exits and peers are outside what DDP's forward sees) and average the gradients over
the DDP's process group after each backward, as DDP would; modules a trainer creates on each
rank (hint adapters, exit heads) and the peers start from rank 0's values. Each rank's data
is its shard.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

from ... import distributed
from ...errors import CalibrationError
from ...registry import check_choice, check_range
from ...utils import split_labels

__all__ = [
    "Schedule",
    "cross_entropy",
    "data_parallel",
    "gradient_sync",
    "first_output",
    "num_inputs",
    "reiterable",
    "run_epochs",
    "split_batch",
    "trainable_parameters",
    "training_mode",
]


@dataclass(frozen=True)
class Schedule:
    """How long and how fast to train: epochs over the data, optimiser, learning rate."""

    epochs: int = 3
    lr: float = 1e-3
    optimizer: str = "adam"
    weight_decay: float = 0.0
    max_steps: int | None = None  # stop early after this many optimiser steps in total
    lr_decay: str = "cosine"      # cosine: anneal to 0 over the epochs (short budgets end better)

    def __post_init__(self):
        check_range("epochs", self.epochs, 1, 10_000)
        check_range("lr", self.lr, 0.0, 10.0, lo_open=True)
        check_choice("optimizer", self.optimizer, ["adam", "adamw", "sgd"])
        check_range("weight_decay", self.weight_decay, 0.0, 1.0)
        check_choice("lr_decay", self.lr_decay, ["cosine", "none"])
        if self.max_steps is not None:
            check_range("max_steps", self.max_steps, 1)

    def make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        if not params:
            raise CalibrationError("nothing to train: the module has no floating-point parameters "
                                   "that require grad")
        if self.optimizer == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=0.9, weight_decay=self.weight_decay)
        cls = torch.optim.AdamW if self.optimizer == "adamw" else torch.optim.Adam
        return cls(params, lr=self.lr, weight_decay=self.weight_decay)


def num_inputs(module: torch.nn.Module) -> int | None:
    """Flat input count of a graph module (its placeholders); None for eager modules."""
    gm = getattr(module, "graph_module", module)
    if isinstance(gm, fx.GraphModule):
        return sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    return None


def split_batch(batch: Any, n_inputs: int | None) -> tuple[tuple, torch.Tensor | None]:
    """(inputs, labels): the last element is labels when it is an integer tensor beyond the inputs."""
    return split_labels(batch, n_inputs)


def reiterable(data: Any) -> Iterable:
    """`data` such that it can be iterated once per epoch (one-shot iterators are materialised)."""
    if data is None:
        raise CalibrationError("distillation needs training data: pass `data=` or calibration batches")
    if callable(data) and not isinstance(data, torch.utils.data.DataLoader):
        data = data()
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, Iterator) or iter(data) is data:
        data = list(data)
    return data


def trainable_parameters(*modules: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Distinct floating-point parameters that require grad (int8 weights of a quantized graph are
    buffers or integer tensors and stay frozen)."""
    seen, out = set(), []
    for m in modules:
        for p in m.parameters():
            if p.requires_grad and p.is_floating_point() and id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


class training_mode:
    """Context manager: put eager modules in train (or eval) mode and restore their modes after.

    Exported graph modules refuse ``.train()``: their batch-norm and dropout behaviour is
    fixed in the graph (captured in eval mode, so BN statistics stay frozen while the
    weights fine-tune), and they are left as they are.
    """

    def __init__(self, modules: Sequence[torch.nn.Module], training: bool = True):
        self.modules, self.training = list(modules), training
        self.saved: list[tuple[torch.nn.Module, bool]] = []

    def __enter__(self):
        for m in self.modules:
            for sub in m.modules():
                self.saved.append((sub, sub.training))
            try:
                m.train(self.training)
            except NotImplementedError:  # exported GraphModule
                pass
        return self

    def __exit__(self, *exc):
        for sub, was in self.saved:
            sub.training = was
        return False


def data_parallel(module: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """(module to train, process group): a DDP-wrapped module's inner module and its group,
    anything else as it is with None."""
    return distributed.unwrap(module)


def gradient_sync(group: Any, params: Sequence[torch.nn.Parameter],
                  fresh: Sequence[torch.nn.Module] = ()) -> Callable[[], None] | None:
    """None without a process group; else `fresh` modules take rank 0's values now and the
    returned hook (run after each backward) averages `params`' gradients over `group`."""
    if group is None:
        return None
    for m in fresh:
        distributed.broadcast_module(m, group)
    return lambda: distributed.average_gradients(params, group)


def first_output(out: Any) -> torch.Tensor:
    """The logits of a model output: the tensor itself, or the first tensor leaf."""
    if isinstance(out, torch.Tensor):
        return out
    leaves = [x for x in torch.utils._pytree.tree_leaves(out) if isinstance(x, torch.Tensor)]
    if not leaves:
        raise CalibrationError("model output holds no tensor to distil")
    return leaves[0]


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    if labels is None:
        return logits.new_zeros(())
    return F.cross_entropy(logits, labels)


def run_epochs(step: Callable[[tuple, torch.Tensor | None], dict[str, torch.Tensor]],
               optimizers: Sequence[torch.optim.Optimizer], data: Iterable, schedule: Schedule,
               n_inputs: int | None, *, progress: Callable[[int, dict], None] | None = None,
               desc: str = "distill",
               after_backward: Callable[[], None] | None = None) -> list[dict[str, float]]:
    """Run `step(inputs, labels) -> {"loss": ..., other terms}` over `data` for the schedule.

    Each loss dict's "loss" is back-propagated (then `after_backward()`, e.g. the gradient
    average of gradient_sync); the optimisers step after each batch.
    Returns per-epoch means of every term.
    """
    history: list[dict[str, float]] = []
    steps = 0
    try:
        total = len(data) * schedule.epochs  # type: ignore[arg-type]
    except TypeError:
        total = None
    if schedule.max_steps is not None:
        total = min(total, schedule.max_steps) if total else schedule.max_steps
    scheds = [torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=total)
              for o in optimizers] if schedule.lr_decay == "cosine" and total else []
    bar = _bar(schedule, data, desc) if progress is None else None
    for epoch in range(schedule.epochs):
        sums: dict[str, float] = {}
        count = 0
        for batch in data:
            inputs, labels = split_batch(batch, n_inputs)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            terms = step(inputs, labels)
            loss = terms["loss"]
            if not torch.isfinite(loss):
                raise CalibrationError(f"distillation loss became {loss.item()} at epoch {epoch}, "
                                       f"step {steps}: lower the learning rate")
            loss.backward()
            if after_backward is not None:
                after_backward()
            for opt in optimizers:
                opt.step()
            for sc in scheds:
                sc.step()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            count += 1
            steps += 1
            if bar is not None:
                bar.update(1)
            if schedule.max_steps is not None and steps >= schedule.max_steps:
                break
        if count == 0:
            raise CalibrationError("distillation data yielded no batches")
        history.append({k: v / count for k, v in sums.items()})
        if progress is not None:
            progress(epoch, history[-1])
        elif bar is not None:
            bar.set_postfix(loss=f"{history[-1]['loss']:.4f}")
        if schedule.max_steps is not None and steps >= schedule.max_steps:
            break
    if bar is not None:
        bar.close()
    return history


def _bar(schedule: Schedule, data: Iterable, desc: str):
    """A tqdm bar when stderr is a terminal; silent (None) in tests and pipes."""
    import sys
    if not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm
    try:
        total = len(data) * schedule.epochs  # type: ignore[arg-type]
    except TypeError:
        total = None
    return tqdm(total=total, desc=desc, leave=False)
