"""Workspace layout: where commands put their outputs when no explicit path is given.

::

    <workspace>/                      --workspace, env COCOMIX_WORKSPACE, default ./cocomix-workspace
      tokens/<corpus>/                token stores (Zarr)            cocomix tokenize / extract --corpus
      targets/<corpus>/               target shards (Arrow)          cocomix extract
      runs/<method>-<size>/           checkpoints, metrics.jsonl     cocomix pretrain
      cache/                          downloaded SAE files

``cocomix extract --corpus openwebtext`` followed by ``cocomix pretrain --size 69m``
works because pretrain looks up the single target folder in the workspace.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

from cocomix.core.errors import CocomixError

ENV = "COCOMIX_WORKSPACE"
DEFAULT = "cocomix-workspace"


def workspace_root(explicit: str | os.PathLike | None = None) -> Path:
    """The workspace folder: the flag if given, else ``$COCOMIX_WORKSPACE``, else ./cocomix-workspace."""
    return Path(explicit or os.environ.get(ENV) or DEFAULT)


def slug(name: str) -> str:
    """A folder-safe name for a corpus or model id (``Skylion007/openwebtext`` -> ``Skylion007--openwebtext``)."""
    name = str(name).rstrip("/\\")
    if os.sep in name and Path(name).exists():
        name = Path(name).name
    return re.sub(r"[^A-Za-z0-9._-]+", "--", name).strip("-") or "corpus"


def tokens_dir(workspace: Path, corpus: str) -> Path:
    return workspace / "tokens" / slug(corpus)


def targets_dir(workspace: Path, corpus: str) -> Path:
    return workspace / "targets" / slug(corpus)


def run_dir(workspace: Path, method: str, size: str) -> Path:
    return workspace / "runs" / f"{method}-{size}"


def cache_dir(workspace: Path) -> Path:
    return workspace / "cache"


def _finished(folder: Path, kind: str) -> bool:
    if kind == "targets":
        return (folder / "manifest.json").exists()
    try:
        return bool(json.loads((folder / "zarr.json").read_text()).get("attributes", {}).get("complete"))
    except (OSError, ValueError):
        return False


def find_single(workspace: Path, kind: str, flag: str) -> Path:
    """The only finished folder under ``<workspace>/<kind>/``; otherwise a clear error naming ``flag``.

    A folder counts when it is finished: it holds ``manifest.json`` (targets, written last) or a
    ``zarr.json`` whose attributes say ``complete`` (tokens); half-written folders are skipped.
    """
    base = workspace / kind
    found = sorted(p for p in base.glob("*") if _finished(p, kind)) if base.exists() else []
    if len(found) == 1:
        return found[0]
    if not found:
        raise CocomixError(
            f"no finished {kind} folder in workspace {workspace} ({base} holds none); "
            f"run `cocomix extract --corpus ...` first or pass {flag} DIR"
        )
    names = ", ".join(str(p) for p in found)
    raise CocomixError(f"several {kind} folders in workspace {workspace} ({names}); pass {flag} DIR to choose one")
