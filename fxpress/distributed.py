"""Scale-out on torch.distributed: sharded calibration, synchronized fake-quant, DDP fine-tuning.

Under an initialized process group (``torchrun``, ``dist.init_process_group``) fxpress treats
each rank's calibration iterable as that rank's *shard* of the data and merges what the
observers saw with collectives, so every rank ends with the IR one process would build from
all the shards (taken round-robin: rank r's i-th batch is batch ``i * world + r``, the order
:func:`shard` produces).

    dist.init_process_group("gloo")                       # torchrun set the env
    mine = fxpress.distributed.shard(all_batches)         # or your own split
    cm = fxpress.compress(model, x, fxpress.Quantize(mode="static"), calibration=mine)
    # every rank: the same scales and zero points as one process calibrating on all_batches

Inside :func:`local` fxpress ignores the process group (e.g. one rank compressing alone).
A process group of size 1 is treated as no process group.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import CalibrationError, RecipeError

__all__ = [
    "World",
    "average_gradients",
    "broadcast",
    "broadcast_module",
    "check_same_recipe",
    "gather",
    "global_range",
    "init_from_env",
    "local",
    "lockstep",
    "shard",
    "synchronize",
    "unwrap",
    "world",
]

_LOCAL = contextvars.ContextVar("fxpress_distributed_local", default=False)


@dataclass(frozen=True)
class World:
    """This process's place in the process group fxpress works under."""

    rank: int
    size: int
    group: Any = None   # None: the default (world) group


def world(group: Any = None) -> World | None:
    """The World when a process group of size > 1 is initialized (and not inside local())."""
    if _LOCAL.get() or not torch.distributed.is_available() \
            or not torch.distributed.is_initialized():
        return None
    size = torch.distributed.get_world_size(group)
    if size <= 1:
        return None
    return World(torch.distributed.get_rank(group), size, group)


@contextlib.contextmanager
def local():
    """Within this block fxpress calibrates, converts and prunes as one process would.

    >>> with fxpress.distributed.local():
    ...     cm = fxpress.compress(model, x, recipe, calibration=all_batches)   # no collectives
    """
    token = _LOCAL.set(True)
    try:
        yield
    finally:
        _LOCAL.reset(token)


def shard(batches: Iterable, w: World | None = None) -> list:
    """This rank's round-robin share of `batches` (every batch when not distributed).

    >>> shard(range(5), World(1, 2))
    [1, 3]
    """
    w = w or world()
    items = list(batches)
    return items if w is None else items[w.rank::w.size]


def gather(obj: Any, w: World) -> list:
    """`obj` from every rank, in rank order (all_gather_object)."""
    out: list = [None] * w.size
    torch.distributed.all_gather_object(out, obj, group=w.group)
    return out


def broadcast(obj: Any, w: World, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (broadcast_object_list)."""
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, group=w.group)
    return box[0]


def _first_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any] | None:
    """(path, a's value, b's value) where two recipe lists first differ, else None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{k}" if path else str(k)
            if k not in a or k not in b:
                return sub, a.get(k, "<absent>"), b.get(k, "<absent>")
            d = _first_difference(a[k], b[k], sub)
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return f"{path} (length)", len(a), len(b)
        for i, (x, y) in enumerate(zip(a, b)):
            d = _first_difference(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else (path, a, b)


def check_same_recipe(recipe: Any, w: World | None = None) -> None:
    """RecipeError on every rank when some rank's recipe differs from rank 0's (names the rank,
    the field and both values). Run before any pass: ranks with different recipes would
    otherwise run different collectives and hang, or silently build different IRs.

    >>> # rank 1 asked for observer="minmax", rank 0 for "histogram":
    >>> # RecipeError: rank 1's recipe differs from rank 0's at passes[0].quantize.observer:
    >>> #   rank 0 has 'histogram', rank 1 has 'minmax' (every rank must use the same recipe)
    """
    w = w or world()
    if w is None:
        return
    everyone = gather(recipe.to_list(), w)
    for r, theirs in enumerate(everyone[1:], start=1):
        d = _first_difference(everyone[0], theirs, "passes")
        if d is not None:
            where, ours, other = d
            raise RecipeError(f"rank {r}'s recipe differs from rank 0's at {where}: rank 0 has "
                              f"{ours!r}, rank {r} has {other!r} (every rank must compress with "
                              "the same recipe)", field=where, value=other)


def synchronize(observers: Iterable, w: World | None) -> None:
    """Merge every rank's statistics into each of `observers` (same modules, same order on every
    rank: the graph's observer order). One all_gather for all of them; a rank with an empty
    shard contributes nothing. No-op without a World."""
    if w is None:
        return
    mods = list(observers)
    everyone = gather([m.dist_state() for m in mods], w)
    counts = {len(states) for states in everyone}
    if len(counts) != 1:
        raise CalibrationError("ranks hold different numbers of observers "
                               f"({[len(s) for s in everyone]} by rank): they compressed "
                               "different models or recipes")
    for j, m in enumerate(mods):
        m.merge([states[j] for states in everyone])


def lockstep(batches: Iterator, w: World, *, max_batches: int | None,
             max_samples: int | None) -> Iterator[tuple[int, Any]]:
    """(local index, batch) of this rank's shard, stopping where one process would.

    The global order is round-robin (local batch i of rank r precedes local batch i of rank
    r + 1); the batch/sample limits count every rank's batches in that order, so the union of
    what the ranks take is what one process takes from the interleaved data. One small
    all_gather per step; a rank whose shard is exhausted (or empty) keeps answering until all
    are done, so nobody waits on it.
    """
    taken = samples = 0
    i = 0
    while True:
        b = next(batches, None)
        size = -1 if b is None else _batch_size(b)
        sizes = torch.tensor([size], dtype=torch.int64)
        every = [torch.zeros_like(sizes) for _ in range(w.size)]
        torch.distributed.all_gather(every, sizes, group=w.group)
        every = [int(t) for t in every]
        if all(s < 0 for s in every):
            return
        mine = stop = False
        for r, s in enumerate(every):
            if s < 0:
                continue
            if (max_batches is not None and taken >= max_batches) or \
                    (max_batches is None and max_samples is not None and samples >= max_samples):
                stop = True
                break
            taken += 1
            samples += s
            mine = mine or r == w.rank
        if mine:
            yield i, b
        if stop:
            return
        i += 1


def _batch_size(batch: Any) -> int:
    first = next((t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)),
                 None)
    return int(first.shape[0]) if first is not None and first.dim() else 1


def global_range(x: torch.Tensor, w: World) -> torch.Tensor:
    """[min, max] of `x` over every rank's tensor: one all_reduce (MAX of [-min, max]).

    Observers reduce what they see to its min and max, so observing this 2-element tensor
    updates them exactly as observing all ranks' batches at once would. A rank with an
    empty tensor contributes nothing; if every rank's is empty, `x` comes back.
    """
    x = x.detach().float()
    v = torch.stack([-x.min(), x.max()]) if x.numel() else torch.full((2,), -math.inf)
    torch.distributed.all_reduce(v, op=torch.distributed.ReduceOp.MAX, group=w.group)
    return torch.stack([-v[0], v[1]]) if bool(torch.isfinite(v).all()) else x


def unwrap(module: torch.nn.Module) -> tuple[torch.nn.Module, Any]:
    """(inner module, its process group) for a DistributedDataParallel module, else (module, None).

    fxpress's trainers run the inner module (through taps, peers, exits that DDP's own
    forward cannot see) and average gradients over the DDP's group themselves.
    """
    from torch.nn.parallel import DistributedDataParallel
    if isinstance(module, DistributedDataParallel):
        return module.module, module.process_group
    return module, None


def average_gradients(params: Sequence[torch.nn.Parameter], group: Any = None) -> None:
    """All-reduce the gradients of `params` to their mean over `group` (what DDP does), in one
    flat buffer; a parameter without a gradient contributes zeros so every rank agrees."""
    if not params:
        return
    size = torch.distributed.get_world_size(group)
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat, group=group)
    flat /= size
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n


def broadcast_module(module: torch.nn.Module, group: Any = None, src: int = 0) -> None:
    """Rank `src`'s parameters and buffers into `module` on every rank (in place)."""
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            torch.distributed.broadcast(t.data, src=src, group=group)


def init_from_env(backend: str = "gloo") -> World | None:
    """Initialize the default process group from torchrun's environment (WORLD_SIZE > 1).

    Returns the World, or None when not launched by torchrun with more than one process.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
    return world()
