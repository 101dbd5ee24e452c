"""Distillation losses: Hinton KD, FitNets hints (with channel-selection adapters), attention transfer.

    loss = kd_loss(student_logits, teacher_logits, temperature=4.0)
    loss = loss + hint_loss(adapter(s_feat), t_feat) + attention_loss(s_feat, t_feat)

All losses are means over the batch, so their scale does not depend on batch size.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import fx

from ...errors import InputError
from ...ir.meta import ChannelGroup, get_record, lineage

__all__ = [
    "HintAdapter",
    "attention_loss",
    "attention_map",
    "hint_loss",
    "kd_loss",
    "kept_channels",
    "mutual_loss",
]


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
            temperature: float = 4.0) -> torch.Tensor:
    """Hinton et al. 2015: T² · KL(softmax(t/T) ‖ softmax(s/T)), averaged over the batch.

    The T² factor keeps the gradient scale of the soft term independent of T, so it
    can be mixed with a hard-label cross-entropy at a fixed weight.
    """
    if student_logits.shape != teacher_logits.shape:
        raise InputError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher "
                         f"logits {tuple(teacher_logits.shape)} differ in shape")
    t = temperature
    log_p_s = F.log_softmax(student_logits.flatten(0, -2) / t, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.flatten(0, -2) / t, dim=-1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * (t * t)


def mutual_loss(logits: torch.Tensor, peer_logits: Sequence[torch.Tensor],
                temperature: float = 1.0) -> torch.Tensor:
    """Deep mutual learning (Zhang et al. 2018): mean over peers of KL(p_peer ‖ p_self).

    Peers are detached: each network follows the others' current predictions and is
    updated only through its own loss.
    """
    if not peer_logits:
        return logits.new_zeros(())
    return sum(kd_loss(logits, p.detach(), temperature) for p in peer_logits) / len(peer_logits)


def hint_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor) -> torch.Tensor:
    """FitNets (Romero et al. 2015): mean squared error between (adapted) student and teacher features."""
    if student_feat.shape != teacher_feat.shape:
        raise InputError(f"hint_loss: features {tuple(student_feat.shape)} and "
                         f"{tuple(teacher_feat.shape)} differ; give the student an adapter")
    return F.mse_loss(student_feat, teacher_feat)


def attention_map(feat: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Zagoruyko & Komodakis 2017: L2-normalised spatial map of sum_c |F_c|^p, shape (N, H*W)."""
    if feat.dim() < 3:
        raise InputError(f"attention_map needs (N, C, ...) feature maps, got {tuple(feat.shape)}")
    return F.normalize(feat.abs().pow(p).mean(1).flatten(1), dim=1)


def attention_loss(student_feat: torch.Tensor, teacher_feat: torch.Tensor,
                   p: float = 2.0) -> torch.Tensor:
    """Attention transfer: mean over the batch of ‖Q_s - Q_t‖² of the normalised maps.

    Channel counts may differ (the maps average over channels); a smaller student map
    is resized to the teacher's spatial size.
    """
    if student_feat.shape[-2:] != teacher_feat.shape[-2:] and student_feat.dim() == 4:
        student_feat = F.interpolate(student_feat, size=teacher_feat.shape[-2:], mode="bilinear",
                                     align_corners=False)
    q_s, q_t = attention_map(student_feat, p), attention_map(teacher_feat, p)
    return (q_s - q_t).pow(2).sum(1).mean()


class HintAdapter(torch.nn.Module):
    """A learnable 1×1 map from student channels to teacher channels (the FitNets regressor).

    ``HintAdapter.from_selection(kept, teacher_channels)`` starts as the exact
    channel-selection matrix of a pruned student: student channel j is teacher channel
    ``kept[j]``, so at step 0 the adapter reproduces the kept teacher channels and the
    hint loss measures only what pruning removed and what training changed.
    """

    def __init__(self, student_channels: int, teacher_channels: int, *,
                 weight: torch.Tensor | None = None):
        super().__init__()
        if weight is None:
            if student_channels == teacher_channels:
                weight = torch.eye(teacher_channels)
            else:
                weight = torch.empty(teacher_channels, student_channels)
                torch.nn.init.kaiming_uniform_(weight, a=5 ** 0.5)
        if tuple(weight.shape) != (teacher_channels, student_channels):
            raise InputError(f"HintAdapter weight {tuple(weight.shape)} is not "
                             f"({teacher_channels}, {student_channels})")
        self.weight = torch.nn.Parameter(weight.clone().float())

    @classmethod
    def from_selection(cls, kept: Sequence[int], teacher_channels: int) -> HintAdapter:
        kept = list(kept)
        if len(set(kept)) != len(kept) or any(not 0 <= k < teacher_channels for k in kept):
            raise InputError(f"kept channels {kept} are not distinct indices below {teacher_channels}")
        w = torch.zeros(teacher_channels, len(kept))
        w[torch.tensor(kept, dtype=torch.long), torch.arange(len(kept))] = 1.0
        return cls(len(kept), teacher_channels, weight=w)

    def forward(self, feat: torch.Tensor) -> torch.Tensor:
        if feat.dim() == 2:
            return F.linear(feat, self.weight)
        # channels are dim 1 for (N, C, ...) maps: contract them with the matrix
        return torch.einsum("tc,nc...->nt...", self.weight, feat)


def kept_channels(gm: fx.GraphModule, node: fx.Node,
                  original_size: int | None = None) -> tuple[int, ...] | None:
    """Indices (in the original channel numbering) that survive at `node`'s output, if a pruning
    pass recorded them.

    Channel pruning records a ChannelGroup on the nodes it rewrote, with ``pruned``
    indices out of ``size`` original channels. The group whose output member names this
    node (or this node's module, e.g. a BN after the conv) gives the selection. With
    `original_size`, a group of another size (a later step of iterative pruning, numbered
    against the previous step's channels) is not a selection from the original: None.
    """
    lin = lineage(node)
    module = lin.module_path if lin else None
    candidates = [node] + [n for n in gm.graph.nodes if n is not node]
    for n in candidates:
        group = get_record(n, ChannelGroup)
        if group is None:
            continue
        for m in group.members:
            if m.role not in ("out", "norm", "pass"):
                continue
            if m.node == node.name or (module and m.module == module):
                if original_size is not None and group.size != original_size:
                    return None
                pruned = set(group.pruned)
                return tuple(i for i in range(group.size) if i not in pruned)
    return None
