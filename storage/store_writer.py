"""Write side of the token store: incremental, memory-bounded, resumable.

Crash safety, in order:

1. documents are appended to per-split buffers; only blocks aligned to whole files
   (shards, or chunks when unsharded) are written, so a file is written once -- except
   the partial last one at a commit (zarr's LocalStore writes every file to a temporary
   name and renames it, so a kill never leaves a torn file);
2. at a commit point every buffer is flushed (the partial last chunk too), the chunk
   files written since the last commit are fsynced, and only then ``progress.json``
   (documents consumed + per-split lengths) is replaced atomically;
3. a re-run truncates each array back to the committed lengths and continues from the
   committed document, so nothing is duplicated or dropped;
4. the group attribute ``complete`` is set last; readers refuse the store until then.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cocomix.core.errors import IntegrityError
from cocomix.storage.files import atomic_write_json, fsync_dir
from cocomix.storage.token_store import SPLITS

log = logging.getLogger(__name__)

PROGRESS = "progress.json"
OFFSET_CHUNK = 1 << 16


@dataclass
class _SplitBuffer:
    """Tokens and document lengths accepted but not yet written, plus what is on disk."""

    tokens: list[np.ndarray] = field(default_factory=list)
    doc_lens: list[int] = field(default_factory=list)
    n_buffered: int = 0
    n_tokens: int = 0          # written to the array
    n_docs: int = 0
    committed_tokens: int = 0  # covered by progress.json
    committed_docs: int = 0


def _compressors(level: int = 3) -> list:
    from zarr.codecs import ZstdCodec

    return [ZstdCodec(level=level, checksum=True)]  # checksum: verify detects flipped bits


def _create_arrays(group, dtype: np.dtype, chunk_tokens: int, shard_tokens: int) -> None:
    shards = {"shards": (shard_tokens,)} if shard_tokens else {}
    for name in SPLITS:
        sub = group.create_group(name)
        sub.create_array("tokens", shape=(0,), chunks=(chunk_tokens,), dtype=dtype, compressors=_compressors(), fill_value=0,
                         config={"write_empty_chunks": True}, **shards)
        offsets = sub.create_array("doc_offsets", shape=(1,), chunks=(OFFSET_CHUNK,), dtype=np.int64, compressors=_compressors(),
                                   fill_value=0, config={"write_empty_chunks": True})
        offsets[:] = np.zeros(1, dtype=np.int64)


class StoreWriter:
    """Appends documents to the splits of a store and commits resumable progress."""

    def __init__(self, path: Path, group, progress: dict) -> None:
        self.path = Path(path)
        self.group = group
        self.docs_done = int(progress.get("docs_done", 0))
        self.notes: dict = dict(progress.get("notes", {}))  # counters the caller wants to survive a resume
        self.buffers = {name: _SplitBuffer() for name in SPLITS}
        for name, counts in progress.get("splits", {}).items():
            buf = self.buffers[name]
            buf.n_tokens = buf.committed_tokens = int(counts["n_tokens"])
            buf.n_docs = buf.committed_docs = int(counts["n_docs"])

    @classmethod
    def create(cls, path: Path, attrs: dict, dtype: np.dtype, chunk_tokens: int, shard_tokens: int = 0) -> "StoreWriter":
        """A fresh store (the caller has cleared ``path``); progress starts at zero."""
        import zarr

        group = zarr.open_group(str(path), mode="w", attributes={**attrs, "complete": False})
        _create_arrays(group, dtype, chunk_tokens, shard_tokens)
        writer = cls(path, group, {"docs_done": 0})
        writer.commit()
        return writer

    @classmethod
    def resume(cls, path: Path) -> "StoreWriter":
        """Reopen an unfinished store and truncate every array to the last committed lengths."""
        import zarr

        progress = read_progress(path)
        _remove_partials(Path(path))
        writer = cls(path, zarr.open_group(str(path), mode="r+"), progress)
        for name, buf in writer.buffers.items():
            writer._array(name, "tokens").resize((buf.n_tokens,))
            writer._array(name, "doc_offsets").resize((buf.n_docs + 1,))
        log.info("resuming %s after %d documents", path, writer.docs_done)
        return writer

    def _array(self, split: str, name: str):
        # zarr skips chunks equal to the fill value (0, often EOS); every chunk gets its file, so a
        # missing one always means damage (readers refuse it)
        return self.group[split][name].with_config({"write_empty_chunks": True})

    def add(self, split: str, tokens: np.ndarray) -> None:
        """Accept one document (EOS already appended) for ``split``."""
        buf = self.buffers[split]
        buf.tokens.append(tokens)
        buf.doc_lens.append(len(tokens))
        buf.n_buffered += len(tokens)

    def documents_consumed(self, n: int) -> None:
        """``n`` more source documents are in the buffers (whatever their split)."""
        self.docs_done += n

    def flush(self, final: bool = False) -> None:
        """Write buffered tokens: chunk-aligned blocks only, unless ``final``."""
        for name, buf in self.buffers.items():
            self._flush_split(name, buf, final)

    def _flush_split(self, name: str, buf: _SplitBuffer, final: bool) -> None:
        arr = self._array(name, "tokens")
        chunk = _file_block(arr)
        end = buf.n_tokens + buf.n_buffered
        cut = end if final else (end // chunk) * chunk
        if cut <= buf.n_tokens and not (final and buf.doc_lens):
            return
        data = np.concatenate(buf.tokens) if buf.tokens else np.zeros(0, arr.dtype)
        base, take = buf.n_tokens, cut - buf.n_tokens
        self._write_tokens(arr, buf, data[:take])
        rest = data[take:]
        buf.tokens, buf.n_buffered = ([rest] if len(rest) else []), len(rest)
        self._write_offsets(name, buf, base, take)

    def _write_tokens(self, arr, buf: _SplitBuffer, block: np.ndarray) -> None:
        if not len(block):
            return
        start = buf.n_tokens
        arr.resize((start + len(block),))
        arr[start:start + len(block)] = block
        buf.n_tokens += len(block)

    def _write_offsets(self, name: str, buf: _SplitBuffer, base: int, n_written: int) -> None:
        """Record the documents whose last token is now on disk (``base``: split position of the buffer's start)."""
        lens = np.asarray(buf.doc_lens, dtype=np.int64)
        ends = np.cumsum(lens)
        full = int(np.searchsorted(ends, n_written, side="right"))
        if full:
            self._append_offsets(name, buf, base + ends[:full])
        leftover = lens[full:].copy()
        if len(leftover):
            leftover[0] -= n_written - (int(ends[full - 1]) if full else 0)
        buf.doc_lens = leftover.tolist()

    def _append_offsets(self, name: str, buf: _SplitBuffer, new_ends: np.ndarray) -> None:
        arr = self._array(name, "doc_offsets")
        start = buf.n_docs + 1
        arr.resize((start + len(new_ends),))
        arr[start:start + len(new_ends)] = new_ends
        buf.n_docs += len(new_ends)

    def commit(self) -> None:
        """Flush everything, make it durable, then atomically record the progress."""
        self.flush(final=True)
        for name, buf in self.buffers.items():
            assert not buf.doc_lens and not buf.n_buffered, "a document was left half-written at a commit"
            self._sync_array(name, "tokens", buf.committed_tokens, buf.n_tokens)
            self._sync_array(name, "doc_offsets", buf.committed_docs + 1, buf.n_docs + 1)
            buf.committed_tokens, buf.committed_docs = buf.n_tokens, buf.n_docs
        atomic_write_json(self.path / PROGRESS, self.progress())

    def progress(self) -> dict:
        counts = {name: {"n_tokens": b.committed_tokens, "n_docs": b.committed_docs} for name, b in self.buffers.items()}
        return {"docs_done": self.docs_done, "splits": counts, "notes": self.notes}

    def _sync_array(self, split: str, name: str, old_len: int, new_len: int) -> None:
        """fsync the chunk files covering ``[old_len, new_len)`` and the array metadata."""
        arr = self._array(split, name)
        folder = self.path / split / name
        chunk = _file_block(arr)
        first, last = max(old_len - 1, 0) // chunk, max(new_len - 1, 0) // chunk
        encode = arr.metadata.chunk_key_encoding.encode_chunk_key
        files = [folder / encode((index,)) for index in range(first, last + 1)] + [folder / "zarr.json"]
        for file in files:
            _fsync_file(file)
        for sub in {f.parent for f in files if f.parent.exists()}:
            fsync_dir(sub)

    def finish(self, final_attrs: dict) -> dict:
        """Commit, then mark the store complete (the last write of a tokenize run)."""
        self.commit()
        counts = {name: {"n_tokens": b.n_tokens, "n_docs": b.n_docs} for name, b in self.buffers.items()}
        self.group.attrs.update({**final_attrs, "counts": counts, "complete": True})
        _fsync_file(self.path / "zarr.json")
        fsync_dir(self.path)
        return counts


def _file_block(arr) -> int:
    """Elements per file of a 1-D array: the shard length when sharded, else the chunk length."""
    return int((arr.shards or arr.chunks)[0])


def read_progress(path: Path) -> dict:
    file = Path(path) / PROGRESS
    if not file.is_file():
        raise IntegrityError(f"{path} is an unfinished token store without {PROGRESS}; re-run with --overwrite to rebuild it")
    return json.loads(file.read_text())


def clear_folder(path: Path) -> None:
    """Remove an old store so a new one can be written in its place."""
    if path.exists():
        shutil.rmtree(path)


def _fsync_file(file: Path) -> None:
    if not file.exists():
        return
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_partials(path: Path) -> None:
    """Temporary chunk files left by a killed zarr write are never part of the data."""
    for tmp in path.rglob("*.partial"):
        tmp.unlink(missing_ok=True)
