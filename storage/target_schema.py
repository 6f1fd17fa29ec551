"""Target-shard format (docs/ARCHITECTURE.md, formats): schema, dtypes, shard plan, safe paths.

::

    <targets>/plan.json                  written first: meta + shard plan + dtypes (lets a re-run resume)
    <targets>/<split>/shard-NNNNN.arrow  Arrow IPC file, one row per token of [start, end)
    <targets>/<split>/shard-NNNNN.json   sidecar: range, rows, sha256 (written after the shard)
    <targets>/offset-<r>/<split>/...     the label set of window offset r > 0 (``extract --offsets N``)
    <targets>/manifest.json              written last: everything a reader needs

Columns: ``token`` (uint16|uint32), ``concept_ids`` (fixed_size_list<uint16|uint32>[k]),
``concept_scores`` (fixed_size_list<float32|float16>[k]). A slot without a label holds
``ignore_id`` = the id dtype's maximum. Shards are uncompressed so they memory-map.

Optional columns follow, in this order, when ``extract`` was asked for them (plan and
manifest list them under ``extra_columns`` with their dtype, width and how they were made;
a folder without that key has none, as every folder written before they existed):
``kd_ids`` (fixed_size_list<token dtype>[N]: N token ids sampled from the teacher's
next-token distribution) and ``hidden`` (fixed_size_list<float16>[d]: the teacher's hidden
state at the SAE's layer).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from cocomix.core.errors import CocomixError, IntegrityError
from cocomix.storage.target_offsets import shard_relpath

TARGETS_SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
PLAN = "plan.json"
FORMAT = "cocomix-targets"
SCHEMA_KEY = b"cocomix.targets.schema_version"
COLUMNS = ("token", "concept_ids", "concept_scores")
EXTRA_COLUMNS = ("kd_ids", "hidden")  #: optional columns, in schema order
SCORE_DTYPES = ("float32", "float16")


def id_dtype(n_latents: int) -> np.dtype:
    """uint16 if every latent id and the reserved ignore id fit (n_latents < 65535), else uint32."""
    if n_latents <= 0:
        raise CocomixError(f"n_latents must be positive, got {n_latents}")
    if n_latents < np.iinfo(np.uint16).max:
        return np.dtype(np.uint16)
    if n_latents < np.iinfo(np.uint32).max:
        return np.dtype(np.uint32)
    raise CocomixError(f"{n_latents} latents do not fit uint32 concept ids")


def ignore_id(dtype) -> int:
    """The id of a label slot that holds no label: the dtype's maximum."""
    return int(np.iinfo(np.dtype(dtype)).max)


@dataclass(frozen=True)
class ShardSpec:
    """Tokens ``[start, end)`` of ``split``, stored as shard number ``index`` of that split in
    the label set whose windows start at ``offset`` (:mod:`.target_offsets`)."""

    split: str
    index: int
    start: int
    end: int
    offset: int = 0

    @property
    def relpath(self) -> str:
        return shard_relpath(self.split, self.index, self.offset)

    @property
    def rows(self) -> int:
        return self.end - self.start

    def to_json(self) -> dict:
        record = asdict(self)
        if not self.offset:
            del record["offset"]  # the offset-0 set is recorded as before offsets existed
        return record


def plan_shards(split_lengths: dict[str, int], window: int, windows_per_shard: int,
                offsets: tuple[int, ...] | list[int] = (0,)) -> list[ShardSpec]:
    """Per offset ``r``, cut tokens ``[r, n)`` of each split into shards of ``window * windows_per_shard``
    tokens (the last one shorter), so every window of set ``r`` starts at ``r + i * window``."""
    if window <= 0 or windows_per_shard <= 0:
        raise CocomixError(f"window ({window}) and windows per shard ({windows_per_shard}) must be positive")
    size = window * windows_per_shard
    plan = []
    for r in offsets:
        for split, n in split_lengths.items():
            plan += [ShardSpec(split, i, start, min(start + size, n), r) for i, start in enumerate(range(r, n, size))]
    return plan


def extra_column(dtype, width: int, **about) -> dict:
    """The ``extra_columns`` record of one optional column: dtype, width, and how it was made."""
    return {"dtype": np.dtype(dtype).name, "width": int(width), **about}


def arrow_schema(token_dtype, id_dtype_, score_dtype, k_attr: int, extra: dict | None = None):
    """The exact shard schema; the schema version travels in its metadata.

    ``extra`` is the ``extra_columns`` record (name -> {dtype, width, ...}); absent or empty: none.
    """
    import pyarrow as pa

    if np.dtype(score_dtype).name not in SCORE_DTYPES:
        raise CocomixError(f"score dtype must be one of {SCORE_DTYPES}, got {np.dtype(score_dtype).name}")
    ids = pa.list_(pa.field("item", pa.from_numpy_dtype(np.dtype(id_dtype_)), nullable=False), k_attr)
    scores = pa.list_(pa.field("item", pa.from_numpy_dtype(np.dtype(score_dtype)), nullable=False), k_attr)
    fields = [
        pa.field("token", pa.from_numpy_dtype(np.dtype(token_dtype)), nullable=False),
        pa.field("concept_ids", ids, nullable=False),
        pa.field("concept_scores", scores, nullable=False),
    ]
    for name in sorted(extra or {}, key=_extra_order):
        col = extra[name]
        item = pa.field("item", pa.from_numpy_dtype(np.dtype(col["dtype"])), nullable=False)
        fields.append(pa.field(name, pa.list_(item, int(col["width"])), nullable=False))
    return pa.schema(fields, metadata={SCHEMA_KEY: str(TARGETS_SCHEMA_VERSION).encode()})


def _extra_order(name: str) -> int:
    if name not in EXTRA_COLUMNS:
        raise CocomixError(f"unknown target column {name!r}; this cocomix knows {', '.join(EXTRA_COLUMNS)}")
    return EXTRA_COLUMNS.index(name)


def safe_path(folder: Path, relpath: str) -> Path:
    """``folder / relpath``, refusing paths that are absolute or leave ``folder``."""
    rel = PurePosixPath(relpath)
    resolved = (folder / rel).resolve()
    if rel.is_absolute() or ".." in rel.parts or not resolved.is_relative_to(folder.resolve()):
        raise IntegrityError(f"shard path {relpath!r} in {folder / MANIFEST} leaves its folder; the manifest is corrupt or hostile")
    return folder / rel


def shard_column_views(batch, k_attr: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Zero-copy numpy views (token [n], concept_ids [n, k], concept_scores [n, k]) of a record batch."""
    n = batch.num_rows
    tokens = batch.column(0).to_numpy(zero_copy_only=True)
    ids_NK = batch.column(1).flatten().to_numpy(zero_copy_only=True).reshape(n, k_attr)
    scores_NK = batch.column(2).flatten().to_numpy(zero_copy_only=True).reshape(n, k_attr)
    return tokens, ids_NK, scores_NK


def extra_column_views(batch, extra: dict | None) -> dict[str, np.ndarray]:
    """Zero-copy numpy views [n, width] of the optional columns of a record batch, by name."""
    n = batch.num_rows
    return {name: batch.column(name).flatten().to_numpy(zero_copy_only=True).reshape(n, int(col["width"]))
            for name, col in (extra or {}).items()}

LOCKS = ".locks"


def sidecar_path(shard: Path) -> Path:
    return shard.with_suffix(".json")


def lock_path(out: Path, split: str, index: int, suffix: str, offset: int = 0) -> Path:
    """``.locks/[offset-<r>-]<split>-shard-NNNNN<suffix>``: the shard's lock (``.lock``) or sha256 stamp (``.stamp``)."""
    prefix = f"offset-{offset}-" if offset else ""
    return Path(out) / LOCKS / f"{prefix}{split}-shard-{index:05d}{suffix}"


def stamp_vouches(stamp: Path, shard: Path, sha256: str | None) -> bool:
    """True when ``stamp`` records ``sha256`` for ``shard`` as the file is now (same size and mtime)."""
    try:
        return json.loads(stamp.read_text()) == {"sha256": sha256, **file_stat(shard)}
    except (OSError, ValueError):
        return False


def file_stat(path: Path) -> dict:
    st = path.stat()
    return {"bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
