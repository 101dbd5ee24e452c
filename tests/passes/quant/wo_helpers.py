"""Shared, cached set-ups for the weight-only tests: real MiniLM-L6 captured once, and a tiny
causal LM trained on real text (stdlib docstrings), so each test file pays for them once."""
from __future__ import annotations

import copy
import functools

import torch

import fxpress
from fxpress.passes.base import PassContext
from fxpress.passes.quant.weight_only import WeightOnlyQuant, single_thread


class Pair(torch.nn.Module):
    """Two linears sharing an input (q/k-style), multiplied, then a third: GPTQ/AWQ test net."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(64, 96)
        self.b = torch.nn.Linear(64, 96)
        self.c = torch.nn.Linear(96, 32)

    def forward(self, x):
        return self.c(self.a(x) * self.b(x))

L = 32  # tokens per MiniLM sentence: enough for docstring first paragraphs, cheap to run


def run_pass(gm, cfg, example_inputs, calibration):
    """The WeightOnly pass on a copy of an already captured IR (one capture for all methods)."""
    gm = copy.deepcopy(gm)
    return WeightOnlyQuant(cfg).run(gm, PassContext(example_inputs=example_inputs,
                                                    calibration=calibration))


@functools.lru_cache(maxsize=1)
def minilm():
    """(IR, example inputs, 8 calibration batches of 16, eval batches over 320 other sentences,
    fp32 embeddings of the eval sentences)."""
    from fxpress.data import MiniLMEmbedder, load_minilm, stdlib_sentences, tokenize
    model, tok = load_minilm(attn_implementation="eager")
    emb = MiniLMEmbedder(model).eval()
    sents = stdlib_sentences(448)
    assert len(sents) == 448  # the stdlib always has this many docstrings; fewer is a bug
    enc = lambda s: tuple(tokenize(tok, s, max_length=L).values())
    cal = [enc(sents[i:i + 16]) for i in range(0, 128, 16)]
    ev = [enc(sents[i:i + 16]) for i in range(128, 448, 16)]
    gm = fxpress.capture(emb, cal[0])
    with torch.no_grad():
        ref = torch.cat([emb(*b) for b in ev])
    return gm, cal[0], cal, ev, ref


def minilm_cos_error(cfg) -> float:
    """mean(1 - cos) of the quantized MiniLM's sentence embeddings vs fp32 (320 sentences)."""
    gm, ex, cal, ev, ref = minilm()
    q = run_pass(gm, cfg, ex, cal).graph_module
    with torch.no_grad():
        y = torch.cat([q(*b) for b in ev])
    return float((1 - (y * ref).sum(-1)).mean())


@functools.lru_cache(maxsize=4)
def minilm_rtn_error(bits: int, group_size: int) -> float:
    return minilm_cos_error(fxpress.WeightOnly(bits=bits, group_size=group_size))


class TinyLM(torch.nn.Module):
    """A byte-level decoder (pre-norm, causal SDPA attention, SiLU MLP), Llama-shaped."""

    def __init__(self, d: int = 128, layers: int = 2, heads: int = 4, vocab: int = 256):
        super().__init__()
        self.heads = heads
        self.embed = torch.nn.Embedding(vocab, d)
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            b = torch.nn.Module()
            b.norm1, b.norm2 = torch.nn.RMSNorm(d), torch.nn.RMSNorm(d)
            b.q, b.k, b.v, b.o = (torch.nn.Linear(d, d, bias=False) for _ in range(4))
            b.up, b.down = torch.nn.Linear(d, 4 * d, bias=False), torch.nn.Linear(4 * d, d, bias=False)
            self.blocks.append(b)
        self.norm = torch.nn.RMSNorm(d)
        self.lm_head = torch.nn.Linear(d, vocab, bias=False)

    def forward(self, ids):
        x = self.embed(ids)
        bsz, t, d = x.shape
        for b in self.blocks:
            h = b.norm1(x)
            q, k, v = (f(h).view(bsz, t, self.heads, -1).transpose(1, 2) for f in (b.q, b.k, b.v))
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + b.o(a.transpose(1, 2).reshape(bsz, t, d))
            x = x + b.down(torch.nn.functional.silu(b.up(b.norm2(x))))
        return self.lm_head(self.norm(x))


SEQ = 64
STEPS = 300  # one-cycle schedule: the lr anneals to ~0, so the model ends near a minimum


@functools.lru_cache(maxsize=1)
def tiny_lm():
    """(trained TinyLM, train windows [n, SEQ+1], held-out windows) on stdlib docstring bytes,
    seeded (torch.manual_seed(0) for the init, a seeded generator for the batches)."""
    from fxpress.data import stdlib_sentences
    data = torch.tensor(list("\n".join(stdlib_sentences(3000)).encode()), dtype=torch.long)
    n = (len(data) - 1) // (SEQ + 1)
    win = data[: n * (SEQ + 1)].view(n, SEQ + 1)
    split = int(n * 0.9)
    train, held = win[:split], win[split:]
    torch.manual_seed(0)
    model = TinyLM(d=96)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=STEPS, pct_start=0.1)
    g = torch.Generator().manual_seed(0)
    with single_thread():  # small ops: one thread is faster (and a shared box stays usable)
        for _ in range(STEPS):
            b = train[torch.randint(0, len(train), (16,), generator=g)]
            loss = torch.nn.functional.cross_entropy(model(b[:, :-1]).reshape(-1, 256),
                                                     b[:, 1:].reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.eval(), train, held


def perplexity(fn, windows: torch.Tensor, batch: int = 16) -> float:
    losses = []
    with torch.no_grad():
        for i in range(0, len(windows) - batch + 1, batch):
            b = windows[i:i + batch]
            losses.append(torch.nn.functional.cross_entropy(fn(b[:, :-1]).reshape(-1, 256),
                                                            b[:, 1:].reshape(-1)))
    return float(torch.exp(torch.stack(losses).mean()))


def mean_kl(ref, fn, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean per-token KL(ref || fn) of the next-byte distributions: how far a quantized LM's
    predictions moved from fp32's (>= 0, unlike a perplexity difference, which a small
    perturbation can push either way on held-out text)."""
    kls = []
    with torch.no_grad():
        for i in range(0, len(windows) - batch + 1, batch):
            x = windows[i:i + batch, :-1]
            p, q = torch.log_softmax(ref(x), -1), torch.log_softmax(fn(x), -1)
            kls.append((p.exp() * (p - q)).sum(-1).mean())
    return float(torch.stack(kls).mean())
