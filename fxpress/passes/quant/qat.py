"""QAT: trainable conv+BN (QATConvBn), the PrepareQAT / ConvertQAT / QATFinetune passes, convert().

    cm = fxpress.compress(model, x, fxpress.Quantize(mode="qat"), calibration=batches)
    opt = torch.optim.SGD(cm.parameters(), lr=1e-3)
    cm.train()
    for xb, yb in loader:                     # the user's own training loop
        loss = F.cross_entropy(cm(xb), yb); opt.zero_grad(); loss.backward(); opt.step()
    cm = fxpress.convert(cm)                  # same Q/DQ IR as PTQ; eval mode

The IR is captured in eval mode, so its batch_norm and dropout are frozen. PrepareQAT makes
them trainable again, as torchao's move_exported_model_to_train / _fold_bn do: every
conv -> batch_norm becomes a QATConvBn module that fake-quantizes the BN-scaled weight and
runs BN in training mode (updating running statistics) until ``freeze_bn_after`` steps, after
which it uses the running statistics - then its output equals the folded conv exactly, which
is what convert produces. Dropout becomes nn.Dropout. With ``compress(..., finetune=fn)``
the finetune callback trains the prepared module and the IR is converted at once.

Under a process group (DistributedDataParallel training) the activation fake-quants observe
the min/max over all ranks' batches at every training step (one all_reduce each), so their
ranges stay equal across ranks; convert() takes rank 0's buffers (BN running statistics,
which DDP's broadcast_buffers already makes rank 0's) so every rank converts to the same IR.

The fake-quant modules (FakeQuantize, LearnableFakeQuantize, make_fake_quant) live in
fake_quant.py and are importable from here.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx
import torch.nn.functional as F

from ... import distributed
from ...errors import RecipeError
from ...ir.meta import QuantAnnotation, QuantSpec, get_record, lineage, set_record
from ..base import Pass, PassContext, PassResult
from ..cleanup.bn_fold import _attr
from .fake_quant import (FakeQuantize, FakeQuantizeMinMax, FakeQuantizePerChannel,
                         LearnableFakeQuantize, make_fake_quant)
from .insert_observers import OBSERVER_PREFIX, _fresh, observer_nodes
from .observers import Observer

__all__ = ["FakeQuantize", "FakeQuantizeMinMax", "FakeQuantizePerChannel", "LearnableFakeQuantize",
           "QATConvBn", "PrepareQAT", "ConvertQAT", "QATFinetune", "make_fake_quant", "convert"]

aten = torch.ops.aten
_CONVS = {aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3}


class QATConvBn(torch.nn.Module):
    """conv -> batch_norm for training: fake-quant of the BN-folded weight, BN in train mode."""

    def __init__(self, dims, weight, bias, gamma, beta, mean, var, eps, momentum, conv_args,
                 weight_fq: Observer, freeze_bn_after: int):
        super().__init__()
        self.dims, self.conv_args, self.eps, self.momentum = dims, tuple(conv_args), eps, momentum
        self.weight = torch.nn.Parameter(weight.detach().clone())
        self.bias = torch.nn.Parameter(bias.detach().clone()) if bias is not None else None
        self.bn_weight = torch.nn.Parameter(gamma.detach().clone())
        self.bn_bias = torch.nn.Parameter(beta.detach().clone())
        self.register_buffer("running_mean", mean.detach().clone())
        self.register_buffer("running_var", var.detach().clone())
        self.weight_fq, self.freeze_bn_after, self.steps = weight_fq, freeze_bn_after, 0

    def scale_factor(self):
        return self.bn_weight / torch.sqrt(self.running_var + self.eps)

    def forward(self, x):
        if self.training:
            self.steps += 1
        bn_training = self.training and self.steps <= self.freeze_bn_after
        sf = self.scale_factor()
        wshape = (-1,) + (1,) * (self.weight.dim() - 1)
        oshape = (1, -1) + (1,) * self.dims
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        y = conv(x, self.weight_fq(self.weight * sf.reshape(wshape)), None, *self.conv_args)
        y = y / sf.reshape(oshape)
        if self.bias is not None:
            y = y + self.bias.reshape(oshape)
        return F.batch_norm(y, self.running_mean, self.running_var, self.bn_weight, self.bn_bias,
                            bn_training, self.momentum, self.eps)

    def folded(self):
        """(weight, bias) of the single conv equal to this module with frozen statistics."""
        sf = self.scale_factor().detach()
        w = self.weight.detach() * sf.reshape((-1,) + (1,) * (self.weight.dim() - 1))
        b0 = self.bias.detach() if self.bias is not None else torch.zeros_like(self.running_mean)
        return w, (b0 - self.running_mean) * sf + self.bn_bias.detach()


@dataclass(frozen=True)
class PrepareQAT(Pass):
    """Make the eval-captured IR trainable: conv+BN -> QATConvBn, dropout -> nn.Dropout."""

    name: ClassVar[str] = "quant_prepare_qat"
    config: Any = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from .config import Quantize
        cfg = self.config or Quantize(mode="qat")
        graph, fused, dropouts = gm.graph, 0, 0
        for conv in list(graph.nodes):
            if conv.op != "call_function" or conv.target not in _CONVS or len(conv.users) != 1:
                continue
            (bn,) = conv.users
            if bn.target is not aten.batch_norm.default:
                continue
            x, w_n, b_n = conv.args[0], conv.args[1], conv.args[2] if len(conv.args) > 2 else None
            try:
                w, b = _attr(gm, w_n), _attr(gm, b_n)
                gamma, beta, mean, var = (_attr(gm, a) for a in bn.args[1:5])
            except LookupError:
                continue
            if gamma is None or beta is None or mean is None:
                continue
            ann = get_record(conv, QuantAnnotation)
            wspec = ann.input_spec(conv.all_input_nodes.index(w_n)) if ann else None
            aspec = ann.input_spec(conv.all_input_nodes.index(x)) if ann else None
            if wspec is None:
                wspec = cfg.specs_for("")[0] or QuantSpec("int8", "per_channel", True, 0, True)
            d = _CONVS[conv.target]
            defaults = [[1] * d, [0] * d, [1] * d, 1]  # aten.convNd's own defaults
            conv_args = list(conv.args[3:7]) + defaults[len(conv.args[3:7]):]
            fq = make_fake_quant(wspec, w_n.name, weight=True, cfg=cfg)
            mod = QATConvBn(_CONVS[conv.target], w, b, gamma, beta, mean, var, bn.args[7],
                            bn.args[6], conv_args, fq, cfg.freeze_bn_after)
            target = _fresh(gm, "_fxq_qat_convbn_" + (lineage(conv).module_path.replace(".", "_")
                                                          if lineage(conv) else conv.name))
            gm.add_submodule(target, mod)
            with graph.inserting_before(bn):
                new = graph.call_module(target, (x,))
            new.meta["val"] = bn.meta.get("val")
            if lineage(conv) is not None:
                set_record(new, lineage(conv).derived("qat_conv_bn"))
            bann = get_record(bn, QuantAnnotation)
            if aspec is not None or (bann and bann.output):
                set_record(new, QuantAnnotation(inputs=((0, aspec),) if aspec else (),
                                                output=bann.output if bann else None))
            bn.replace_all_uses_with(new)
            graph.erase_node(bn)
            graph.erase_node(conv)
            fused += 1
        for n in list(graph.nodes):
            if n.op == "call_function" and n.target is aten.dropout.default:
                target = _fresh(gm, f"_fxq_dropout_{n.name}")
                gm.add_submodule(target, torch.nn.Dropout(float(n.args[1])))
                with graph.inserting_before(n):
                    new = graph.call_module(target, (n.args[0],))
                new.meta = dict(n.meta)
                n.replace_all_uses_with(new)
                graph.erase_node(n)
                dropouts += 1
        graph.eliminate_dead_code()
        from ..cleanup.dce import remove_unused_attributes
        remove_unused_attributes(gm)
        # export's module refuses train(); a plain GraphModule over the same graph trains
        new_gm = fx.GraphModule(gm, graph)
        new_gm.eval()
        if ctx.finetune is not None:
            ctx.report["qat"] = "trained by the finetune callback, then converted"
        return PassResult(new_gm, True, {"conv_bn": fused, "dropout": dropouts})


@dataclass(frozen=True)
class ConvertQAT(Pass):
    """QATConvBn -> folded conv with a weight fake-quant (ConvertToQDQ then quantizes); dropout -> identity."""

    name: ClassVar[str] = "quant_convert_qat"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        from .convert import register_tensor
        graph, n_conv, n_drop = gm.graph, 0, 0
        renamed: dict[str, str] = {}
        for node in list(graph.nodes):
            if node.op != "call_module":
                continue
            mod = gm.get_submodule(node.target)
            if isinstance(mod, torch.nn.Dropout):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
                n_drop += 1
                continue
            if not isinstance(mod, QATConvBn):
                continue
            w, b = mod.folded()
            base = str(node.target)
            fq_t = _fresh(gm, f"{OBSERVER_PREFIX}{base}_w")
            gm.add_submodule(fq_t, mod.weight_fq)
            w_t, b_t = register_tensor(gm, base + "_weight", w), register_tensor(gm, base + "_bias", b)
            conv_op = {1: aten.conv1d.default, 2: aten.conv2d.default, 3: aten.conv3d.default}[mod.dims]
            with graph.inserting_before(node):
                w_n, b_n = graph.get_attr(w_t), graph.get_attr(b_t)
                fq_n = graph.call_module(fq_t, (w_n,))
                conv = graph.call_function(conv_op, (node.args[0], fq_n, b_n, *mod.conv_args))
            conv.meta["val"] = node.meta.get("val")
            lin = lineage(node)
            for n in (w_n, b_n, fq_n, conv):
                if lin is not None:
                    set_record(n, lin.derived(str(conv_op) if n is conv else "get_attr"))
            ann = get_record(node, QuantAnnotation)
            set_record(conv, QuantAnnotation(inputs=(ann.inputs if ann else ()) + ((1, mod.weight_fq.spec),),
                                             output=ann.output if ann else None))
            mod.weight_fq.consumers = {conv.name}
            renamed[node.name] = conv.name
            node.replace_all_uses_with(conv)
            graph.erase_node(node)
            n_conv += 1
        for _, m in observer_nodes(gm):
            m.consumers = {renamed.get(c, c) for c in m.consumers}
            m.observing = False
        graph.lint()
        gm.recompile()
        return PassResult(gm, bool(n_conv or n_drop), {"conv_bn": n_conv, "dropout": n_drop})


def convert(model):
    """Turn a QAT-prepared CompressedModel (or its GraphModule) into the Q/DQ IR; returns a new one.

    The input is left as it was (training can go on); the result is in eval mode.
    """
    from ...api import CompressedModel
    from ..cleanup import DeadCodeElimination
    from ..manager import PassManager
    from .convert import ConvertToQDQ
    from .fold import FoldQDQ
    if isinstance(model, CompressedModel):
        gm, inputs = model.graph_module, model.example_inputs
    elif isinstance(model, fx.GraphModule):
        gm, inputs = model, ()
    else:
        raise RecipeError("convert() takes the CompressedModel that compress(..., "
                          "Quantize(mode='qat')) returned", field="model", value=type(model).__name__)
    if not any(isinstance(m, (QATConvBn, Observer)) for m in gm.modules()):
        raise RecipeError("nothing to convert: the model has no fake-quant modules "
                          "(was it compressed with Quantize(mode='qat'), or converted already?)",
                          field="model", value=type(model).__name__)
    gm = copy.deepcopy(gm).eval()
    w = distributed.world()
    if w is not None:  # one IR on every rank: rank 0's statistics (parameters agree under DDP)
        distributed.broadcast_module(gm, w.group)
    passes = [ConvertQAT(), ConvertToQDQ(), FoldQDQ(), DeadCodeElimination()]
    gm, report = PassManager(passes).run(gm, PassContext(example_inputs=inputs))
    if isinstance(model, CompressedModel):
        report.passes = list(model.report.passes) + report.passes
        report.sections = {**model.report.sections, **report.sections}
        return CompressedModel(gm, report, model.recipe, model.example_inputs,
                               model.example_kwargs).eval()
    return gm


@dataclass(frozen=True)
class QATFinetune(Pass):
    """With compress(..., finetune=fn): train the prepared IR with fn, then convert it to Q/DQ."""

    name: ClassVar[str] = "quant_qat_finetune"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        if ctx.finetune is None:
            return PassResult(gm, False, {"trained": False, "hint": "train cm, then fxpress.convert(cm)"})
        from ..cleanup import DeadCodeElimination
        from ..manager import PassManager
        from .convert import ConvertToQDQ
        from .fold import FoldQDQ
        gm.train()
        ctx.finetune(gm)
        gm.eval()
        w = distributed.world()
        if w is not None:  # as convert(): every rank converts rank 0's statistics
            distributed.broadcast_module(gm, w.group)
        gm, sub = PassManager([ConvertQAT(), ConvertToQDQ(), FoldQDQ(), DeadCodeElimination()]).run(
            gm, PassContext(example_inputs=ctx.example_inputs))
        return PassResult(gm, True, {"trained": True, "converted": [r.name for r in sub.passes]})
