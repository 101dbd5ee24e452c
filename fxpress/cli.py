"""The `fxpress` command: a dispatcher to fxpress/commands/<name>.py.

    fxpress inspect tests.models:resnet18 --input-shape 1,3,224,224
    fxpress compress ... | fxpress demo | fxpress bench

Each command module defines ``main(argv: list[str]) -> int`` with its own argparse, so
``fxpress <command> --help`` is that command's help.
"""
from __future__ import annotations

import argparse
import importlib
import sys

__all__ = ["main", "COMMANDS"]

COMMANDS = {
    "inspect": "print the IR summary of a model: ops, MACs and params per module "
               "(with --recipe / --backend: the compressed IR and what lowers to int8)",
    "compress": "compress a model with a recipe and write the result",
    "demo": "compress real models with every technique, lower them, tabulate size/speed/accuracy",
    "bench": "benchmark fxpress against peer tools on this machine",
    "generate": "stream text from a saved causal-LM folder (lm.save(dir, tokenizer=tok))",
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fxpress",
        description="A compression compiler for PyTorch: capture to an ATen fx IR, compress with "
                    "rewrite passes, lower to Inductor / ONNX Runtime / TVM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {k:<10}{v}" for k, v in COMMANDS.items())
               + "\n\n'fxpress <command> --help' describes a command's options.")
    p.add_argument("--version", action="version", version=_version())
    p.add_argument("command", choices=sorted(COMMANDS), metavar="command",
                   help="one of: " + ", ".join(COMMANDS))
    p.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments")
    return p


def _version() -> str:
    from . import __version__
    return f"fxpress {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ns = _parser().parse_args(argv)
    modname = f"fxpress.commands.{ns.command}"
    try:
        mod = importlib.import_module(modname)
    except ModuleNotFoundError as e:
        if e.name not in (modname, "fxpress.commands"):
            raise  # the command exists but one of its own imports is missing: show that
        print(f"fxpress: the '{ns.command}' command is not available in this build "
              f"({modname.replace('.', '/')}.py is missing)", file=sys.stderr)
        return 2
    run = getattr(mod, "main", None)
    if run is None:
        print(f"fxpress: {modname} defines no main(argv)", file=sys.stderr)
        return 2
    from .errors import FxpressError
    try:
        rc = run(ns.args)
    except FxpressError as e:  # typed errors carry their own explanation: no traceback needed
        print(f"fxpress {ns.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    return int(rc or 0)


if __name__ == "__main__":
    sys.exit(main())
