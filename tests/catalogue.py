"""Helpers of the bad-input catalogues (``tests/*/test_*_bad_inputs_catalogue.py``).

Each catalogue runs one bad input through the real CLI and asserts what the user sees: exit
status 2, exactly one ``error:`` line naming the culprit, no traceback, and nothing written
(or the partial output removed). :class:`Payload` is a pickle that would create a marker file
if any loader ever unpickled it with code execution.
"""
from __future__ import annotations

import os
from pathlib import Path

from typer.testing import CliRunner


class Payload:
    """Unpickling this opens (creates) ``marker``: proof that a loader ran code from a file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant_pickle(path: Path, marker: Path, around: dict | None = None) -> Path:
    """Write a torch file at ``path`` holding ``around`` plus the payload (replaces what was there)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**(around or {}), "payload": Payload(marker)}, path)
    return path


def run_cli(*args: str, input: str | None = None):
    from cocomix.pipeline.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input, terminal_width=400, env={"COLUMNS": "400"})


def assert_one_line_error(result, *needles: str) -> str:
    """Exit 2, one ``error:`` line that holds every needle, no traceback; returns the line."""
    out = result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), f"bug, not a user error: {result.exception!r}\n{out}"
    assert result.exit_code == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``folder`` with its size and mtime (empty when the folder does not exist)."""
    folder = Path(folder)
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*") if p.is_file()) if Path(folder).exists() else []


def corrupt(path: Path, *, truncate_to: int | None = None, flip_at: int | None = None) -> None:
    """Truncate ``path`` or flip one byte keeping its size and mtime (bit rot)."""
    path = Path(path)
    st = path.stat()
    data = bytearray(path.read_bytes())
    if truncate_to is not None:
        data = data[:truncate_to]
    if flip_at is not None:
        data[flip_at] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
