"""Graph fuzzer: small random networks with real submodules, for every pass's tests.

    from tests import fuzz
    model, inputs = fuzz.random_net(7)                    # deterministic for a seed

    @settings(max_examples=200, deadline=None, derandomize=True)
    @given(net=fuzz.nets())                               # hypothesis strategy (shrinks)
    def test_my_pass(net):
        model, inputs = net
        ...

A net is a stem, 1-4 random blocks and a head, from one of three families:

* ``cnn``: conv(+BN)(+act), depthwise conv, grouped conv, residual blocks (identity or
  1x1 projection shortcut), MobileNetV2 inverted residuals, dense concat, channel split
  into two branches (re-joined by concat or add), pooling; head global-pool->linear or
  flatten->linear.
* ``transformer``: token embedding or patchify conv, attention blocks with separate
  q/k/v/out ``nn.Linear`` and view/transpose head reshapes (no nn.MultiheadAttention),
  MLP blocks, pre- or post-LayerNorm, residual adds; head mean-pool->linear.
* ``mlp``: linear(+BatchNorm1d)(+act) stacks with residual adds.

Every model is an eval-mode ``nn.Module``; BatchNorms carry random running statistics.
The value the strategy yields is a ``FuzzNet``: it unpacks as ``(model, inputs)`` and
prints as ``fuzz.build(NetSpec(...))``, which rebuilds the same model for a failing case.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .models import randomize_bn, seeded

__all__ = ["NetSpec", "Block", "FuzzNet", "random_spec", "random_net", "build", "nets", "specs",
           "FAMILIES"]

FAMILIES = ("cnn", "transformer", "mlp")
_ACTS = ("relu", "relu6", "gelu", "silu", "hardswish", "sigmoid", "leaky_relu", "none")


def _act(name: str) -> nn.Module:
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "gelu": nn.GELU, "silu": nn.SiLU,
            "hardswish": nn.Hardswish, "sigmoid": nn.Sigmoid, "leaky_relu": nn.LeakyReLU,
            "none": nn.Identity}[name]()


# ------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Block:
    """One block: `kind` plus its options as a sorted tuple of (key, value) pairs."""

    kind: str
    opts: tuple[tuple[str, Any], ...] = ()

    def __getitem__(self, key: str) -> Any:
        return dict(self.opts)[key]

    def __repr__(self) -> str:
        return f"Block({self.kind!r}, {self.opts!r})"


@dataclass(frozen=True)
class NetSpec:
    family: str
    input_shape: tuple[int, ...]   # for "transformer" with tokens: (batch, seq)
    blocks: tuple[Block, ...]
    head: str
    seed: int = 0
    tokens: bool = False           # transformer input is token ids (embedding stem)
    vocab: int = 32


class _RandomChooser:
    def __init__(self, seed: int):
        self.r = random.Random(seed)

    def int(self, lo: int, hi: int) -> int:
        return self.r.randint(lo, hi)

    def pick(self, seq):
        return seq[self.r.randrange(len(seq))]

    def coin(self) -> bool:
        return self.r.random() < 0.5


class _DrawChooser:
    def __init__(self, draw):
        from hypothesis import strategies as st
        self.draw, self.st = draw, st

    def int(self, lo: int, hi: int) -> int:
        return self.draw(self.st.integers(lo, hi))

    def pick(self, seq):
        return self.draw(self.st.sampled_from(list(seq)))

    def coin(self) -> bool:
        return self.draw(self.st.booleans())


def _b(kind: str, **opts) -> Block:
    return Block(kind, tuple(sorted(opts.items())))


def _cnn_blocks(c, ch: int, hw: int, n: int) -> tuple[list[Block], int, int]:
    blocks = []
    for _ in range(n):
        kind = c.pick(("conv", "depthwise", "grouped", "residual", "inverted", "dense", "split",
                       "pool"))
        if kind == "pool" and hw < 4:
            kind = "conv"
        if kind == "conv":
            out = c.pick((4, 8, 12, 16))
            stride = 2 if hw >= 4 and c.coin() and c.coin() else 1
            blocks.append(_b("conv", cin=ch, cout=out, k=c.pick((1, 3)), stride=stride,
                             bn=c.coin(), bias=c.coin(), act=c.pick(_ACTS)))
            ch, hw = out, (hw + 1) // 2 if stride == 2 else hw
        elif kind == "depthwise":
            blocks.append(_b("depthwise", c=ch, bn=c.coin(), act=c.pick(_ACTS)))
        elif kind == "grouped":
            groups = c.pick([g for g in (2, 4) if ch % g == 0] or [1])
            out = groups * c.pick((2, 4))
            blocks.append(_b("grouped", cin=ch, cout=out, groups=groups, bn=c.coin(),
                             act=c.pick(_ACTS)))
            ch = out
        elif kind == "residual":
            out = c.pick((ch, ch, 8, 16))
            blocks.append(_b("residual", cin=ch, cout=out, act=c.pick(("relu", "silu", "gelu"))))
            ch = out
        elif kind == "inverted":
            blocks.append(_b("inverted", c=ch, expand=c.pick((2, 4))))
        elif kind == "dense":
            growth = c.pick((4, 8))
            blocks.append(_b("dense", cin=ch, growth=growth, bn=c.coin()))
            ch += growth
        elif kind == "split":
            first = c.int(1, ch - 1) if ch > 1 else 1
            blocks.append(_b("split", c=ch, first=first, join=c.pick(("cat", "add"))))
        else:
            blocks.append(_b("pool", op=c.pick(("max", "avg"))))
            hw //= 2
    return blocks, ch, hw


def _transformer_blocks(c, d: int, n: int) -> list[Block]:
    blocks = []
    for _ in range(n):
        kind = c.pick(("attention", "attention", "mlp"))
        if kind == "attention":
            heads = c.pick([h for h in (1, 2, 4) if d % h == 0])
            blocks.append(_b("attention", d=d, heads=heads, prenorm=c.coin(), causal=c.coin(),
                             bias=c.coin()))
        else:
            blocks.append(_b("mlp", d=d, hidden=c.pick((d, 2 * d)), act=c.pick(("gelu", "relu")),
                             prenorm=c.coin()))
    return blocks


def _spec(c, family: str | None, max_blocks: int) -> NetSpec:
    family = family or c.pick(FAMILIES)
    n = c.int(1, max_blocks)
    seed = c.int(0, 2**16)
    batch = c.int(1, 2)
    if family == "cnn":
        cin, hw = c.pick((1, 3)), c.pick((6, 8))
        stem = _b("conv", cin=cin, cout=8, k=3, stride=1, bn=True, bias=False, act="relu")
        blocks, ch, hw_out = _cnn_blocks(c, 8, hw, n)
        head = c.pick(("gap_linear", "flatten_linear"))
        head_block = _b(head, c=ch, hw=hw_out, classes=c.pick((3, 5)))
        return NetSpec("cnn", (batch, cin, hw, hw), (stem, *blocks, head_block), head, seed)
    if family == "transformer":
        d = c.pick((8, 16))
        tokens = c.coin()
        if tokens:
            seq = c.int(2, 6)
            stem = _b("embed", vocab=32, d=d, seq=seq)
            shape: tuple[int, ...] = (batch, seq)
        else:
            stem = _b("patchify", cin=3, d=d, patch=2)
            shape = (batch, 3, 4, 4)
        blocks = _transformer_blocks(c, d, n)
        head_block = _b("mean_linear", c=d, classes=c.pick((3, 5)))
        return NetSpec("transformer", shape, (stem, *blocks, head_block), "mean_linear", seed,
                       tokens=tokens)
    if family == "mlp":
        f = c.pick((6, 10))
        blocks, width = [], f
        for _ in range(n):
            out = c.pick((8, 16)) if not c.coin() else width
            residual = out == width and c.coin()
            blocks.append(_b("linear", cin=width, cout=out, bn=c.coin(), act=c.pick(_ACTS),
                             residual=residual))
            width = out
        head_block = _b("linear_head", c=width, classes=c.pick((3, 5)))
        return NetSpec("mlp", (batch, f), (*blocks, head_block), "linear_head", seed)
    raise ValueError(f"unknown family {family!r}; known: {FAMILIES}")


def random_spec(seed: int, *, family: str | None = None, max_blocks: int = 4) -> NetSpec:
    return _spec(_RandomChooser(seed), family, max_blocks)


# ------------------------------------------------------------------------- modules
class ConvBlock(nn.Module):
    def __init__(self, cin, cout, k=3, stride=1, groups=1, bn=True, bias=False, act="relu"):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias or not bn)
        self.bn = nn.BatchNorm2d(cout) if bn else nn.Identity()
        self.act = _act(act)

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Residual(nn.Module):
    def __init__(self, cin, cout, act="relu"):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.act = _act(act)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout)) \
            if cin != cout else nn.Identity()

    def forward(self, x):
        y = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(y + self.shortcut(x))


class Inverted(nn.Module):
    def __init__(self, c, expand):
        super().__init__()
        h = c * expand
        self.expand = ConvBlock(c, h, 1, act="relu6")
        self.dw = ConvBlock(h, h, 3, groups=h, act="relu6")
        self.project = ConvBlock(h, c, 1, act="none")

    def forward(self, x):
        return x + self.project(self.dw(self.expand(x)))


class Dense(nn.Module):
    def __init__(self, cin, growth, bn=True):
        super().__init__()
        self.layer = ConvBlock(cin, growth, 3, bn=bn)

    def forward(self, x):
        return torch.cat([x, self.layer(x)], dim=1)


class Split(nn.Module):
    def __init__(self, c, first, join):
        super().__init__()
        self.sizes, self.join = [first, c - first], join
        self.left = ConvBlock(first, first if join == "cat" else c, 1)
        self.right = ConvBlock(c - first, c - first if join == "cat" else c, 3)

    def forward(self, x):
        a, b = torch.split(x, self.sizes, dim=1)
        a, b = self.left(a), self.right(b)
        return torch.cat([a, b], dim=1) if self.join == "cat" else a + b


class Attention(nn.Module):
    """Multi-head self-attention from four nn.Linear and explicit head reshapes."""

    def __init__(self, d, heads, causal=False, bias=True):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.q_proj, self.k_proj = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)
        self.v_proj, self.out_proj = nn.Linear(d, d, bias=bias), nn.Linear(d, d, bias=bias)

    def forward(self, x):
        b, t, d = x.shape
        h = self.heads

        def split(y):
            return y.view(b, t, h, d // h).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / (d // h) ** 0.5
        if self.causal:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
            scores = scores.masked_fill(mask, float("-inf"))
        y = torch.matmul(scores.softmax(dim=-1), v)
        return self.out_proj(y.transpose(1, 2).reshape(b, t, d))


class AttentionBlock(nn.Module):
    def __init__(self, d, heads, prenorm=True, causal=False, bias=True):
        super().__init__()
        self.prenorm = prenorm
        self.norm = nn.LayerNorm(d)
        self.attn = Attention(d, heads, causal, bias)

    def forward(self, x):
        if self.prenorm:
            return x + self.attn(self.norm(x))
        return self.norm(x + self.attn(x))


class MLPBlock(nn.Module):
    def __init__(self, d, hidden, act="gelu", prenorm=True):
        super().__init__()
        self.prenorm = prenorm
        self.norm = nn.LayerNorm(d)
        self.fc1, self.act, self.fc2 = nn.Linear(d, hidden), _act(act), nn.Linear(hidden, d)

    def forward(self, x):
        if self.prenorm:
            return x + self.fc2(self.act(self.fc1(self.norm(x))))
        return self.norm(x + self.fc2(self.act(self.fc1(x))))


class Patchify(nn.Module):
    """ViT stem: a strided conv, then (N, C, H, W) -> (N, H*W, C) tokens."""

    def __init__(self, cin, d, patch):
        super().__init__()
        self.proj = nn.Conv2d(cin, d, patch, patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Embed(nn.Module):
    def __init__(self, vocab, d, seq):
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq, d) * 0.1)

    def forward(self, ids):
        return self.tok(ids) + self.pos


class LinearBlock(nn.Module):
    def __init__(self, cin, cout, bn=False, act="relu", residual=False):
        super().__init__()
        self.residual = residual
        self.fc = nn.Linear(cin, cout)
        self.bn = nn.BatchNorm1d(cout) if bn else nn.Identity()
        self.act = _act(act)

    def forward(self, x):
        y = self.act(self.bn(self.fc(x)))
        return x + y if self.residual else y


class GapLinear(nn.Module):
    def __init__(self, c, hw, classes):
        super().__init__()
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(x.mean(dim=(2, 3)))


class FlattenLinear(nn.Module):
    def __init__(self, c, hw, classes):
        super().__init__()
        self.fc = nn.Linear(c * hw * hw, classes)

    def forward(self, x):
        return self.fc(torch.flatten(x, 1))


class MeanLinear(nn.Module):
    def __init__(self, c, classes):
        super().__init__()
        self.norm, self.fc = nn.LayerNorm(c), nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(self.norm(x).mean(dim=1))


class Pool(nn.Module):
    def __init__(self, op):
        super().__init__()
        self.pool = nn.MaxPool2d(2) if op == "max" else nn.AvgPool2d(2)

    def forward(self, x):
        return self.pool(x)


def _module(b: Block) -> nn.Module:
    o = dict(b.opts)
    if b.kind == "conv":
        return ConvBlock(o["cin"], o["cout"], o["k"], o["stride"], 1, o["bn"], o["bias"], o["act"])
    if b.kind == "depthwise":
        return ConvBlock(o["c"], o["c"], 3, 1, o["c"], o["bn"], False, o["act"])
    if b.kind == "grouped":
        return ConvBlock(o["cin"], o["cout"], 3, 1, o["groups"], o["bn"], False, o["act"])
    ctor = {"residual": Residual, "inverted": Inverted, "dense": Dense, "split": Split,
            "pool": Pool, "attention": AttentionBlock, "mlp": MLPBlock, "patchify": Patchify,
            "embed": Embed, "linear": LinearBlock, "gap_linear": GapLinear,
            "flatten_linear": FlattenLinear, "mean_linear": MeanLinear,
            "linear_head": lambda c, classes: nn.Linear(c, classes)}[b.kind]
    return ctor(**o)


class FuzzModel(nn.Module):
    """`blocks.0 ... blocks.N`, applied in order (the last one is the head)."""

    def __init__(self, spec: NetSpec):
        super().__init__()
        self.blocks = nn.ModuleList(_module(b) for b in spec.blocks)

    def forward(self, x):
        for blk in self.blocks:
            x = blk(x)
        return x


class FuzzNet(tuple):
    """``(model, inputs)`` that remembers its spec and prints as a rebuild expression."""

    def __new__(cls, model: nn.Module, inputs: tuple, spec: NetSpec):
        self = super().__new__(cls, (model, inputs))
        self.spec = spec
        return self

    @property
    def model(self) -> nn.Module:
        return self[0]

    @property
    def inputs(self) -> tuple:
        return self[1]

    def __repr__(self) -> str:
        return f"fuzz.build({self.spec!r})"


def build(spec: NetSpec) -> FuzzNet:
    """Build the eval-mode model and its example inputs for `spec` (deterministic)."""
    with seeded(spec.seed):
        model = FuzzModel(spec)
        if spec.tokens:
            x = torch.randint(0, spec.vocab, spec.input_shape)
        else:
            x = torch.randn(spec.input_shape)
    randomize_bn(model, spec.seed)
    return FuzzNet(model.eval(), (x,), spec)


def random_net(seed: int, *, family: str | None = None, max_blocks: int = 4) -> FuzzNet:
    """A random net for `seed`: ``model, inputs = random_net(3)``."""
    return build(random_spec(seed, family=family, max_blocks=max_blocks))


def specs(*, family: str | None = None, max_blocks: int = 4):
    """Hypothesis strategy of NetSpec (draws each choice, so failures shrink)."""
    from hypothesis import strategies as st

    @st.composite
    def _specs(draw):
        return _spec(_DrawChooser(draw), family, max_blocks)

    return _specs()


def nets(*, family: str | None = None, max_blocks: int = 4):
    """Hypothesis strategy of FuzzNet: unpack as ``model, inputs = net``."""
    return specs(family=family, max_blocks=max_blocks).map(build)
