"""Fast random reads of the token store's 1-D Zarr arrays, straight from the chunk files.

zarr-python 3 spends about 1-2 ms per ``array[a:b]`` call in its async machinery, which
caps random 1024-token windows at well under 1M tokens/s (bench/storage.py). The store
layout is ours and simple -- a local folder, a regular 1-D grid, ``bytes`` (little endian)
+ ``zstd``, optionally inside ``sharding_indexed`` with the index at the end -- so this
reader decodes exactly those chunk files with numcodecs' Zstd (the codec zarr itself
uses). Any other layout returns ``None`` from :func:`chunk_reader` and the caller keeps
using zarr. Tests check both paths agree; ``verify`` reads through both.

Every file of the written length must exist and decode: a missing or damaged one raises
:class:`IntegrityError` naming it (zarr would read a missing file as ``fill_value``).
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from pathlib import Path

import numpy as np

from cocomix.core.errors import IntegrityError

log = logging.getLogger(__name__)

CACHE_CHUNKS = 8
CACHE_INDEXES = 64
_EMPTY = np.uint64(2**64 - 1)
FIX = "re-run `cocomix tokenize` with the same flags into a new --out, or restore the file"


def missing_file(store: Path, file: Path) -> IntegrityError:
    return IntegrityError(f"the token store {store} is damaged: chunk file {file} is missing; {FIX}")


def damaged_file(store: Path, file: Path, why: str) -> IntegrityError:
    return IntegrityError(f"the token store {store} is damaged: chunk file {file} cannot be decoded ({why}); {FIX}")


def _plain_codecs(codecs: list) -> bool:
    names = [c.get("name") for c in codecs]
    little = (codecs[0].get("configuration") or {}).get("endian", "little") == "little" if codecs else False
    return names == ["bytes", "zstd"] and little


def _sharding(codecs: list) -> dict | None:
    """The sharding configuration if it is the layout this reader understands."""
    if len(codecs) != 1 or codecs[0].get("name") != "sharding_indexed":
        return None
    conf = codecs[0]["configuration"]
    index = [c.get("name") for c in conf.get("index_codecs", [])]
    ok = _plain_codecs(conf["codecs"]) and index in (["bytes", "crc32c"], ["bytes"]) and conf.get("index_location", "end") == "end"
    return conf if ok else None


def chunk_reader(array_dir: Path, store: Path | None = None) -> "ChunkReader | None":
    """A fast reader for the array in ``array_dir`` (of token store ``store``), or None when its layout is not the simple one."""
    meta = json.loads((Path(array_dir) / "zarr.json").read_text())
    grid = meta["chunk_grid"]
    key = meta["chunk_key_encoding"]
    if len(meta["shape"]) != 1 or grid.get("name") != "regular" or key.get("name") != "default":
        return None
    sharding = _sharding(meta["codecs"])
    if sharding is None and not _plain_codecs(meta["codecs"]):
        return None
    return ChunkReader(Path(array_dir), meta, sharding, store)


class ChunkReader:
    """Reads ``[start, stop)`` of one 1-D array; keeps the last few decoded chunks."""

    def __init__(self, folder: Path, meta: dict, sharding: dict | None, store: Path | None = None) -> None:
        from numcodecs import Zstd

        self.folder = folder
        self.store = store or folder
        self.length = int(meta["shape"][0])
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<")
        self.fill = meta.get("fill_value", 0)
        self.sep = (meta["chunk_key_encoding"].get("configuration") or {}).get("separator", "/")
        outer = int(meta["chunk_grid"]["configuration"]["chunk_shape"][0])
        self.chunk = int(sharding["chunk_shape"][0]) if sharding else outer
        self.per_shard = outer // self.chunk if sharding else 1
        self.index_crc = bool(sharding) and len(sharding.get("index_codecs", [])) == 2
        self.sharded = sharding is not None
        self.zstd = Zstd()
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self._indexes: OrderedDict[int, np.ndarray | None] = OrderedDict()

    def read(self, start: int, stop: int) -> np.ndarray:
        """A new, writable array (callers may modify it; the cached chunks stay intact)."""
        stop = min(stop, self.length)
        first, last = start // self.chunk, max(stop - 1, start) // self.chunk
        parts = [self._chunk(i) for i in range(first, last + 1)] if stop > start else []
        if not parts:
            return np.zeros(0, self.dtype)
        lo = start - first * self.chunk
        if len(parts) == 1:
            return parts[0][lo:lo + stop - start].copy()
        return np.concatenate(parts)[lo:lo + stop - start]

    def _chunk(self, i: int) -> np.ndarray:
        if i in self._chunks:
            self._chunks.move_to_end(i)
            return self._chunks[i]
        raw = self._raw_chunk(i)
        data = np.full(self.chunk, self.fill, self.dtype) if raw is None else self._decode(raw, i)
        self._chunks[i] = data
        if len(self._chunks) > CACHE_CHUNKS:
            self._chunks.popitem(last=False)
        return data

    def _decode(self, raw: bytes, i: int) -> np.ndarray:
        file = self._file(i // self.per_shard)
        try:
            data = self.zstd.decode(raw)
        except Exception as err:  # noqa: BLE001 - zstd reports a corrupt frame as RuntimeError or ValueError
            raise damaged_file(self.store, file, f"chunk {i}: {err}") from None
        if len(data) != self.chunk * self.dtype.itemsize:
            raise damaged_file(self.store, file, f"chunk {i} holds {len(data)} bytes, expected {self.chunk * self.dtype.itemsize}")
        return np.frombuffer(data, self.dtype)

    def _file(self, outer: int) -> Path:
        return self.folder / f"c{self.sep}{outer}"

    def _raw_chunk(self, i: int) -> bytes | None:
        """The encoded chunk; None for an inner chunk zarr left empty (all ``fill_value``)."""
        if not self.sharded:
            return self._read(self._file(i), 0, -1)
        shard, inner = divmod(i, self.per_shard)
        index = self._index(shard)
        if index[inner, 0] == _EMPTY:
            return None
        return self._read(self._file(shard), int(index[inner, 0]), int(index[inner, 1]))

    def _read(self, file: Path, offset: int, nbytes: int) -> bytes:
        try:
            with open(file, "rb") as f:
                f.seek(offset)
                return f.read(nbytes)
        except FileNotFoundError:
            raise missing_file(self.store, file) from None
        except OSError as err:
            raise damaged_file(self.store, file, str(err)) from None

    def _index(self, shard: int) -> np.ndarray:
        """[per_shard, 2] (offset, nbytes) of the inner chunks, checked against the file's size and crc32c."""
        if shard in self._indexes:
            self._indexes.move_to_end(shard)
            return self._indexes[shard]
        file = self._file(shard)
        size = self.per_shard * 16 + (4 if self.index_crc else 0)
        try:
            total = file.stat().st_size
        except FileNotFoundError:
            raise missing_file(self.store, file) from None
        if total < size:
            raise damaged_file(self.store, file, f"{total} bytes, too short for its {size}-byte index")
        data = self._read(file, total - size, size)
        index = np.frombuffer(data[: self.per_shard * 16], dtype="<u8").reshape(self.per_shard, 2)
        if self.index_crc and _crc32c(data[:-4]) != data[-4:]:
            raise damaged_file(self.store, file, "its index fails the crc32c check")
        used = index[:, 0] != _EMPTY
        if (index[used, 0] + index[used, 1] > total - size).any():
            raise damaged_file(self.store, file, "its index points past the end of the file")
        self._indexes[shard] = index
        if len(self._indexes) > CACHE_INDEXES:
            self._indexes.popitem(last=False)
        return index


def _crc32c(data: bytes) -> bytes:
    """The 4 little-endian checksum bytes zarr's sharding index carries (numcodecs' CRC32C codec)."""
    from numcodecs import CRC32C

    return bytes(CRC32C().encode(data))[-4:]
