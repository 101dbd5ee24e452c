"""Typed errors. Each names what was wrong: the node, op, field, input or file.

    >>> raise RecipeError("ratio must be in (0, 1)", field="ratio", value=1.5)
"""
from __future__ import annotations

__all__ = [
    "FxpressError", "CaptureError", "InputError", "RecipeError", "UnsupportedOpError",
    "PassError", "VerificationError", "CalibrationError", "LoweringError", "CoverageWarning",
]


class FxpressError(Exception):
    """Base of every error fxpress raises on purpose."""


class CaptureError(FxpressError):
    """The model could not be captured into the IR.

    `op` and `source` name what the tracer refused and where (file:line).
    """

    def __init__(self, message: str, *, op: str | None = None, source: str | None = None,
                 frontend: str = "export"):
        self.op, self.source, self.frontend = op, source, frontend
        parts = [message]
        if op:
            parts.append(f"op: {op}")
        if source:
            parts.append(f"at: {source}")
        if frontend == "export":
            parts.append('hint: try fxpress.capture(..., frontend="fx") for models torch.export rejects')
        super().__init__("\n  ".join(parts))


class InputError(FxpressError, ValueError):
    """Example or calibration inputs that do not fit the model; names the input."""

    def __init__(self, message: str, *, input_name: str | None = None, index: int | None = None):
        self.input_name, self.index = input_name, index
        super().__init__(message)


class RecipeError(FxpressError, ValueError):
    """A recipe or pass config is invalid; names the field, the value and what is accepted."""

    def __init__(self, message: str, *, field: str | None = None, value=None, accepted=None):
        self.field, self.value, self.accepted = field, value, accepted
        parts = [message]
        if field is not None:
            parts.append(f"field: {field}={value!r}")
        if accepted is not None:
            parts.append(f"accepted: {', '.join(map(str, accepted))}")
        super().__init__("; ".join(parts))


class UnsupportedOpError(FxpressError, NotImplementedError):
    """An op a pass or backend has no rule for; names the op and the node."""

    def __init__(self, op, node=None, *, where: str = "", module: str | None = None):
        self.op, self.node_name, self.module = op, getattr(node, "name", node), module
        msg = f"unsupported op {op}"
        if self.node_name:
            msg += f" at node {self.node_name!r}"
        if module:
            msg += f" (module {module!r})"
        if where:
            msg += f" in {where}"
        super().__init__(msg)


class PassError(FxpressError):
    """A pass failed; names the pass and the passes that ran before it."""

    def __init__(self, pass_name: str, previous: list[str], cause: BaseException):
        self.pass_name, self.previous, self.cause = pass_name, list(previous), cause
        before = " -> ".join(previous) if previous else "(none)"
        super().__init__(f"pass {pass_name!r} failed: {type(cause).__name__}: {cause}\n"
                         f"  passes run before it: {before}")


class VerificationError(FxpressError):
    """The IR broke an invariant; lists every problem found."""

    def __init__(self, problems: list[str], *, after: str | None = None):
        self.problems = list(problems)
        head = f"IR verification failed after {after!r}" if after else "IR verification failed"
        super().__init__(head + ":\n  - " + "\n  - ".join(self.problems))


class CalibrationError(FxpressError, ValueError):
    """Calibration data is missing, empty, mis-shaped, or produced NaN/inf at a node."""


class LoweringError(FxpressError):
    """A backend could not build or run the artefact."""


class CoverageWarning(UserWarning):
    """A recipe changed nothing, or left more than 10 % of the weight-bearing MACs untouched;
    the message names the op kinds left float and why (no rule, policy, sensitivity, latency)."""
