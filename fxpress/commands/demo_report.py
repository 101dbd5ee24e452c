"""`fxpress demo`'s output: the row record, markdown tables, speed-up lines and the Pareto plot."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["Row", "table", "pareto_plot"]


@dataclass
class Row:
    step: str
    backend: str
    params: int
    size_kb: float
    macs: int
    latency_ms: float
    quality: dict[str, float] = field(default_factory=dict)
    note: str = ""


def _fmt_int(n: int) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(n)


def table(rows: list[Row], quality_cols: list[str]) -> str:
    head = ["step", "backend", "params", "size (KB)", "MACs", "median ms", *quality_cols, "note"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        q = [f"{r.quality.get(c, float('nan')):.4f}" for c in quality_cols]
        out.append("| " + " | ".join([r.step, r.backend, _fmt_int(r.params), f"{r.size_kb:.1f}",
                                      _fmt_int(r.macs), f"{r.latency_ms:.3f}", *q, r.note]) + " |")
    return "\n".join(out)


_MARKERS = "osD^v<>Xp*"


def pareto_plot(path: Path, series: dict[str, tuple[list[Row], str]]) -> Path | None:
    """One panel per model: latency against quality, every row a distinct marker named in the
    panel's legend (below the axes), so no two labels can overlap."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no Pareto plot (pip install fxpress[bench])")
        return None
    from ..utils import atomic_write
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 5.8), squeeze=False)
    for ax, (title, (rows, metric)) in zip(axes[0], series.items()):
        for i, r in enumerate(rows):
            ax.scatter(r.latency_ms, r.quality[metric], s=60, marker=_MARKERS[i % len(_MARKERS)],
                       label=f"{r.step} [{r.backend}]: {r.latency_ms:.1f} ms, {r.quality[metric]:.3f}")
        ax.set_xlabel("median latency (ms, lower is better)")
        ax.set_ylabel(f"{metric} (higher is better)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.margins(0.15)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    plt.close(fig)
    return path


def _speedups(rows: list[Row]) -> list[str]:
    """One line per compressed row: its speed against the fp32 row of the same backend."""
    lines = []
    for r in rows:
        base = next((b for b in rows if b.backend == r.backend and b.step == "fp32"), None)
        if base is None or r is base or not r.latency_ms == r.latency_ms:
            continue
        line = f"- {r.step} [{r.backend}]: {base.latency_ms / r.latency_ms:.2f}x its fp32 row"
        int8 = next((b for b in rows if b.backend == r.backend and b.step.startswith("fxpress int8")), None)
        if "pruned" in r.step and int8 is not None:  # what pruning adds on top of int8
            line += f", {int8.latency_ms / r.latency_ms:.2f}x the unpruned int8 row"
        lines.append(line)
    return lines
