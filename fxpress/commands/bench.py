"""`fxpress bench`: run the side-by-side bench harness (bench/run.py) of a source checkout.

The harness compares fxpress with the peer tools (ONNX Runtime, Inductor, torchao PT2E) and
lives beside the package, not in it, since it imports the peers and the test models.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    script = Path(__file__).resolve().parents[2] / "bench" / "run.py"
    if not script.is_file():
        print("fxpress bench runs bench/run.py from a source checkout of fxpress; "
              f"none found at {script}", file=sys.stderr)
        return 2
    saved = sys.argv
    sys.argv = [str(script), *(argv if argv is not None else [])]
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:  # the harness exits with its own status
        return int(e.code or 0)
    finally:
        sys.argv = saved
    return 0
