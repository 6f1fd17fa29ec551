"""Per-block CRC32C of target shards: bit rot is caught where the bytes are read.

A shard's sha256 proves the whole file, but hashing every shard before training costs
minutes, and a restart only re-hashes files whose size or mtime changed (a flipped bit
changes neither). So the writer also records, in each shard's sidecar (and so in the
manifest entry), a CRC32C per block of :data:`BLOCK_ROWS` rows of every column::

    "block_crc32c": {"rows_per_block": 16384, "columns": {"token": [crc, ...], "concept_ids": [...], ...}}

and the reader checks a block the first time this process hands any of its rows out
(:class:`BlockChecker`), at several GB/s (google-crc32c). The checksums run over each
column's value buffer, rows first, so they work for any fixed-width column (scalars or
fixed-size lists) and any set of columns; a folder written before block checksums is
read with a one-line notice naming the upgrade command (``cocomix verify DIR --upgrade``).

The same pass refuses label ids at or above the SAE's latents (a tampered shard must
never reach an embedding lookup).
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from cocomix.core.errors import IntegrityError

log = logging.getLogger(__name__)

KEY = "block_crc32c"
BLOCK_ROWS = 16384  #: rows per checksummed block (about 0.4 MB of a k_attr=4 shard)


def crc32c(data: np.ndarray) -> int:
    """CRC32C of an array's bytes in C order: the ``crc32c`` package (hardware instructions, reads the
    buffer in place), else google-crc32c (whose C entry point takes ``bytes``: one copy)."""
    return _crc(np.ascontiguousarray(data))


def _google_crc(data: np.ndarray) -> int:
    import google_crc32c

    return int(google_crc32c.value(data.tobytes()))


try:
    import crc32c as _crc32c_pkg
except ImportError:  # pragma: no cover - a declared dependency; google-crc32c (zarr's) is the fallback
    _crc32c_pkg = None
#: CRC32C of a C-contiguous array (a block of a mapped column: rows first, so always contiguous)
_crc: Callable[[np.ndarray], int] = _crc32c_pkg.crc32c if _crc32c_pkg is not None else _google_crc


def column_rows(batch) -> dict[str, np.ndarray]:
    """Every column of an Arrow record batch as a zero-copy numpy array with rows first
    (fixed-width scalars -> [n], fixed-size lists of them -> [n, width])."""
    import pyarrow as pa

    out = {}
    n = batch.num_rows
    for name, column in zip(batch.schema.names, batch.columns):
        if pa.types.is_fixed_size_list(column.type):
            out[name] = column.flatten().to_numpy(zero_copy_only=True).reshape(n, column.type.list_size)
        else:
            out[name] = column.to_numpy(zero_copy_only=True)
    return out


def block_crcs(columns: dict[str, np.ndarray], block_rows: int | None = None) -> dict:
    """The sidecar record: CRC32C per block of ``block_rows`` (default :data:`BLOCK_ROWS`) rows of every column."""
    block_rows = block_rows or BLOCK_ROWS
    n = len(next(iter(columns.values()))) if columns else 0
    return {"rows_per_block": block_rows,
            "columns": {name: [crc32c(arr[a:a + block_rows]) for a in range(0, n, block_rows)] for name, arr in columns.items()}}


class BlockChecker:
    """Checks the blocks of one mapped shard on first use, once per process.

    ``expected`` is the shard's ``block_crc32c`` record (None for folders written before block
    checksums: only ``validate`` runs then); ``validate(name, rows)`` may refuse a block's
    content (e.g. label ids out of range) with an :class:`IntegrityError`.
    """

    def __init__(self, where: str, columns: dict[str, np.ndarray], expected: dict | None,
                 validate: Callable[[str, np.ndarray], None] | None = None, state: dict | None = None,
                 shared: tuple[tuple[str, ...], memoryview] | None = None) -> None:
        columns = {name: np.ascontiguousarray(arr) for name, arr in columns.items()}  # mapped columns already are: no copy
        self.where, self.columns, self.expected, self.validate = where, columns, expected, validate
        self.block_rows = int(expected["rows_per_block"]) if expected else BLOCK_ROWS
        n = len(next(iter(columns.values()))) if columns else 0
        self.n_blocks = max(1, -(-n // self.block_rows))
        # ``state``: the flags of a reader's earlier mapping of the same file (they outlive an unmapped shard)
        state = {} if state is None else state
        #: per column, blocks checked by this process
        self.verified: dict[str, bytearray] = state.setdefault("verified", {name: bytearray(self.n_blocks) for name in columns})
        self._done_for: dict[tuple[str, ...] | None, bytearray | memoryview] = state.setdefault("done_for", {})
        self._share(shared)
        if expected is not None:
            self._check_record(n)

    def _share(self, shared: tuple[tuple[str, ...], memoryview] | None) -> None:
        """``shared``: (a column selection, its per-block flags shared with a check-ahead helper, see
        :mod:`.block_ahead`), which then stand for that selection (flags this process set before are
        copied in). Without it, flags an earlier mapping shared are dropped: they described that file."""
        for cols, done in list(self._done_for.items()):
            if isinstance(done, memoryview) and (shared is None or cols != shared[0]):
                del self._done_for[cols]
        if shared is None:
            return
        cols, flags = shared
        prior = self._done_for.get(cols)
        if prior is not None and not isinstance(prior, memoryview):
            for b, done in enumerate(prior):
                if done:
                    flags[b] = 1
        self._done_for[cols] = flags

    def _check_record(self, n: int) -> None:
        blocks = -(-n // self.block_rows)
        recorded = self.expected.get("columns") or {}
        if set(recorded) != set(self.columns) or any(len(v) != blocks for v in recorded.values()):
            raise IntegrityError(f"{self.where}: its block checksums do not describe its columns or rows "
                                 "(tampered sidecar or manifest); delete the shard and run the extract again")

    def check(self, lo: int, hi: int, columns: tuple[str, ...] | None = None) -> None:
        """Verify the not-yet-verified blocks that rows ``[lo, hi)`` touch, of ``columns`` (default: all)."""
        if hi <= lo:
            return
        done = self._done_for.get(columns)  # per column selection: the hot path is one lookup and two indexes
        if done is None:
            done = self._done_for.setdefault(columns, bytearray(self.n_blocks))
        first, last = lo // self.block_rows, (hi - 1) // self.block_rows
        if done[first] and done[last] and (last - first < 2 or all(done[first:last + 1])):
            return
        names = self.columns if columns is None else columns
        for b in range(first, last + 1):
            if not done[b]:
                self._check_block(b, names)
                done[b] = 1

    def check_all(self) -> None:
        n = len(next(iter(self.columns.values()))) if self.columns else 0
        self.check(0, n)

    def _check_block(self, b: int, names) -> None:
        """Block ``b`` of each column in ``names`` not yet verified by this process: CRC32C, then ``validate``
        on the same rows while they are still in the CPU cache."""
        a = b * self.block_rows
        for name in names:
            verified = self.verified[name]
            if verified[b]:
                continue
            rows = self.columns[name][a:a + self.block_rows]
            if self.expected is not None and _crc(rows) != self.expected["columns"][name][b]:
                raise IntegrityError(f"{self.where}: rows [{a}, {a + len(rows)}) of column {name!r} fail their CRC32C "
                                     "(bit rot or tampering); delete the shard and run the extract again")
            if self.validate is not None:
                self.validate(name, rows)
            verified[b] = 1


def label_range_check(where: str, n_latents: int, ignore: int, column: str = "concept_ids") -> Callable[[str, np.ndarray], None]:
    """A ``validate`` for :class:`BlockChecker`: every label id of ``column`` is a latent or ``ignore``.

    For unsigned ids whose ignore id is the dtype's all-ones value (how the writer stores them), the
    ids are read as signed in place: ignore reads -1 and an id past the signed range reads below -1,
    so two vectorised reductions (min >= -1, max < n_latents) decide, with no temporary; what that
    takes per dtype is worked out once, not per block."""
    fast: dict[np.dtype, np.dtype | None] = {}  # ids dtype -> its signed view (None: the plain path)

    def signed_view(dtype: np.dtype) -> np.dtype | None:
        if dtype not in fast:
            signed = np.dtype(f"i{dtype.itemsize}") if dtype.kind == "u" else None
            ok = signed is not None and ignore == np.iinfo(dtype).max and n_latents <= np.iinfo(signed).max + 1
            fast[dtype] = signed if ok else None
        return fast[dtype]

    def validate(name: str, rows: np.ndarray) -> None:
        if name != column or not n_latents or not rows.size:
            return
        signed = signed_view(rows.dtype)
        if signed is not None:
            as_signed = rows.view(signed)
            if as_signed.min() >= -1 and as_signed.max() < n_latents:
                return
        bad = (rows >= n_latents) & (rows != ignore)
        if bad.any():
            raise IntegrityError(f"{where} holds label id {int(rows[bad][0])}, but the SAE has {n_latents} latents "
                                 "(tampered or corrupt); delete the shard and run the extract again")
    return validate


_noticed: set[str] = set()


def notice_missing(folder: str) -> None:
    """Once per folder and process: an older folder without block checksums."""
    if folder in _noticed:
        return
    _noticed.add(folder)
    log.warning("targets %s have no block checksums (written by an older cocomix): bit rot in an unchanged file goes "
                "unnoticed; run `cocomix verify %s --upgrade` once to add them", folder, folder)
