"""Shared model builders for tests and benchmarks (no downloads, deterministic weights).

Every builder returns an **eval-mode** ``nn.Module`` with real submodules named as in
torchvision / transformers (``layer1.0.conv1``, ``features.3.conv.1.0``,
``bert.encoder.layer.0.attention.self.query``), so reports and passes speak in
familiar names. Weights come from ``seed`` without touching the global RNG, and
BatchNorm layers get non-trivial running statistics (a freshly built BN is the
identity in eval mode, which would make BN-folding tests vacuous).

    from tests.models import resnet18, example_inputs
    model = resnet18(width=16, num_classes=10)
    x, = example_inputs("resnet18")            # or build("resnet18") -> (model, inputs)

The transformers models (``bert``, ``gpt2``, ``vit``) are built from tiny configs
with random weights and wrapped so that ``forward`` returns a plain tensor.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from typing import Callable, Sequence

import torch
import torch.nn as nn

import fxpress.examples as _examples

__all__ = [
    "seeded", "randomize_bn",
    "BasicBlock", "Bottleneck", "ResNet", "resnet", "resnet18", "resnet50",
    "InvertedResidual", "MobileNetV2", "mobilenet_v2",
    "DenseNet", "densenet",
    "DigitsCNN", "digits_cnn",
    "bert", "gpt2", "vit",
    "CASES", "build", "example_inputs",
]


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block under `seed` and restore the global RNG afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial affine params and running stats (in place)."""
    g = torch.Generator().manual_seed(seed + 12345)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            c = m.num_features
            with torch.no_grad():
                if m.affine:
                    m.weight.copy_(torch.rand(c, generator=g) * 1.5 + 0.25)
                    m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                if m.track_running_stats:
                    m.running_mean.copy_(torch.randn(c, generator=g) * 0.2)
                    m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
    return model


def _finish(model: nn.Module, seed: int) -> nn.Module:
    return randomize_bn(model, seed).eval()


# ---------------------------------------------------------------- ResNet (torchvision names)
class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                                            nn.BatchNorm2d(planes))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or inplanes != out:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, out, 1, stride, bias=False),
                                            nn.BatchNorm2d(out))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision's ResNet layout: conv1/bn1/relu/maxpool, layer1..4, avgpool, fc."""

    def __init__(self, block: type, depths: Sequence[int], width: int = 64, num_classes: int = 1000,
                 in_chans: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        inplanes = width
        for i, d in enumerate(depths):
            planes = width * 2 ** i
            blocks = []
            for j in range(d):
                blocks.append(block(inplanes, planes, 2 if (j == 0 and i > 0) else 1))
                inplanes = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(depths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet(depths: Sequence[int] = (2, 2, 2, 2), width: int = 64, *, bottleneck: bool = False,
           num_classes: int = 1000, in_chans: int = 3, seed: int = 0) -> ResNet:
    """A ResNet of `depths` blocks per stage; width=64 and (2,2,2,2) is ResNet-18's shape."""
    with seeded(seed):
        m = ResNet(Bottleneck if bottleneck else BasicBlock, depths, width, num_classes, in_chans)
    return _finish(m, seed)


def resnet18(width: int = 64, num_classes: int = 1000, seed: int = 0) -> ResNet:
    return resnet((2, 2, 2, 2), width, num_classes=num_classes, seed=seed)


def resnet50(width: int = 64, num_classes: int = 1000, seed: int = 0) -> ResNet:
    return resnet((3, 4, 6, 3), width, bottleneck=True, num_classes=num_classes, seed=seed)


# ---------------------------------------------------------------- MobileNetV2 (torchvision names)
def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


def _conv_bn_act(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """Expand 1x1 -> depthwise 3x3 -> project 1x1 (linear), residual when shapes allow."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(_conv_bn_act(inp, hidden, 1))
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, oup, 1, bias=False), nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x):
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


_MBV2 = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
         (6, 160, 3, 2), (6, 320, 1, 1))
_MBV2_SMALL = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2), (4, 32, 1, 1))


class MobileNetV2(nn.Module):
    def __init__(self, width_mult: float = 1.0, num_classes: int = 1000,
                 setting: Sequence[tuple[int, int, int, int]] = _MBV2, last_channel: int = 1280):
        super().__init__()
        inp = _make_divisible(32 * width_mult)
        self.last_channel = _make_divisible(last_channel * max(1.0, width_mult))
        features: list[nn.Module] = [_conv_bn_act(3, inp, 3, 2)]
        for t, c, n, s in setting:
            out = _make_divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(inp, out, s if i == 0 else 1, t))
                inp = out
        features.append(_conv_bn_act(inp, self.last_channel, 1))
        self.features = nn.Sequential(*features)
        self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(self.last_channel, num_classes))

    def forward(self, x):
        x = nn.functional.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def mobilenet_v2(width_mult: float = 1.0, num_classes: int = 1000, *, small: bool = False,
                 seed: int = 0) -> MobileNetV2:
    """MobileNetV2; `small=True` keeps the block types with 7 blocks and narrow channels."""
    with seeded(seed):
        m = MobileNetV2(width_mult, num_classes, _MBV2_SMALL if small else _MBV2,
                        64 if small else 1280)
    return _finish(m, seed)


# ---------------------------------------------------------------- DenseNet-style (concat)
class _DenseLayer(nn.Module):
    def __init__(self, cin: int, growth: int):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, 1, 1, bias=False)

    def forward(self, x):
        y = self.conv2(self.relu2(self.norm2(self.conv1(self.relu1(self.norm1(x))))))
        return torch.cat([x, y], 1)


class DenseNet(nn.Module):
    """torchvision-like DenseNet: pre-activation dense layers whose outputs are concatenated."""

    def __init__(self, growth: int = 8, blocks: Sequence[int] = (2, 2), stem: int = 16,
                 num_classes: int = 10):
        super().__init__()
        f: list[tuple[str, nn.Module]] = [("conv0", nn.Conv2d(3, stem, 3, 1, 1, bias=False)),
                                          ("norm0", nn.BatchNorm2d(stem)), ("relu0", nn.ReLU())]
        c = stem
        for i, n in enumerate(blocks):
            layers = []
            for _ in range(n):
                layers.append(_DenseLayer(c, growth))
                c += growth
            f.append((f"denseblock{i + 1}", nn.Sequential(*layers)))
            if i != len(blocks) - 1:
                f.append((f"transition{i + 1}", nn.Sequential(
                    nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c // 2, 1, bias=False), nn.AvgPool2d(2))))
                c //= 2
        f.append(("norm5", nn.BatchNorm2d(c)))
        self.features = nn.Sequential(OrderedDict(f))
        self.classifier = nn.Linear(c, num_classes)

    def forward(self, x):
        x = torch.relu(self.features(x))
        return self.classifier(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def densenet(growth: int = 8, blocks: Sequence[int] = (2, 2), num_classes: int = 10,
             seed: int = 0) -> DenseNet:
    with seeded(seed):
        m = DenseNet(growth, blocks, num_classes=num_classes)
    return _finish(m, seed)


# ---------------------------------------------------------------- digits (1x8x8, sklearn)
DigitsCNN = _examples.DigitsCNN  # the demo's model; one definition for tests and demo


def digits_cnn(width: int = 16, seed: int = 0) -> DigitsCNN:
    with seeded(seed):
        m = DigitsCNN(width)
    return _finish(m, seed)


# ---------------------------------------------------------------- transformers (tiny configs)
class _HFWrapper(nn.Module):
    """Holds a transformers model under its usual prefix and returns one plain tensor."""

    def __init__(self, prefix: str, model: nn.Module, output: str):
        super().__init__()
        self.prefix, self.output = prefix, output
        self.add_module(prefix, model)

    def forward(self, *args, **kwargs):
        return getattr(getattr(self, self.prefix)(*args, **kwargs), self.output)


class BertWrapper(_HFWrapper):
    def forward(self, input_ids, attention_mask=None):
        return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class GPT2Wrapper(_HFWrapper):
    def forward(self, input_ids):
        return self.gpt2(input_ids=input_ids).logits


class ViTWrapper(_HFWrapper):
    def forward(self, pixel_values):
        return self.vit(pixel_values=pixel_values).logits


def bert(hidden: int = 32, layers: int = 2, heads: int = 4, vocab: int = 128, *,
         attn_implementation: str = "eager", seed: int = 0) -> nn.Module:
    """BertModel -> last_hidden_state; inputs (input_ids, attention_mask).

    Eager attention by default: explicit matmul/softmax nodes that quantization and every
    backend handle; pass attn_implementation="sdpa" for the fused op.
    """
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=4 * hidden,
                     max_position_embeddings=64, attn_implementation=attn_implementation)
    with seeded(seed):
        m = BertModel(cfg, add_pooling_layer=False)
    return BertWrapper("bert", m, "last_hidden_state").eval()


def gpt2(hidden: int = 32, layers: int = 2, heads: int = 4, vocab: int = 128, *,
         attn_implementation: str = "eager", seed: int = 0) -> nn.Module:
    """GPT2LMHeadModel -> logits (tied embeddings); input (input_ids,).

    GPT-2 projections are transformers `Conv1D` modules: they capture as aten.addmm, not linear.
    """
    from transformers import GPT2Config, GPT2LMHeadModel
    cfg = GPT2Config(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads, n_positions=64,
                     bos_token_id=vocab - 1, eos_token_id=vocab - 1, use_cache=False,
                     attn_implementation=attn_implementation)
    with seeded(seed):
        m = GPT2LMHeadModel(cfg)
    return GPT2Wrapper("gpt2", m, "logits").eval()


def vit(hidden: int = 32, layers: int = 2, heads: int = 4, image_size: int = 16, patch: int = 4,
        num_classes: int = 10, *, attn_implementation: str = "eager", seed: int = 0) -> nn.Module:
    """ViTForImageClassification -> logits; input (pixel_values,) of (N, 3, image_size, image_size)."""
    from transformers import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=4 * hidden, image_size=image_size, patch_size=patch,
                    num_labels=num_classes, attn_implementation=attn_implementation)
    with seeded(seed):
        m = ViTForImageClassification(cfg)
    return ViTWrapper("vit", m, "logits").eval()


# ---------------------------------------------------------------- named cases
def _ids(batch: int, seq: int, vocab: int = 128, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _img(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _bert_inputs(batch: int = 2, seq: int = 16):
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[-1, seq // 2:] = 0  # a padded row, so the mask is not a no-op
    return _ids(batch, seq), mask


# name -> (builder, inputs(batch)); small sizes: these run in unit tests on 2 CPU cores.
CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], tuple]]] = {
    "resnet18": (lambda: resnet18(width=8, num_classes=10), lambda b: (_img(b, 3, 32, 32),)),
    "resnet50": (lambda: resnet50(width=8, num_classes=10), lambda b: (_img(b, 3, 32, 32),)),
    "mobilenet_v2": (lambda: mobilenet_v2(num_classes=10, small=True), lambda b: (_img(b, 3, 32, 32),)),
    "densenet": (lambda: densenet(), lambda b: (_img(b, 3, 16, 16),)),
    "digits_cnn": (lambda: digits_cnn(), lambda b: (_img(b, 1, 8, 8),)),
    "bert": (lambda: bert(), lambda b: _bert_inputs(b)),
    "gpt2": (lambda: gpt2(), lambda b: (_ids(b, 16),)),
    "vit": (lambda: vit(), lambda b: (_img(b, 3, 16, 16),)),
}


def example_inputs(name: str, batch: int = 2) -> tuple:
    return CASES[name][1](batch)


def build(name: str, batch: int = 2) -> tuple[nn.Module, tuple]:
    """`(model, example_inputs)` for a named case in CASES."""
    builder, inputs = CASES[name]
    return builder(), inputs(batch)
