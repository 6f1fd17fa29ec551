"""Target-shard reader: memory-mapped shards, zero-copy numpy views, windows across shards.

Shape legend: ``N`` rows (tokens) of a window, ``K`` = k_attr labels per token.
"""
from __future__ import annotations

import bisect
import json
import logging
import threading
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cocomix.core.errors import CocomixError, IntegrityError, MismatchError
from cocomix.storage import block_ahead, block_check
from cocomix.storage.files import sha256_file
from cocomix.storage.target_offsets import folder_offsets
from cocomix.storage.target_schema import (
    FORMAT,
    MANIFEST,
    SCHEMA_KEY,
    TARGETS_SCHEMA_VERSION,
    arrow_schema,
    extra_column_views,
    lock_path,
    safe_path,
    shard_column_views,
    stamp_vouches,
)

log = logging.getLogger(__name__)

OPEN_SHARDS = 64


class TargetWindow(NamedTuple):
    """Rows ``[start, stop)`` of a split: token [N], concept_ids [N, K], concept_scores [N, K],
    and the optional columns (``kd_ids`` [N, S], ``hidden`` [N, d]) by name; {} when the folder has none."""

    tokens: np.ndarray
    concept_ids: np.ndarray
    concept_scores: np.ndarray
    extra: dict = {}  # never mutated: the shared default is safe


class _Shard(NamedTuple):
    start: int
    end: int
    tokens: np.ndarray
    ids_NK: np.ndarray
    scores_NK: np.ndarray
    extra: dict  #: optional columns, name -> [n, width]
    blocks: block_check.BlockChecker  #: CRC32C (and label range) of each block, checked on first use


def load_manifest(path: Path) -> dict:
    """``manifest.json`` of a finished target folder, or an error saying how to finish it."""
    path = Path(path)
    if not path.exists():
        raise CocomixError(f"target folder {path} does not exist; run `cocomix extract` first or pass the right folder")
    file = path / MANIFEST
    if not file.is_file():
        raise IntegrityError(f"target folder {path} has no {MANIFEST}: it is incomplete; run the extract again to finish it")
    try:
        manifest = json.loads(file.read_text())
    except ValueError as err:
        raise IntegrityError(f"{file} is not valid JSON ({err}); run the extract again to rewrite it") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise IntegrityError(f"{file} is not a cocomix target manifest (format {found!r}); run the extract again to rewrite it")
    if manifest.get("schema_version") != TARGETS_SCHEMA_VERSION:
        raise IntegrityError(f"{file} has schema_version {manifest.get('schema_version')}, this cocomix reads {TARGETS_SCHEMA_VERSION}; re-run the extract")
    return manifest


def check_ranges(manifest: dict) -> None:
    """Per label set (offset r) and split, shard ranges are contiguous from r and end at the split's length."""
    offsets = folder_offsets(manifest.get("meta") or {})
    strays = [s["path"] for s in manifest["shards"] if s.get("offset", 0) not in offsets]
    if strays:
        raise IntegrityError(f"shard {strays[0]} belongs to no window offset the manifest lists ({offsets}); the manifest is corrupt")
    for r in offsets:
        for split, length in manifest["splits"].items():
            _check_set_ranges(manifest, split, length, r)


def _check_set_ranges(manifest: dict, split: str, length: int, r: int) -> None:
    shards = sorted((s for s in manifest["shards"] if s["split"] == split and s.get("offset", 0) == r), key=lambda s: s["start"])
    what = f"split {split!r}" + (f" (label set of offset {r})" if r else "")
    pos = min(r, length)
    for s in shards:
        if s["start"] != pos or s["end"] <= s["start"] or s["rows"] != s["end"] - s["start"]:
            raise IntegrityError(f"shard {s['path']} covers [{s['start']}, {s['end']}) but the next token of {what} is {pos}; ranges must be contiguous")
        pos = s["end"]
    if pos != length:
        raise IntegrityError(f"shards of {what} end at token {pos}, the split has {length}; some shard is missing")


class TargetReader:
    """A finished target folder (see :mod:`.target_schema`)."""

    def __init__(self, path: Path, manifest: dict) -> None:
        self.path = path
        self.manifest = manifest
        self.meta: dict = manifest["meta"]
        self.k_attr = int(manifest["k_attr"])
        self.n_latents = int(self.meta["sae"]["n_latents"]) if "sae" in self.meta else int(manifest.get("n_latents") or 0)
        self.ignore_id = int(manifest["ignore_id"])
        self.splits: list[str] = list(manifest["splits"])
        self.extra_columns: dict = manifest.get("extra_columns") or {}  #: optional columns (kd_ids, hidden): name -> record
        d = manifest["dtypes"]
        self.schema = arrow_schema(d["token"], d["id"], d["score"], self.k_attr, self.extra_columns)
        self.offsets: list[int] = folder_offsets(self.meta)  #: window offsets with a label set; [0] for one set
        self.window_length: int | None = self.meta.get("window")  #: the T of the labelled windows
        self._by_set = {(s, r): sorted((e for e in manifest["shards"] if e["split"] == s and e.get("offset", 0) == r),
                                       key=lambda e: e["start"]) for s in self.splits for r in self.offsets}
        self._starts = {key: [e["start"] for e in entries] for key, entries in self._by_set.items()}
        self._open: OrderedDict[str, _Shard] = OrderedDict()
        self._open_lock = threading.Lock()  # the prefetch thread and the main thread (validation) may map shards at once
        self._block_state: dict[str, dict] = {}  #: per shard, the blocks this process verified (kept when it is unmapped)
        self._checked: set[str] = set()
        self._ahead: dict[str, block_ahead.SplitFlags | None] = {}  #: per split: flags shared with the check-ahead helper

    @classmethod
    def open(cls, path, verify: bool = False) -> "TargetReader":
        path = Path(path)
        manifest = load_manifest(path)
        for entry in manifest["shards"]:
            safe_path(path, entry["path"])
        check_ranges(manifest)
        reader = cls(path, manifest)
        if verify:
            for entry in manifest["shards"]:
                reader.check_checksum(entry)
        return reader

    def split_length(self, split: str) -> int:
        if split not in self.manifest["splits"]:
            raise CocomixError(f"targets {self.path} have no split {split!r}; known splits: {', '.join(self.splits)}")
        return int(self.manifest["splits"][split])

    def check_checksum(self, entry: dict) -> None:
        file = safe_path(self.path, entry["path"])
        if not file.is_file():
            raise IntegrityError(f"shard {entry['path']} is missing from {self.path}; run the extract again")
        if sha256_file(file) != entry["sha256"]:
            raise IntegrityError(f"shard {entry['path']} fails its sha256 check (corrupt or modified); delete it and run the extract again")
        self._checked.add(entry["path"])

    def check_unchanged(self, entry: dict, file: Path) -> None:
        """Size against the manifest, then sha256 -- skipped when the writer's stamp shows the file unchanged since it was hashed."""
        if entry["path"] in self._checked:
            return
        st = file.stat()
        if "bytes" in entry and st.st_size != entry["bytes"]:
            raise IntegrityError(f"shard {entry['path']} has {st.st_size} bytes, its manifest says {entry['bytes']} (truncated or modified); delete it and run the extract again")
        stamp = lock_path(self.path, entry["split"], entry["index"], ".stamp", entry.get("offset", 0))
        if not stamp_vouches(stamp, file, entry["sha256"]):
            self.check_checksum(entry)
        self._checked.add(entry["path"])

    def shard_views(self, entry: dict) -> _Shard:
        """Memory-map one shard and return zero-copy views (cached, at most OPEN_SHARDS open)."""
        key = entry["path"]
        with self._open_lock:
            if key in self._open:
                self._open.move_to_end(key)
                return self._open[key]
            shard = self._map(entry)
            self._open[key] = shard
            if len(self._open) > OPEN_SHARDS:
                self._open.popitem(last=False)
            return shard

    def _map(self, entry: dict) -> _Shard:
        import pyarrow as pa

        file = safe_path(self.path, entry["path"])
        if not file.is_file():
            raise IntegrityError(f"shard {entry['path']} is missing from {self.path}; run the extract again")
        self.check_unchanged(entry, file)
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(file), "r"))
            batch = reader.get_batch(0) if reader.num_record_batches == 1 else None
        except (pa.ArrowInvalid, OSError) as err:
            raise IntegrityError(f"shard {entry['path']} is unreadable (truncated or corrupt: {err}); delete it and run the extract again") from None
        if batch is None or not reader.schema.equals(self.schema) or reader.schema.metadata.get(SCHEMA_KEY) != self.schema.metadata[SCHEMA_KEY]:
            raise IntegrityError(f"shard {entry['path']} does not have the schema of its manifest; delete it and run the extract again")
        if batch.num_rows != entry["rows"]:
            raise IntegrityError(f"shard {entry['path']} has {batch.num_rows} rows, its manifest says {entry['rows']}")
        where = f"shard {entry['path']} of {self.path}"
        if entry.get(block_check.KEY) is None:
            block_check.notice_missing(str(self.path))
        blocks = block_check.BlockChecker(where, block_check.column_rows(batch), entry.get(block_check.KEY),
                                          block_check.label_range_check(where, self.n_latents, self.ignore_id),
                                          self._block_state.setdefault(entry["path"], {}), self._shared_flags(entry, file))
        return _Shard(entry["start"], entry["end"], *shard_column_views(batch, self.k_attr),
                      extra_column_views(batch, self.extra_columns), blocks)

    def _shared_flags(self, entry: dict, file: Path):
        """(columns, flags) shared with the check-ahead helper for this shard, when it has them for this very file."""
        flags = self._ahead.get(entry["split"])
        if flags is None:
            return None
        view = flags.view(entry["path"], block_ahead.file_identity(file))
        return None if view is None else (flags.columns, view)

    def can_check_ahead(self, split: str, columns: tuple[str, ...]) -> bool:
        """Whether a check-ahead helper (:mod:`.block_ahead`) verifies the blocks of ``columns`` of
        ``split`` for this process (started on the first call). False when the split is too small,
        the helper is switched off or cannot run (one CPU, no shared memory), or the folder has no
        block checksums: the loader then checks every block itself."""
        if split not in self._ahead:
            self._ahead[split] = self._start_ahead(split, tuple(columns))
        flags = self._ahead[split]
        return flags is not None and flags.columns == tuple(columns)

    def check_ahead(self, split: str, columns: tuple[str, ...], starts: np.ndarray, context: int, offset: int = 0) -> bool:
        """Hand windows ``[s, s + context)`` that the loader will read next (of the label set of
        ``offset``) to the check-ahead helper, which verifies their blocks of ``columns`` on another
        core before the loader gets there. False when there is none (see :meth:`can_check_ahead`)."""
        if not self.can_check_ahead(split, columns):
            return False
        flags = self._ahead[split]
        if offset in flags.sets and len(starts):
            helper = block_ahead.helper()
            if helper is None:
                return False
            helper.send(("check", flags.memory.name, offset, np.asarray(starts, np.int64), int(context)))
        return True

    def ahead_verified(self, split: str, offset: int) -> bool:
        """Whether the check-ahead helper has verified every block of the label set of ``offset``."""
        flags = self._ahead.get(split)
        return flags is not None and flags.set_verified(offset)

    def _start_ahead(self, split: str, columns: tuple[str, ...]) -> block_ahead.SplitFlags | None:
        sets = {r: self._by_set[(split, r)] for r in self.offsets}
        if not block_ahead.enabled() or block_ahead.total_blocks(sets) < max(block_ahead.MIN_BLOCKS, 1):
            return None
        helper = block_ahead.helper()
        if helper is None:
            return None
        try:
            flags = block_ahead.SplitFlags(self, split, columns)
        except OSError as err:  # no shared memory here (e.g. no /dev/shm): the loader checks alone
            log.debug("no check-ahead for %s (%s)", self.path, err)
            return None
        helper.send(flags.message)
        weakref.finalize(self, _release_ahead, helper, flags)
        with self._open_lock:  # shards mapped before now get their shared flags when mapped again
            for path in flags.shards:
                self._open.pop(path, None)
        return flags

    def window(self, split: str, start: int, stop: int, offset: int = 0, check: tuple[str, ...] | None = None) -> TargetWindow:
        """Rows ``[start, stop)`` (stop clipped to the split) of the label set of window ``offset``;
        zero-copy when inside one shard. Set ``r`` has rows from token ``r`` on. The blocks they touch
        of the columns in ``check`` (default: all; a caller passes the columns it uses) are
        CRC32C-checked first, once per process."""
        length = self.split_length(split)
        stop = min(stop, length)
        if offset not in self.offsets:
            raise CocomixError(f"targets {self.path} hold no labels for window offset {offset} (offsets: {self.offsets})")
        if not offset <= start <= stop or (start == stop and not self._by_set[(split, offset)]):
            raise IndexError(f"bad window [{start}, {stop}) of split {split!r} with {length} tokens (label set of offset {offset})")
        entries, starts = self._by_set[(split, offset)], self._starts[(split, offset)]
        i = max(bisect.bisect_right(starts, start) - 1, 0)
        pieces = []
        while start < stop or not pieces:
            shard = self.shard_views(entries[i])
            lo, hi = start - shard.start, min(stop, shard.end) - shard.start
            shard.blocks.check(lo, hi, check)
            extra = {name: view[lo:hi] for name, view in shard.extra.items()}
            pieces.append(TargetWindow(shard.tokens[lo:hi], shard.ids_NK[lo:hi], shard.scores_NK[lo:hi], extra))
            start, i = shard.start + hi, i + 1
            if start >= stop:
                break
        if len(pieces) == 1:
            return pieces[0]
        extra = {name: np.concatenate([p.extra[name] for p in pieces]) for name in pieces[0].extra}
        return TargetWindow(*(np.concatenate(cols) for cols in zip(*(p[:3] for p in pieces))), extra)

    def check_tokens(self, store_provenance: dict) -> None:
        """MismatchError when these targets were made from another tokenizer, vocabulary or corpus."""
        ours = self.meta.get("tokens") or {}
        pairs = [
            ("tokenizer sha256", self.meta.get("tokenizer_sha256", ours.get("tokenizer_sha256")), store_provenance.get("tokenizer_sha256")),
            ("vocab_size", self.meta.get("vocab_size", ours.get("vocab_size")), store_provenance.get("vocab_size")),
            ("corpus fingerprint", (ours.get("corpus") or {}).get("fingerprint"), (store_provenance.get("corpus") or {}).get("fingerprint")),
        ]
        counts = store_provenance.get("counts") or {}
        pairs += [(f"{s} tokens", self.split_length(s), (counts.get(s) or {}).get("n_tokens")) for s in self.splits]
        for what, mine, theirs in pairs:
            if mine is not None and theirs is not None and mine != theirs:
                raise MismatchError(f"targets {self.path} were made with {what} {mine}, the token store has {theirs}; pass the token store the targets were extracted from")


def _release_ahead(helper, flags) -> None:
    """A reader is gone: the helper drops its view of the flags, and the shared memory is unlinked."""
    helper.send(("release", flags.memory.name))
    flags.release()
