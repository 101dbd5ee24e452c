"""WeightOnly: int4/int8 weight-only quantization of linears (RTN, GPTQ, AWQ) for LLMs.

    fxpress.WeightOnly(bits=4, group_size=128)                        # round to nearest
    fxpress.WeightOnly(bits=4, group_size=128, method="gptq")         # needs calibration=
    fxpress.WeightOnly(bits=8, group_size=-1, method="awq", skip=["lm_head", "model.layers.0.*"])

IR form (DESIGN, "Weight-only quantization uses the same Q/DQ convention"): the linear's
weight becomes an int8 get_attr ``<weight>_int8`` holding the integer values (int4 values lie
in [-8, 7]), then ``quantized_decomposed.dequantize_per_channel_group`` (scales ``[N, K/g]``;
zero points only when asymmetric) -- or ``dequantize_per_channel`` for ``group_size=-1`` --
then the linear, which still reads float activations. The dequantize node carries a
``WeightOnlySpec`` (bits, group size, method) and a ``QuantSpec``; packing is the backends'
business (ORT ``MatMulNBits``: fxpress.backends.onnx.nbits; Inductor: fxpress.backends.inductor_wo).

Policy: only ``aten.linear`` weights are quantized (``WeightOps`` first rewrites addmm / matmul /
mm / einsum on a constant weight, GPT-2's ``Conv1D`` and Falcon's ``x @ W.T``, to linear). Embeddings stay float and ``lm_head`` is
skipped by default, as llm-compressor's W4A16/W8A16 schemes do (``ignore=["lm_head"]``): the
output projection is the most sensitive layer and is often tied to the embedding. Pass
``skip=()`` to quantize it too. A weight read by more than one node (tied) is never quantized.
"""
from __future__ import annotations

import contextlib
import fnmatch
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.fx as fx

from ...errors import CalibrationError, RecipeError
from ...ir.meta import QuantSpec, WeightOnlySpec, lineage, module_path, set_record
from ...registry import check_choice, check_range, recipe_entry
from ..base import Pass, PassContext, PassResult, RecipeEntry
from .convert import fetch_attr, register_tensor

__all__ = ["WeightOnly", "WeightOnlyQuant", "qrange", "group_qparams", "quantize_groups",
           "dequantize_groups", "grouped", "padded_k", "target_linears", "collect_linear_inputs",
           "flat_calibration", "single_thread"]

aten = torch.ops.aten
BITS = (4, 8)
GROUP_SIZES = (16, 32, 64, 128, 256, -1)
METHODS = ("rtn", "gptq", "awq")


@contextlib.contextmanager
def single_thread():
    """Run the enclosed torch ops on one intra-op thread, restoring the count on exit.

    GPTQ's column loop and AWQ's grid searches are thousands of small ops: intra-op threads
    only add barrier waits there (measured 7-30x slower on a loaded 2-core box).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def qrange(bits: int) -> tuple[int, int]:
    """Signed integer range of `bits`: (-8, 7) for 4, (-128, 127) for 8."""
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def group_qparams(w: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, zero_point) per row of `w` [rows, g]; symmetric: s = absmax / ((qmax - qmin) / 2).

    >>> s, z = group_qparams(torch.tensor([[-1.0, 0.5]]), 4, True)   # s = 1 / 7.5, z = 0
    """
    qmin, qmax = qrange(bits)
    if symmetric:
        scale = w.abs().amax(-1) / ((qmax - qmin) / 2)
        return scale.clamp(min=1e-10), torch.zeros_like(scale, dtype=torch.int8)
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
    scale = ((hi - lo) / (qmax - qmin)).clamp(min=1e-10)
    zp = (qmin - torch.round(lo / scale)).clamp(qmin, qmax).to(torch.int8)
    return scale, zp


def padded_k(k: int, group_size: int) -> int:
    """K rounded up to a whole number of groups (K itself for per channel or a dividing group)."""
    if group_size == -1:
        return k
    return -(-k // group_size) * group_size


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """`w` [..., K] as [..., G, g] groups along K; a last partial group is padded with zeros
    (as ORT MatMulNBits and llama.cpp pad the last block): zeros change neither a symmetric
    absmax nor an asymmetric range, which always spans 0."""
    k = w.shape[-1]
    g = k if group_size == -1 else group_size
    kp = padded_k(k, g)
    if kp != k:
        w = torch.nn.functional.pad(w, (0, kp - k))
    return w.reshape(*w.shape[:-1], kp // g, g)


def quantize_groups(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, bits: int,
                    group_size: int) -> torch.Tensor:
    """Integer values (int8 tensor) of `w` [N, K] with per-group scale/zp [N, ceil(K/g)]."""
    qmin, qmax = qrange(bits)
    n, k = w.shape
    wg = grouped(w, group_size)
    q = torch.round(wg / scale.reshape(n, -1, 1)) + zp.reshape(n, -1, 1).float()
    return q.clamp(qmin, qmax).to(torch.int8).reshape(n, -1)[:, :k]


def dequantize_groups(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                      group_size: int) -> torch.Tensor:
    n, k = q.shape
    qg = grouped(q.float(), group_size) - zp.reshape(n, -1, 1).float()
    return (qg * scale.reshape(n, -1, 1)).reshape(n, -1)[:, :k]


def rtn(w: torch.Tensor, bits: int, group_size: int, symmetric: bool, search: str = "minmax"):
    """Round-to-nearest: (q int8 [N, K], scale [N, ceil(K/g)], zp int8 [N, ceil(K/g)]);
    `search` "mse" picks each group's clipping ratio (fxpress.passes.quant.scale_search)."""
    from .scale_search import qparams
    scale, zp = qparams(grouped(w, group_size), bits, symmetric, search)
    return quantize_groups(w, scale, zp, bits, group_size), scale, zp


@recipe_entry
@dataclass(frozen=True)
class WeightOnly(RecipeEntry):
    """Weight-only int4/int8 quantization of linear weights (activations stay float).

    bits: 4 or 8. group_size: inputs (along K) per scale: 16 | 32 | 64 | 128 | 256, or -1 for
      one scale per output channel; default 128 for int4 and -1 for int8 (what torch's int8
      CPU kernel and llm-compressor's W8A16 take; ORT's MatMulNBits repeats the row scale over
      blocks, exact). Any K is served: where the group does not divide K the
      last group is partial (stored padded, as ORT MatMulNBits and llama.cpp pad the last block).
    method: "rtn" (round to nearest), "gptq" (Hessian-based error compensation, Frantar et al.
      2023) or "awq" (activation-aware per-channel scaling, Lin et al. 2024); gptq/awq need
      ``compress(..., calibration=batches)``.
    symmetric: zero point 0 (True) or one zero point per group (False).
    skip: module-path patterns (fnmatch) left in float; default ("lm_head",) - see module doc.
    damp / act_order / block: GPTQ's Hessian damping (fraction of mean diagonal), column order
      by decreasing Hessian diagonal (with static groups), columns per compensation block.
    awq_grid: AWQ's number of scale exponents tried in [0, 1); awq_clip: also search a
      per-group clipping ratio on the calibration activations.
    scale_search: "minmax" (scales from each group's range) or "mse" (each group's range shrunk
      by the ratio in [0.5, 1] with the least rounding error, weighted by GPTQ's Hessian diagonal
      under gptq; RTN and GPTQ; see fxpress.passes.quant.scale_search).
    sequential: GPTQ only: each linear's Hessian from the outputs of the linears before it
      already quantized (true-sequential, as AutoGPTQ/llm-compressor), not from the float model.
    calib_batches / calib_samples: how much calibration data to read (as Quantize).
    """

    name: ClassVar[str] = "weight_only"
    bits: int = 4
    group_size: int | None = None  # 128 for 4 bits, -1 (one scale per row) for 8 bits
    method: str = "rtn"
    symmetric: bool = True
    skip: tuple = ("lm_head",)
    damp: float = 0.01
    act_order: bool = False
    block: int = 128
    awq_grid: int = 20
    awq_clip: bool = True
    scale_search: str = "minmax"
    sequential: bool = False
    calib_batches: int | None = None
    calib_samples: int = 128

    def __post_init__(self):
        if self.bits not in BITS:
            raise RecipeError("weight-only quantization supports 4 or 8 bits", field="bits",
                              value=self.bits, accepted=BITS)
        if self.group_size is None:
            object.__setattr__(self, "group_size", 128 if self.bits == 4 else -1)
        check_choice("group_size", self.group_size, GROUP_SIZES)
        check_choice("method", self.method, METHODS)
        check_choice("symmetric", self.symmetric, (True, False))
        check_choice("act_order", self.act_order, (False, True))
        check_choice("awq_clip", self.awq_clip, (True, False))
        check_choice("scale_search", self.scale_search, ("minmax", "mse"))
        check_choice("sequential", self.sequential, (False, True))
        if self.sequential and self.method != "gptq":
            raise RecipeError(f"sequential=True is GPTQ's true-sequential order, not {self.method}'s",
                              field="sequential", value=self.sequential, accepted=("gptq",))
        check_range("damp", self.damp, 0.0, 1.0, lo_open=True)
        check_range("block", self.block, 1)
        check_range("awq_grid", self.awq_grid, 1)
        check_range("calib_samples", self.calib_samples, 1)
        if self.calib_batches is not None:
            check_range("calib_batches", self.calib_batches, 1)
        skip = (self.skip,) if isinstance(self.skip, str) else tuple(self.skip)
        for s in skip:
            if not isinstance(s, str):
                raise RecipeError("skip patterns are module-path strings", field="skip", value=s)
        object.__setattr__(self, "skip", skip)

    def skipped(self, module: str) -> bool:
        # "lm_head" also names "model.lm_head" (an HF model inside a user's wrapper)
        return any(fnmatch.fnmatchcase(module, p) or module.startswith(p + ".") or
                   fnmatch.fnmatchcase(module, "*." + p) for p in self.skip)

    def passes(self) -> list[Pass]:
        from ..cleanup import DeadCodeElimination
        return [WeightOnlyQuant(self), DeadCodeElimination()]


def target_linears(gm: fx.GraphModule, cfg: WeightOnly) -> list[fx.Node]:
    """Linears whose weight is a 2-d float get_attr read only by them, not skipped."""
    out = []
    for n in gm.graph.nodes:
        if not (n.op == "call_function" and n.target is aten.linear.default):
            continue
        w = n.args[1]
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and len(w.users) == 1):
            continue
        t = fetch_attr(gm, w.target)
        if t.dim() != 2 or not t.is_floating_point() or cfg.skipped(module_path(n)):
            continue
        out.append(n)
    return out


class _Recorder(fx.Interpreter):
    """Runs the IR and hands each target linear's input activation to `observe(node, x)`."""

    def __init__(self, gm, targets, observe):
        super().__init__(gm)
        self.targets, self.observe = set(targets), observe

    def run_node(self, n):
        if n in self.targets:
            x = self.env[n.args[0]]
            self.observe(n, x.detach().reshape(-1, x.shape[-1]).float())
        return super().run_node(n)


def _causal_lm_batch(gm: fx.GraphModule, batch, index: int) -> list | None:
    """A KV-explicit causal-LM IR (fxpress.llm.capture) calibrates on token batches of any length:
    ``(input_ids,)`` or ``(input_ids, attention_mask)`` completed as the IR's own calls are (no
    past, positions from the mask), flattened in placeholder order. None for other IRs."""
    from ...llm.capture import causal_lm_spec, complete_call
    if causal_lm_spec(gm) is None:
        return None
    from ...errors import InputError
    from ...utils import as_input_tuple
    args, _ = complete_call(gm, as_input_tuple(batch), {})
    flat = torch.utils._pytree.tree_leaves(args)
    n_ph = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    if len(flat) != n_ph:
        raise InputError(f"calibration batch {index} gives {len(flat)} input tensors after "
                         f"completion; the causal LM takes {n_ph}", index=index)
    return flat


def collect_linear_inputs(gm: fx.GraphModule, ctx: PassContext, cfg: WeightOnly,
                          targets: list[fx.Node], observe) -> int:
    """Feed calibration batches through the IR, calling observe(linear, x2d); returns batches."""
    seen = 0
    with torch.no_grad():
        for flat in flat_calibration(gm, ctx, cfg):
            _Recorder(gm, targets, observe).run(*flat)
            seen += 1
    if seen == 0:
        raise CalibrationError("calibration is empty: the iterable gave no batches")
    return seen


def flat_calibration(gm: fx.GraphModule, ctx: PassContext, cfg: WeightOnly):
    """Each calibration batch as the IR's flat placeholder values (causal-LM token batches
    completed); raises CalibrationError without calibration data."""
    from .calibrate import calibration_batches, check_batch
    if ctx.calibration is None:
        raise CalibrationError(f"WeightOnly(method={cfg.method!r}) reads activations: pass "
                               "compress(..., calibration=batches) (an iterable of input batches, "
                               "e.g. 128 sequences of real text)")
    for i, b in calibration_batches(ctx, cfg, required=True):
        flat = _causal_lm_batch(gm, b, i)
        yield check_batch(gm, b, i) if flat is None else flat


def _rewrite(gm: fx.GraphModule, lin: fx.Node, q: torch.Tensor, scale: torch.Tensor,
             zp: torch.Tensor, cfg: WeightOnly) -> None:
    """weight get_attr -> int8 get_attr -> dequantize(_per_channel_group) [-> slice] -> linear.

    Where the group does not divide K the int8 tensor is stored padded to whole groups (the
    padding holds the zero point, so it dequantizes to 0) and ``aten.slice(dq, 1, 0, K)``
    gives the linear its [N, K] weight: the standard decomposed op needs whole groups."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)
    qd = torch.ops.quantized_decomposed
    w_node = lin.args[1]
    w = fetch_attr(gm, w_node.target)
    n, k = w.shape
    kp = padded_k(k, cfg.group_size)
    qmin, qmax = qrange(cfg.bits)
    base = str(w_node.target)
    if kp != k:
        q = torch.cat([q, zp.reshape(n, -1)[:, -1:].to(torch.int8).expand(n, kp - k)], 1)
    q_t = register_tensor(gm, base + "_int8", q.contiguous())
    if cfg.group_size == -1:
        s_t = register_tensor(gm, base + "_scale", scale.reshape(n).float())
        z_t = register_tensor(gm, base + "_zero_point", zp.reshape(n).to(torch.int64))
    else:
        s_t = register_tensor(gm, base + "_scale", scale.reshape(n, kp // cfg.group_size).float())
        z_t = None if cfg.symmetric else register_tensor(
            gm, base + "_zero_point", zp.reshape(n, kp // cfg.group_size).to(torch.int32))
    g = gm.graph
    sl = None
    with g.inserting_before(lin):
        qn, sn = g.get_attr(q_t), g.get_attr(s_t)
        zn = g.get_attr(z_t) if z_t is not None else None
        if cfg.group_size == -1:
            dq = g.call_function(qd.dequantize_per_channel.default,
                                 (qn, sn, zn, 0, qmin, qmax, torch.int8))
        else:
            dq = g.call_function(qd.dequantize_per_channel_group.default,
                                 (qn, sn, zn, qmin, qmax, torch.int8, cfg.group_size, w.dtype))
        if kp != k:
            sl = g.call_function(aten.slice.Tensor, (dq, 1, 0, k))
    lin.replace_input_with(w_node, sl if sl is not None else dq)
    lin0 = lineage(lin)
    for node in (qn, sn, zn, dq, sl):
        if node is not None and lin0 is not None:
            set_record(node, lin0.derived("get_attr" if node.op == "get_attr" else str(node.target)))
    set_record(dq, QuantSpec(dtype="int4" if cfg.bits == 4 else "int8", qscheme="per_channel",
                             symmetric=cfg.symmetric, axis=0))
    set_record(dq, WeightOnlySpec(cfg.bits, cfg.group_size, cfg.method, cfg.symmetric, k, n))
    if sl is not None:
        sl.meta["val"] = w_node.meta.get("val")
        dq.meta["val"] = torch.empty((n, kp), dtype=w.dtype, device="meta")
    else:
        dq.meta["val"] = w_node.meta.get("val")
    for node, t in ((qn, q), (sn, fetch_attr(gm, s_t))):
        node.meta["val"] = t
    if zn is not None:
        zn.meta["val"] = fetch_attr(gm, z_t)
    g.erase_node(w_node)
    owner, _, attr = base.rpartition(".")
    delattr(gm.get_submodule(owner) if owner else gm, attr)


@dataclass(frozen=True)
class WeightOnlyQuant(Pass):
    """Quantize the weights of the config's target linears (RTN / GPTQ / AWQ) into the Q/DQ form."""

    name: ClassVar[str] = "quant_weight_only"
    config: Any = None

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config or WeightOnly()
        from .weight_ops import WeightOps  # GPT-2's Conv1D addmm, Falcon's x @ W.T -> linear
        done = WeightOps().run(gm, ctx)
        gm, ops = done.graph_module, done.stats
        targets = target_linears(gm, cfg)
        stats: dict[str, Any] = {"method": cfg.method, "bits": cfg.bits,
                                 "group_size": cfg.group_size}
        if any(k != "left" for k in ops):
            stats["to_linear"] = {k: v for k, v in ops.items() if k != "left"}
        if cfg.method == "gptq":
            from .gptq import gptq_targets
            results = gptq_targets(gm, ctx, cfg, targets, stats)
        elif cfg.method == "awq":
            from .awq import awq_targets
            results = awq_targets(gm, ctx, cfg, targets, stats)
        else:
            results = {}
            for lin in targets:
                w = fetch_attr(gm, lin.args[1].target).detach().float()
                results[lin] = rtn(w, cfg.bits, cfg.group_size, cfg.symmetric, cfg.scale_search)
        for lin, (q, scale, zp) in results.items():
            _rewrite(gm, lin, q, scale, zp, cfg)
        gm.graph.lint()
        gm.recompile()
        stats["quantized"] = len(results)
        stats["layers"] = [module_path(n) for n in results]
        return PassResult(gm, bool(results), stats)
