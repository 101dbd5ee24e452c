"""What every frontend does after tracing: lineage records, param detachment, guard removal."""
from __future__ import annotations

import re

import torch
import torch.fx as fx

from ..ir.meta import Lineage, lineage, set_record

__all__ = ["finish_ir", "annotate_lineage", "detach_parameters", "source_of", "use_signature_check"]

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def source_of(stack_trace: str | None) -> str | None:
    """'file.py:42' of the innermost frame outside torch itself, from a node's stack_trace."""
    if not stack_trace:
        return None
    frames = _FRAME.findall(stack_trace)
    user = [f for f in frames if "/torch/" not in f[0]] or frames
    if not user:
        return None
    path, line = user[-1]
    return f"{path}:{line}"


def _op_name(node: fx.Node) -> str:
    if node.op == "call_function":
        if isinstance(node.target, torch._ops.OpOverload):
            return str(node.target)  # "aten.conv2d.default"
        return getattr(node.target, "__name__", str(node.target))
    if node.op in ("call_module", "call_method"):
        return str(node.target)
    return node.op


def annotate_lineage(gm: fx.GraphModule) -> None:
    """Give every node a Lineage (module path + type + op + source line) from its trace meta."""
    for node in gm.graph.nodes:
        if lineage(node) is not None:
            continue
        path, mtype = "", ""
        stack = node.meta.get("nn_module_stack")
        if stack:
            path, mtype = list(stack.values())[-1]
            mtype = mtype.rsplit(".", 1)[-1] if isinstance(mtype, str) else getattr(mtype, "__name__", str(mtype))
        elif node.op == "get_attr":
            path = str(node.target).rsplit(".", 1)[0] if "." in str(node.target) else ""
        elif node.op == "call_module":
            path = str(node.target)
            mtype = type(gm.get_submodule(node.target)).__name__
        path = re.sub(r"^L__self__\.?", "", str(path)).replace("L__self___", "")
        set_record(node, Lineage(path, mtype, _op_name(node), source_of(node.meta.get("stack_trace"))))


def detach_parameters(gm: fx.GraphModule) -> None:
    """Give the IR its own copies of parameters and buffers (export shares the user's).

    Tensors shared between modules (tied embeddings, GPT-2's lm_head) stay shared: one
    copy per distinct tensor, so fine-tuning the IR keeps them tied.
    """
    copies: dict[int, torch.Tensor] = {}

    def copy(t: torch.Tensor, make):
        if id(t) not in copies:
            copies[id(t)] = make(t)
        return copies[id(t)]

    for mod in gm.modules():
        for name, p in list(mod.named_parameters(recurse=False)):
            mod.register_parameter(name, copy(p, lambda p: torch.nn.Parameter(p.detach().clone(),
                                                                              p.requires_grad)))
        for name, b in list(mod.named_buffers(recurse=False)):
            persistent = name not in getattr(mod, "_non_persistent_buffers_set", set())
            mod.register_buffer(name, copy(b, lambda b: b.detach().clone()) if b is not None else None,
                                persistent=persistent)


def remove_guards(gm: fx.GraphModule) -> None:
    """Drop the input-shape guard call `ExportedProgram.module()` inserts; the IR is reshaped by passes."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            gm.graph.erase_node(node)
            if hasattr(gm, str(node.target)):
                delattr(gm, str(node.target))


def use_signature_check(gm: fx.GraphModule) -> None:
    """Replace export's input check (it compares calls with the placeholders' values, which
    passes re-propagate at the example's sizes) by the IR signature's: dynamic dims stay dynamic."""
    from ..ir.signature import check_ir_call
    if hasattr(gm, "validate_inputs"):
        gm.validate_inputs = False
    if not any(h is check_ir_call for h in gm._forward_pre_hooks.values()):
        gm.register_forward_pre_hook(check_ir_call, with_kwargs=True)


def finish_ir(gm: fx.GraphModule) -> fx.GraphModule:
    """Guards out, signature recorded (from export's placeholders, while they are symbolic),
    the IR's own parameters, lineage on every node."""
    from ..ir.signature import KEY, set_signature, signature_from_placeholders
    remove_guards(gm)
    if KEY not in gm.meta:
        set_signature(gm, signature_from_placeholders(gm))
    use_signature_check(gm)
    detach_parameters(gm)
    annotate_lineage(gm)
    gm.graph.lint()
    gm.recompile()
    return gm
