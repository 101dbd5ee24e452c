"""The IR: records, verifier, printer."""
from .meta import *  # noqa: F401,F403
from .meta import __all__ as _meta_all
from .verify import verify
from .printer import format_graph, format_record

__all__ = list(_meta_all) + ["verify", "format_graph", "format_record"]
