"""``openai:<version>/<location>/<layer>``: OpenAI's GPT-2-small SAEs, downloaded once into a cache.

Plain HTTPS with urllib (``blobfile`` fails on anonymous access: openai/sparse_autoencoder#16).
The file is streamed to a temporary name while hashing, its sha256 is written beside it
(``<layer>.pt.sha256``), then it is renamed into place; later loads re-hash the cached file
and refuse one that no longer matches.
"""
from __future__ import annotations

import hashlib
import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from cocomix.core.errors import CocomixError, IntegrityError
from cocomix.core.logs import console
from cocomix.core.progress import BYTES, progress_display
from cocomix.core.workspace import cache_dir as workspace_cache
from cocomix.core.workspace import workspace_root
from cocomix.storage.files import atomic_replace, atomic_write_bytes, sha256_file

log = logging.getLogger(__name__)

PREFIX = "openai:"
OPENAI_URL = "https://openaipublic.blob.core.windows.net/sparse-autoencoder/gpt2-small/{location}_{version}/autoencoders/{layer}.pt"
VERSIONS = ("v5_32k", "v5_128k")
LOCATIONS = ("resid_delta_attn", "resid_delta_mlp", "resid_post_attn", "resid_post_mlp")
N_LAYERS = 12  # GPT-2 small
CHUNK = 1 << 20
TIMEOUT_S = 60


def is_openai_spec(spec: str) -> bool:
    return str(spec).startswith(PREFIX)


def parse_openai_spec(spec: str) -> tuple[str, str, int]:
    """``openai:v5_32k/resid_post_mlp/5`` -> (``v5_32k``, ``resid_post_mlp``, 5); a clear error otherwise."""
    found = re.fullmatch(r"openai:([^/]+)/([^/]+)/(\d+)", spec)
    example = "e.g. openai:v5_32k/resid_post_mlp/5"
    if not found:
        raise CocomixError(f"--sae {spec!r} is not `openai:<version>/<location>/<layer>` ({example})")
    version, location, layer = found.group(1), found.group(2), int(found.group(3))
    if version not in VERSIONS:
        raise CocomixError(f"--sae {spec!r}: unknown version {version!r}; known: {', '.join(VERSIONS)}")
    if location not in LOCATIONS:
        raise CocomixError(f"--sae {spec!r}: unknown location {location!r}; known: {', '.join(LOCATIONS)}")
    if layer >= N_LAYERS:
        raise CocomixError(f"--sae {spec!r}: layer {layer} out of range 0..{N_LAYERS - 1} (GPT-2 small)")
    return version, location, layer


def openai_url(spec: str) -> str:
    version, location, layer = parse_openai_spec(spec)
    return OPENAI_URL.format(version=version, location=location, layer=layer)


def cached_path(spec: str, cache_dir: Path | None = None) -> Path:
    """``<cache>/sae/openai/<location>_<version>/<layer>.pt``; default cache ``<workspace>/cache``."""
    version, location, layer = parse_openai_spec(spec)
    root = Path(cache_dir) if cache_dir is not None else workspace_cache(workspace_root())
    return root / "sae" / "openai" / f"{location}_{version}" / f"{layer}.pt"


def fetch_openai(spec: str, cache_dir: Path | None = None) -> Path:
    """The cached file for ``spec``, downloaded first if absent; a cached file must match its sha256."""
    dest = cached_path(spec, cache_dir)
    sidecar = dest.with_name(dest.name + ".sha256")
    if dest.exists() and sidecar.exists():
        expected = sidecar.read_text().strip()
        if sha256_file(dest) != expected:
            raise IntegrityError(f"cached SAE {dest} does not match its recorded sha256; delete it to download again")
        return dest
    url = openai_url(spec)
    log.info("downloading SAE %s from %s", spec, url)
    digest = download(url, dest, sidecar)
    log.info("saved %s (sha256 %s)", dest, digest)
    return dest


def download(url: str, dest: Path, sidecar: Path) -> str:
    """Stream ``url`` into ``dest`` (tmp file + rename), writing ``sidecar`` before the rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    try:
        digest = _stream(url, tmp)
        atomic_write_bytes(sidecar, (digest + "\n").encode())
        atomic_replace(tmp, dest)
        return digest
    finally:
        tmp.unlink(missing_ok=True)


def _stream(url: str, tmp: Path) -> str:
    hasher, done = hashlib.sha256(), 0
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(tmp, "wb") as out, _progress() as bar:
            total = int(response.headers.get("Content-Length") or 0) or None
            task = bar.add_task(tmp.name, total=total)
            while block := response.read(CHUNK):
                out.write(block)
                hasher.update(block)
                done += len(block)
                bar.update(task, advance=len(block))
    except (urllib.error.URLError, OSError) as err:
        raise CocomixError(
            f"cannot download the SAE from {url} ({getattr(err, 'reason', err)}); if this machine is offline, "
            "pass a local path with --sae (an OpenAI .pt file, a SAELens folder or a cocomix SAE folder)"
        ) from None
    if total is not None and done != total:
        raise IntegrityError(f"download of {url} is truncated: {done} of {total} bytes")
    return hasher.hexdigest()


def _progress() -> Progress:
    return progress_display(
        TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
        unit=BYTES, console=console, transient=True,
    )
