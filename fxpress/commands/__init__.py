"""CLI commands: each module defines main(argv) -> int (see fxpress/cli.py)."""
