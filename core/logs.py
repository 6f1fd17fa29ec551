"""Logging set-up: one rich handler for the whole process, installed by the CLI.

Modules only do ``log = logging.getLogger(__name__)``. Ranks other than 0 log
warnings and errors only, so a multi-process run prints each line once.
"""
from __future__ import annotations

import logging
import os

from rich.console import Console
from rich.logging import RichHandler

console = Console(stderr=True)
if not console.is_terminal and "COLUMNS" not in os.environ:
    console.width = 160  # a log file (batch job): long lines rather than rich's 80-column wrapping


def process_rank() -> int:
    """Global rank from the launcher's environment (accelerate/torchrun set RANK)."""
    return int(os.environ.get("RANK", "0"))


def setup_logging(verbose: bool = False) -> None:
    """Install a single rich handler on the ``cocomix`` logger (idempotent)."""
    root = logging.getLogger("cocomix")
    level = logging.DEBUG if verbose else logging.INFO
    if process_rank() != 0:
        level = logging.WARNING
    root.setLevel(level)
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        handler = RichHandler(console=console, show_path=False, rich_tracebacks=True, markup=False)
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
    root.propagate = False
