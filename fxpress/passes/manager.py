"""PassManager: runs passes in order, verifies, times, and names the pass that failed.

    pm = PassManager([FoldBatchNorm(), DeadCodeElimination()], debug=True)
    gm, report = pm.run(gm, PassContext(example_inputs=(x,)))
    print(report)
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.fx as fx

from ..errors import FxpressError, PassError, VerificationError
from .base import Pass, PassContext

__all__ = ["PassManager", "PassRecord", "Report"]

# Properties a pass may `require` that the manager can establish by itself.
_PROVIDERS: dict[str, str] = {"shapes": "fxpress.passes.analysis.shape_prop:ShapeProp"}
# Properties that any modifying pass invalidates unless it lists them in `ensures`.
_FRAGILE = ("shapes",)


@dataclass
class PassRecord:
    name: str
    modified: bool
    seconds: float
    stats: dict[str, Any]
    iteration: int = 0


@dataclass
class Report:
    """Per-pass stats plus free sections (sensitivity, lowerability, ...)."""

    passes: list[PassRecord] = field(default_factory=list)
    sections: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        for r in reversed(self.passes):
            if r.name == key:
                return r.stats
        return self.sections[key]

    def __contains__(self, key: str) -> bool:
        return key in self.sections or any(r.name == key for r in self.passes)

    def to_dict(self) -> dict[str, Any]:
        return {"passes": [vars(r) for r in self.passes], "sections": dict(self.sections)}

    def __str__(self) -> str:
        rows = ["| pass | modified | ms | stats |", "| --- | --- | --- | --- |"]
        for r in self.passes:
            stats = ", ".join(f"{k}={_short(v)}" for k, v in r.stats.items())
            rows.append(f"| {r.name} | {'yes' if r.modified else 'no'} | {r.seconds * 1e3:.1f} | {stats} |")
        for k, v in self.sections.items():
            rows.append(f"\n{k}:\n{_section_text(v)}")
        return "\n".join(rows)


def _section_text(v: Any) -> str:
    """A section as text: a list of dicts as a table, a dict as one `key: value` line per key."""
    if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
        cols = list(dict.fromkeys(k for r in v for k in r))
        lines = ["| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        lines += ["| " + " | ".join(_short(r.get(c, "")) for c in cols) + " |" for r in v]
        return "\n".join(lines)
    if type(v) is dict:
        return "\n".join(f"  {k}: {_short(x)}" for k, x in v.items())
    return str(v)


def _short(v: Any) -> str:
    s = f"{v:.4g}" if isinstance(v, float) else str(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _provider(prop: str) -> Pass:
    import importlib
    mod, cls = _PROVIDERS[prop].split(":")
    return getattr(importlib.import_module(mod), cls)()


_COMBINED: dict[type, type] = {}


def _pass_error(name: str, done: list[str], cause: BaseException) -> PassError:
    """A PassError naming the pass; when the cause is one of our typed user errors (InputError,
    CalibrationError, RecipeError, ...) the error is an instance of that type too, so
    ``except fxpress.InputError`` works whichever pass raised it."""
    if not isinstance(cause, FxpressError) or isinstance(cause, PassError):
        return PassError(name, done, cause)
    cls = _COMBINED.get(type(cause))
    if cls is None:
        cls = type(type(cause).__name__, (PassError, type(cause)),
                   {"__module__": type(cause).__module__, "__doc__": type(cause).__doc__})
        _COMBINED[type(cause)] = cls
    err = cls.__new__(cls)
    PassError.__init__(err, name, done, cause)  # (its super() also runs the cause type's __init__)
    err.__dict__.update({k: v for k, v in cause.__dict__.items() if k not in err.__dict__ or
                         err.__dict__[k] is None})  # field / input_name / op ... stay readable
    return err


class PassManager:
    """Run `passes` in order; with `fixed_point=True` repeat until none modifies (max_iter).

    With `debug=True` the verifier runs after every pass and a broken invariant is a
    VerificationError naming that pass.
    """

    def __init__(self, passes: Sequence[Pass], *, fixed_point: bool = False, max_iter: int = 10,
                 debug: bool = False):
        self.passes = list(passes)
        self.fixed_point, self.max_iter, self.debug = fixed_point, max_iter, debug

    def run(self, gm: fx.GraphModule, ctx: PassContext | None = None,
            report: Report | None = None) -> tuple[fx.GraphModule, Report]:
        from ..ir.verify import verify

        ctx = ctx or PassContext(debug=self.debug)
        report = report if report is not None else Report()
        report.sections = ctx.report if not report.sections else report.sections
        ctx.report = report.sections
        done: list[str] = []
        established: set[str] = set()
        for it in range(self.max_iter if self.fixed_point else 1):
            any_modified = False
            for p in self.passes:
                for prop in p.requires:
                    if prop not in established:
                        if prop not in _PROVIDERS:
                            raise PassError(p.name, done, FxpressError(
                                f"requires {prop!r}, which no earlier pass ensures"))
                        gm = self._run_one(_provider(prop), gm, ctx, report, done, it).graph_module
                        established.add(prop)
                res = self._run_one(p, gm, ctx, report, done, it)
                gm = res.graph_module
                if res.modified:
                    any_modified = True
                    established -= {x for x in _FRAGILE if x not in p.ensures}
                    established -= set(p.invalidates)
                established |= set(p.ensures)
                if self.debug or ctx.debug:
                    problems = verify(gm, raise_on_error=False)
                    if problems:
                        raise VerificationError(problems, after=p.name)
            if not any_modified:
                break
        return gm, report

    @staticmethod
    def _run_one(p: Pass, gm, ctx, report: Report, done: list[str], it: int):
        t0 = time.perf_counter()
        try:
            res = p.run(gm, ctx)
        except PassError:
            raise
        except Exception as e:  # name the pass; keep the cause chained for the traceback
            raise _pass_error(p.name, done, e) from e
        if res is None or not isinstance(res.graph_module, fx.GraphModule):
            raise PassError(p.name, done, TypeError("run() must return PassResult(graph_module, ...)"))
        if res.graph_module is not gm:  # a rebuilt GraphModule keeps the IR's meta (signature)
            for k, v in gm.meta.items():
                res.graph_module.meta.setdefault(k, v)
        report.passes.append(PassRecord(p.name, bool(res.modified), time.perf_counter() - t0,
                                        dict(res.stats), it))
        done.append(p.name)
        return res
