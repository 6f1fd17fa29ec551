"""Crash-safe file primitives shared by every writer: write to a temporary name,
fsync, rename, fsync the folder. A reader therefore sees either the old file or the
complete new one, never a half-written file under the final name."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_replace(tmp: Path, final: Path) -> None:
    """fsync ``tmp``, rename it to ``final`` and fsync the folder."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(final.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{TMP_SUFFIX}")  # unique per writer thread
    with open(tmp, "wb") as f:
        f.write(data)
    atomic_replace(tmp, path)


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(Path(path), (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ---- step folders (training checkpoints, resume states) ------------------------------------
#   <base>/step-NNNNNNN/   filled as .step-NNNNNNN.tmp, marker written last, then renamed

MARKER = "complete"
_STEP_DIR = re.compile(r"^step-(\d{7,})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:07d}"


def complete_step_dirs(base: Path) -> list[Path]:
    """The complete ``step-NNNNNNN`` folders of ``base``, oldest first (temp and unmarked ones skipped)."""
    base = Path(base)
    if not base.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in base.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / MARKER).exists()]
    return [p for _, p in sorted(found)]


def publish_step_dir(tmp: Path, final: Path) -> None:
    """Marker last, then rename: readers only ever see complete folders under ``step-*``."""
    atomic_write_bytes(tmp / MARKER, b"")
    shutil.rmtree(final, ignore_errors=True)  # an incomplete leftover of the same step
    tmp.rename(final)
    fsync_dir(final.parent)
