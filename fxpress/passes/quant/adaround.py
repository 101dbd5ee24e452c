"""AdaRound: learn whether each int8 weight rounds up or down (Nagel et al. 2020, "Up or Down?").

Rounding to nearest minimizes each weight's own error, not the layer's output error. AdaRound
writes a weight as ``s * clamp(floor(w / s) + h(V), qmin, qmax)`` with a soft rounding
variable ``h(V) = clamp(sigmoid(V) * (zeta - gamma) + gamma, 0, 1)`` (zeta 1.1, gamma -0.1,
V initialized so h is the fractional part) and minimizes, per layer,

    || W x_fp - W~(V) x_q ||^2 / rows  +  lambda * sum(1 - |2 h(V) - 1|^beta)

(output channels summed, rows averaged, as AIMET), beta annealed 20 -> 2 (cosine) after a
20 % warm start with lambda 0; then ``h >= 0.5`` rounds up. Inputs: ``x_fp`` is the layer's
input in the float model, ``x_q`` its input in the quantized-so-far model (int8 activations,
the earlier layers already AdaRounded): the paper's asymmetric reconstruction, AIMET's default.

Per layer (int8 conv1d / conv2d / linear, symmetric weights: the default per-channel
``[-127, 127]``) with the scales the conversion chooses (a converted copy of the graph is the
quantized model, so the host's weight form, s7 included, is respected). Work is bounded:
at most `max_rows` rows (output positions, sampled with a fixed seed) per layer, reduced to a
Gram matrix ``X_q^T X_q`` and ``(W X_fp^T) X_q`` once (or kept as rows when fewer rows than
the layer's fan-in), so each of the `iterations` full-batch Adam steps costs one
``[C_out, K] x [K, K]`` product. Elements at the clip (``q = qmin`` / ``qmax``, the range's
ends) keep their nearest value so the weight range, hence the scale, does not move.

Runs after Calibrate (and Sensitivity), before ConvertToQDQ: the float weight in the IR is
replaced by its rounded grid value ``s * q``, which the conversion reproduces exactly (checked
on a converted copy; a layer it would not reproduce, or whose rounded loss is not below
nearest's, keeps its float weight). ``report["adaround"]`` has a row per layer. A later
BiasCorrection pass would take those grid weights for the float model, so
``Quantize(bias_correction=True | "auto")`` corrects inside this sweep instead (auto: where
``bias_correction.auto_skip`` would correct) (`correct_bias`: after
each layer, ``E[y_fp] - E[y_q]`` per output channel against the float weights; measured on the
real EfficientNet-Lite0: logits 27.7 dB vs fp32, 22.0 dB with the separate pass after it).

    fxpress.Quantize(mode="static", adaround=True)      # 500 iterations per layer
    fxpress.Quantize(mode="static", adaround=2000)      # that many
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import fx

from ...ir.meta import module_path
from ..base import Pass, PassContext, PassResult
from .bias_correction import _add_to_bias, _channel_mean, _quantized_layer, _Runner, auto_skip
from .calibrate import calibration_batches, check_batch
from .convert import ConvertToQDQ, fetch_attr

__all__ = ["DEFAULT_ITERATIONS", "AdaRound", "rectified_sigmoid"]

aten = torch.ops.aten
DEFAULT_ITERATIONS = 500
ZETA, GAMMA = 1.1, -0.1
_CONV = {aten.conv1d.default: 1, aten.conv2d.default: 2}


def rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    """h(V) in [0, 1]: AdaRound's soft rounding (eq. 23)."""
    return (torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)


def _init_v(rest: torch.Tensor) -> torch.Tensor:
    """V with h(V) = rest (the fractional part of w / s)."""
    r = rest.clamp(1e-4, 1 - 1e-4)
    return -torch.log((ZETA - GAMMA) / (r - GAMMA) - 1)


def _conv_args(n: fx.Node) -> dict:
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    out = dict(zip(names, n.args))
    out.update(n.kwargs)
    d = _CONV[n.target]
    def tup(v, dflt):
        return tuple(v) if isinstance(v, (list, tuple)) else (dflt if v is None else v,) * d
    return {"stride": tup(out.get("stride"), 1), "padding": tup(out.get("padding"), 0),
            "dilation": tup(out.get("dilation"), 1), "groups": int(out.get("groups") or 1)}


def _rows(n: fx.Node, x: torch.Tensor, w_shape, pick) -> torch.Tensor:
    """The layer's input as matmul rows [groups, m, K/groups] at the output positions `pick`
    (indices into batch x positions, for this batch)."""
    if n.target is aten.linear.default:
        return x.reshape(-1, x.shape[-1])[pick].unsqueeze(0).float()
    a = _conv_args(n)
    if n.target is aten.conv1d.default:
        x = x.unsqueeze(-2)
        a = {k: ((1 if k != "padding" else 0,) + v if k != "groups" else v) for k, v in a.items()}
        w_shape = tuple(w_shape[:2]) + (1,) + tuple(w_shape[2:])
    g, kk = a["groups"], int(math.prod(w_shape[2:]))
    per = None
    out = []
    for i in range(x.shape[0]):  # per sample: an unfolded batch can be large
        cols = F.unfold(x[i:i + 1].float(), w_shape[2:], a["dilation"], a["padding"], a["stride"])
        per = cols.shape[-1]
        sel = pick[(pick >= i * per) & (pick < (i + 1) * per)] - i * per
        out.append(cols[0][:, sel])
    cols = torch.cat(out, 1)                                      # [Cin * kk, m]
    return cols.reshape(g, (x.shape[1] // g) * kk, -1).transpose(1, 2)


def _call(n: fx.Node, env: dict, k: int, weight: torch.Tensor) -> torch.Tensor:
    """`n` (a conv / linear) on batch k of `env` with `weight` in place of its own."""
    args = list(fx.node.map_arg(n.args, lambda a: env[a][k]))
    args[1] = weight
    return n.target(*args, **fx.node.map_arg(n.kwargs, lambda a: env[a][k]))


def _converted(gm: fx.GraphModule, ctx: PassContext, cfg) -> fx.GraphModule:
    """A copy of the observed graph converted as ConvertToQDQ will convert it (the int8 model)."""
    qgm = copy.deepcopy(gm)
    ConvertToQDQ(weight_range=cfg.weight_range if cfg is not None else "auto").run(
        qgm, PassContext(example_inputs=ctx.example_inputs))
    return qgm


class _Stepper:
    """Advance a _Runner node by node up to a named node (its inputs still held)."""

    def __init__(self, run: _Runner):
        self.run, self.pos, self.pending = run, 0, None

    def until(self, name: str) -> fx.Node | None:
        r = self.run
        while self.pos < len(r.nodes):
            n = r.nodes[self.pos]
            if self.pending is not None:
                for a in [a for a in r.env if r.last.get(a, -1) <= self.pending]:
                    del r.env[a]
            self.pending, self.pos = self.pos, self.pos + 1
            if n.op == "output":
                continue
            r.env[n] = [r._value(n, k) for k in range(len(r.batches))]
            if n.name == name:
                return n
        return None


@dataclass(frozen=True)
class AdaRound(Pass):
    """Learn up/down rounding of each int8 conv/linear weight on the calibration data."""

    name: ClassVar[str] = "quant_adaround"
    config: Any = None
    iterations: int = DEFAULT_ITERATIONS
    max_rows: int = 16384
    lr: float = 1e-2
    reg: float = 0.01
    warm_start: float = 0.2
    beta: tuple = (20.0, 2.0)
    seed: int = 0
    correct_bias: bool | str = False   # "auto": where bias_correction.auto_skip finds no reason

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        correct = self.correct_bias is True or (self.correct_bias == "auto"
                                                and auto_skip(gm, ctx) is None)
        batches = [tuple(check_batch(gm, b, i))  # flat, in placeholder order
                   for i, b in calibration_batches(ctx, cfg, required=True)]
        qgm = _converted(gm, ctx, cfg)
        layers = [n for n in qgm.graph.nodes if _quantized_layer(n)]
        by_name = {n.name: n for n in gm.graph.nodes}
        rows, changed, t0 = [], {}, time.perf_counter()
        with torch.no_grad():
            fp = _Stepper(_Runner(gm, batches, float_mode=True))
            q = _Stepper(_Runner(qgm, batches, float_mode=False))
            for i, qn in enumerate(layers):
                fn = by_name.get(qn.name)
                why = self._unsupported(qgm, fn, qn)
                if why is None and (fp.until(qn.name) is None or q.until(qn.name) is None):
                    why = "not reached by the calibration batches"
                if why is not None:
                    rows.append({"layer": module_path(fn or qn), "kept": "nearest", "reason": why})
                    continue
                row = self._layer(gm, qgm, fn, qn, fp.run, q.run, i, changed, correct)
                rows.append(row)
        for fn, (target, old) in self._unreproduced(gm, ctx, cfg, changed).items():
            fetch_attr(gm, target).copy_(old)
            row = next(r for r in rows if r["layer"] == module_path(fn))
            row["kept"], row["reason"] = "nearest", "conversion does not reproduce the grid"
        if any("bias_shift_max" in r for r in rows):
            gm.graph.lint()
            gm.recompile()
        done = sum(r["kept"] == "adaround" for r in rows)
        ctx.report["adaround"] = rows
        return PassResult(gm, done > 0, {"layers": done, "kept_nearest": len(rows) - done,
                                         "iterations": self.iterations,
                                         "seconds": round(time.perf_counter() - t0, 1)})

    @staticmethod
    def _unsupported(qgm, fn: fx.Node | None, qn: fx.Node) -> str | None:
        if qn.target not in _CONV and qn.target is not aten.linear.default:
            return f"{qn.target} (AdaRound covers conv1d / conv2d / linear)"
        if fn is None or not isinstance(fn.args[1], fx.Node) or fn.args[1].op != "call_module":
            return "no weight observer in the IR"
        w = fn.args[1].args[0]
        if not (isinstance(w, fx.Node) and w.op == "get_attr") or len(w.users) != 1 \
                or len(fn.args[1].users) != 1:
            return "shared or computed weight"
        dq = qn.args[1]
        zp = fetch_attr(qgm, dq.args[2].target) if isinstance(dq.args[2], fx.Node) else dq.args[2]
        if bool(torch.as_tensor(zp).any()):
            return "affine weights (AdaRound keeps the range only for symmetric grids)"
        return None

    def _layer(self, gm, qgm, fn, qn, fp: _Runner, q: _Runner, index: int, changed: dict,
               correct: bool) -> dict:
        t0 = time.perf_counter()
        w_node = fn.args[1].args[0]
        w = fetch_attr(gm, w_node.target).detach().float()
        dq = qn.args[1]
        q0 = fetch_attr(qgm, dq.args[0].target)
        if isinstance(dq.args[1], fx.Node):
            scale = fetch_attr(qgm, dq.args[1].target).float()
            axis, qmin, qmax = dq.args[3:6]
            view = [1] * w.dim()
            view[axis] = -1
            s = scale.reshape(view)
        else:
            s, qmin, qmax = torch.tensor(float(dq.args[1])), dq.args[3], dq.args[4]
        g = _conv_args(qn)["groups"] if qn.target in _CONV else 1
        shape = w.shape
        xq, xf = q.env[qn.args[0]], fp.env[fn.args[0]]
        stats = self._statistics(qn, xq, xf, w, g, index, [y.shape for y in q.env[qn]])
        floor = torch.floor(w / s)
        pinned = (q0 == qmin) | (q0 == qmax)
        q_near = q0.float()

        def grid(h):
            return torch.where(pinned, q_near, (floor + h).clamp(qmin, qmax))

        loss = lambda qq: self._loss((qq * s).reshape(g, shape[0] // g, -1), stats)
        before = loss(q_near)
        v = _init_v(w / s - floor)
        base = torch.where(pinned, q_near, floor) * s
        h_hard = self._optimize(v, base, (~pinned).float() * s, g, shape, stats)
        q_ada = grid(h_hard)
        after = loss(q_ada)
        free = ~pinned
        row = {"layer": module_path(fn), "weights": w.numel(), "rows": stats["m"],
               "mse_nearest": before / shape[0], "mse_adaround": after / shape[0],
               "rounded_up": round(float(h_hard[free].mean()) if free.any() else 0.0, 4),
               "changed_vs_nearest": round(float((q_ada != q_near).float().mean()), 4),
               "seconds": round(time.perf_counter() - t0, 2)}
        if not after < before:
            row["kept"], row["reason"] = "nearest", "AdaRound's loss not below nearest's"
            q_ada = q_near
        else:
            row["kept"] = "adaround"
            changed[fn] = (w_node.target, fetch_attr(gm, w_node.target).detach().clone())
            fetch_attr(gm, w_node.target).copy_((q_ada * s).to(fetch_attr(gm, w_node.target).dtype))
        outs = [_call(qn, q.env, k, (q_ada * s).to(w.dtype)) for k in range(len(q.batches))]
        if correct:  # E[y_fp] - E[y_q] against the float weights, in the same sweep
            axis = 1 if qn.target in _CONV else -1
            shift = _channel_mean(fp.env[fn], axis) - _channel_mean(outs, axis)
            if bool(torch.isfinite(shift).all()) and _add_to_bias(gm, fn, shift):
                view = [1] * outs[0].dim()
                view[axis] = -1
                outs = [y + shift.reshape(view) for y in outs]
                row["bias_shift_max"] = float(shift.abs().max())
        q.env[qn] = outs                                          # later layers read it
        return row

    def _statistics(self, qn, xq: list, xf: list, w: torch.Tensor, g: int, index: int,
                    out_shapes: list) -> dict:
        """Rows sampled from every batch -> {gram, cross, const, m} or {xq, yf, m} (few rows)."""
        per_batch = [int(math.prod(s[:-1])) if qn.target is aten.linear.default
                     else int(s[0] * math.prod(s[2:])) for s in out_shapes]
        total = sum(per_batch)
        m_target = min(total, self.max_rows)
        gen = torch.Generator().manual_seed(self.seed + index)
        wg = w.reshape(g, w.shape[0] // g, -1)                     # [g, Co, K]
        k = wg.shape[-1]
        keep_rows = m_target <= k
        acc = {"m": 0}
        for b, n_rows in enumerate(per_batch):
            take = n_rows if total <= self.max_rows else round(m_target * n_rows / total)
            if take <= 0:
                continue
            pick = torch.randperm(n_rows, generator=gen)[:take].sort().values
            rq = _rows(qn, xq[b], w.shape, pick)                   # [g, m, K]
            rf = _rows(qn, xf[b], w.shape, pick)
            yf = rf @ wg.transpose(1, 2)                           # [g, m, Co]: W x_fp
            if keep_rows:
                for key, val in (("xq", rq), ("yf", yf)):
                    acc[key] = torch.cat([acc[key], val], 1) if key in acc else val
            else:
                rq64, yf64 = rq.double(), yf.double()
                parts = {"gram": rq64.transpose(1, 2) @ rq64, "cross": yf64.transpose(1, 2) @ rq64,
                         "const": yf64.pow(2).sum()}
                for key, val in parts.items():
                    acc[key] = acc[key] + val if key in acc else val
            acc["m"] += take
        return acc

    @staticmethod
    def _loss(wg: torch.Tensor, st: dict) -> float:
        """sum over output channels, mean over rows of (W x_fp - W~ x_q)^2 (float64)."""
        wg = wg.double()
        if "xq" in st:
            err = st["xq"].double() @ wg.transpose(1, 2) - st["yf"].double()
            return float(err.pow(2).sum() / st["m"])
        quad = ((wg @ st["gram"]) * wg).sum() - 2 * (st["cross"] * wg).sum() + st["const"]
        return float(quad.clamp(min=0) / st["m"])

    def _optimize(self, v, base, sfree, g, shape, st) -> torch.Tensor:
        """Adam on V with the full-batch gradient derived by hand (one Gram product a step):
        W~ = base + sfree * h(V), base = s * (nearest where pinned, else floor(w / s))."""
        gram = st["gram"].float() / st["m"] if "gram" in st else None
        cross = st["cross"].float() / st["m"] if "gram" in st else None
        xq, yf = st.get("xq"), st.get("yf")
        v = v.clone()
        opt = torch.optim.Adam([v], lr=self.lr, fused=True)
        warm = int(self.warm_start * self.iterations)
        b0, b1 = self.beta
        for it in range(self.iterations):
            sig = torch.sigmoid(v)
            raw = sig.mul(ZETA - GAMMA).add_(GAMMA)
            h = raw.clamp(0.0, 1.0)
            wt = torch.addcmul(base, sfree, h).reshape(g, shape[0] // g, -1)
            if gram is not None:
                gw = torch.baddbmm(cross, wt, gram, beta=-2, alpha=2)       # 2 (W~ G - C)
            else:
                err = torch.baddbmm(yf, xq, wt.transpose(1, 2), beta=-1)   # [g, m, Co]
                gw = err.transpose(1, 2) @ xq * (2 / st["m"])
            gh = gw.reshape(shape).mul_(sfree)
            if it >= warm:  # d/dh of reg * sum(1 - |2h - 1|^beta)
                rel = (it - warm) / max(self.iterations - warm, 1)
                beta = b1 + 0.5 * (b0 - b1) * (1 + math.cos(rel * math.pi))
                d = h.mul(2).sub_(1)
                gh.sub_(d.abs().pow_(beta - 2).mul_(d), alpha=2 * self.reg * beta)
            gh.mul_(sig.mul_(1 - sig)).mul_((raw > 0) & (raw < 1)).mul_(ZETA - GAMMA)
            v.grad = gh
            opt.step()
        return (v >= 0).float()                                   # h(V) >= 0.5: round up

    @staticmethod
    def _unreproduced(gm, ctx, cfg, changed: dict) -> dict:
        """Layers whose rounded grid the conversion would not reproduce exactly."""
        if not changed:
            return {}
        probe = _converted(gm, ctx, cfg)
        layers = {n.name: n for n in probe.graph.nodes if _quantized_layer(n)}
        bad = {}
        for fn, (target, old) in changed.items():
            qn = layers.get(fn.name)
            dq = qn.args[1] if qn is not None else None
            if dq is None:
                bad[fn] = (target, old)
                continue
            wq = fetch_attr(probe, dq.args[0].target).float()
            if isinstance(dq.args[1], fx.Node):
                scale = fetch_attr(probe, dq.args[1].target).float()
                view = [1] * wq.dim()
                view[dq.args[3]] = -1
                deq = wq * scale.reshape(view)
            else:
                deq = wq * float(dq.args[1])
            if not torch.allclose(deq, fetch_attr(gm, target).float(), rtol=1e-5, atol=0):
                bad[fn] = (target, old)
        return bad
