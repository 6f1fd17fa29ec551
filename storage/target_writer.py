"""Target-shard writer: plan first, each shard atomically with a sidecar, manifest last.

Several processes (ranks, or restarted jobs) may write into one folder: each takes a
shard by a non-blocking ``fcntl.flock`` on ``.locks/<split>-shard-NNNNN.lock``. The OS
drops the lock when the process dies, so a SIGKILLed worker never leaves a shard stuck;
its half-written temporary file is never under the final name and is simply rewritten.

A shard counts as done when its sidecar agrees with the plan and its sha256 matches. Hashing
every finished shard on each restart would cost minutes at billions of tokens, so the sha256 a
shard was checked with is cached beside its lock (``.locks/<split>-shard-NNNNN.stamp``) with the
file's size and mtime, as ``make`` and git's index do: an unchanged file is not hashed again, a
rewritten or truncated one is. ``cocomix verify`` always hashes.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from cocomix.core.errors import CocomixError, IntegrityError, MismatchError
from cocomix.storage import block_check
from cocomix.storage.files import atomic_replace, atomic_write_json, sha256_file
from cocomix.storage.identity import Difference, describe_diff, folder_identity
from cocomix.storage.target_schema import (
    FORMAT,
    LOCKS,
    MANIFEST,
    PLAN,
    TARGETS_SCHEMA_VERSION,
    ShardSpec,
    arrow_schema,
    file_stat,
    ignore_id,
    lock_path,
    sidecar_path,
    stamp_vouches,
)

log = logging.getLogger(__name__)
WRITERS = "writers.lock"  #: held shared by every writer; --overwrite needs it free


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, sort_keys=True))


class TargetWriter:
    """Context manager writing the shards of ``plan`` into ``out_dir`` (see the module docstring)."""

    def __init__(self, out_dir, *, meta: dict, plan: list[ShardSpec], k_attr: int, id_dtype, score_dtype,
                 token_dtype, overwrite: bool = False, extra_columns: dict | None = None,
                 compute: dict | None = None) -> None:
        self.out = Path(out_dir)
        self.extra_columns = _jsonable(extra_columns or {})  #: optional columns (see target_schema), name -> record
        #: how the shards are computed where it changes their bytes (e.g. CPU threads); recorded in
        #: plan.json by the run that starts the folder, adopted from it by every later run
        self.compute = _jsonable(compute or {})
        self.meta = _jsonable(meta)
        self.plan = list(plan)
        self.k_attr = int(k_attr)
        self.id_dtype, self.score_dtype, self.token_dtype = np.dtype(id_dtype), np.dtype(score_dtype), np.dtype(token_dtype)
        self.ignore_id = ignore_id(self.id_dtype)
        self.schema = arrow_schema(self.token_dtype, self.id_dtype, self.score_dtype, self.k_attr, self.extra_columns)
        self._locks: dict[ShardSpec, int] = {}
        self.checks = {"hashed": 0, "unchanged": 0}  #: finished shards proven by sha256 / by their stamp (size, mtime)
        self._writers_fd, alone = join_writers(self.out)
        try:
            self._open_folder(overwrite, alone)
        except BaseException:
            self._leave()
            raise
        fcntl.flock(self._writers_fd, fcntl.LOCK_SH)  # from here on, others may join (never clear)

    # ---- plan.json: identity of the folder -------------------------------------------------
    def _plan_record(self) -> dict:
        return {
            "format": FORMAT + "-plan", "schema_version": TARGETS_SCHEMA_VERSION, "meta": self.meta,
            "k_attr": self.k_attr, "ignore_id": self.ignore_id,
            "dtypes": {"token": self.token_dtype.name, "id": self.id_dtype.name, "score": self.score_dtype.name},
            "shards": [s.to_json() for s in self.plan],
            **({"extra_columns": self.extra_columns} if self.extra_columns else {}),  # absent: as older folders
            **({"compute": self.compute} if self.compute else {}),
        }

    def _open_folder(self, overwrite: bool, alone: bool) -> None:
        record = _jsonable(self._plan_record())
        plan_file = self.out / PLAN
        if plan_file.is_file():
            try:
                old = json.loads(plan_file.read_text())
            except ValueError:
                old = {}
            if folder_identity(old) == folder_identity(record):
                self.compute = old.get("compute", {})  # the first run's: later ones compute the same bytes
                record = _jsonable(self._plan_record())
                if old != record:
                    log.info("%s: inputs found at other paths, same content (sha256 / fingerprint); resuming", self.out)
                return
            if not overwrite and not (alone and not self._finished_any()):
                raise MismatchError(f"{self.out} holds targets made with different settings ({_describe_plan_change(old, record)}); pass --overwrite to replace them or choose another --out")
            self._clear(alone, "overwrite" if overwrite else "no shard was finished with the old settings")
        elif self.out.exists() and any(p.name != LOCKS for p in self.out.iterdir()):
            if not (self.out / MANIFEST).exists() or not overwrite:
                raise CocomixError(f"output folder {self.out} is not empty and holds no {PLAN}; choose another --out")
            self._clear(alone, "overwrite")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(plan_file, record)

    def _finished_any(self) -> bool:
        """A shard sidecar exists: some work of the old plan would be lost."""
        return any(self.out.glob("*/shard-*.json"))

    def _clear(self, alone: bool, why: str) -> None:
        """Empty the folder (keeping the writers' lock file), only when no other process writes into it."""
        if not alone:
            raise CocomixError(f"another extract is writing into {self.out} (it holds {self.out / LOCKS / WRITERS}); "
                               "stop it or wait for it to finish before replacing the folder, or choose another --out")
        log.warning("%s: clearing %s", why, self.out)
        for child in self.out.iterdir():
            if child.name == LOCKS:
                for entry in child.iterdir():
                    if entry.name != WRITERS:
                        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
            elif child.is_dir():
                shutil.rmtree(child)
            else:
                child.unlink()

    def __del__(self) -> None:  # a writer dropped without ``with`` must not keep the folder held
        self._leave()

    def _leave(self) -> None:
        fd, self._writers_fd = getattr(self, "_writers_fd", None), None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> "TargetWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        for spec in list(self._locks):
            self._release(spec)
        self._leave()

    # ---- claiming ---------------------------------------------------------------------------
    def pending(self, rank: int = 0, world: int = 1) -> list[ShardSpec]:
        """This rank's (plan index % world == rank) shards that are not done yet."""
        return [s for i, s in enumerate(self.plan) if i % world == rank and not self.is_done(s)]

    def _lock_path(self, spec: ShardSpec, suffix: str) -> Path:
        return lock_path(self.out, spec.split, spec.index, suffix, spec.offset)

    def claim(self, spec: ShardSpec) -> bool:
        """Take ``spec`` with a non-blocking exclusive lock; False if another process holds it or it is done."""
        if spec in self._locks:
            return True
        lock = self._lock_path(spec, ".lock")
        lock.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._locks[spec] = fd
        if self.is_done(spec):
            self._release(spec)
            return False
        return True

    def _release(self, spec: ShardSpec) -> None:
        fd = self._locks.pop(spec, None)
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def is_done(self, spec: ShardSpec) -> bool:
        """Final shard and sidecar present, sidecar agrees with ``spec``, and the sha256 matches
        (read from the stamp when the file is unchanged since it was last hashed)."""
        shard = self.out / spec.relpath
        side = sidecar_path(shard)
        if not shard.is_file() or not side.is_file():
            return False
        try:
            info = json.loads(side.read_text())
        except ValueError:
            return False
        same = (info.get("start"), info.get("end"), info.get("rows")) == (spec.start, spec.end, spec.rows)
        if not same:
            return False
        if stamp_vouches(self._lock_path(spec, ".stamp"), shard, info.get("sha256")):
            self.checks["unchanged"] += 1
            return True
        if info.get("sha256") != sha256_file(shard):
            return False
        self.checks["hashed"] += 1
        self._write_stamp(spec, shard, info["sha256"])
        return True

    def _write_stamp(self, spec: ShardSpec, shard: Path, sha256: str) -> None:
        """Best effort: a stamp is only a cache (a lost race with another writer costs a re-hash)."""
        stamp = self._lock_path(spec, ".stamp")
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(stamp, {"sha256": sha256, **file_stat(shard)})
        except OSError as err:
            log.debug("stamp %s not written: %s", stamp, err)

    # ---- writing ----------------------------------------------------------------------------
    def write_shard(self, spec: ShardSpec, tokens, concept_ids, concept_scores, extra: dict | None = None) -> dict:
        """Write one shard (tokens [n], ids [n, k], scores [n, k], each optional column [n, width]
        in ``extra``) atomically; returns its sidecar record."""
        if spec not in self.plan:
            raise CocomixError(f"shard {spec} is not in the plan of {self.out}")
        if spec not in self._locks and not self.claim(spec):
            raise CocomixError(f"shard {spec.relpath} is held by another process or already done")
        try:
            batch = self._batch(spec, tokens, concept_ids, concept_scores, extra or {})
            return self._write_batch(spec, batch)
        finally:
            self._release(spec)

    def _batch(self, spec: ShardSpec, tokens, concept_ids, concept_scores, extra: dict):
        import pyarrow as pa

        n, k = spec.rows, self.k_attr
        tok = _checked_ints(np.asarray(tokens), (n,), self.token_dtype, "token", spec)
        ids = _checked_ints(np.asarray(concept_ids), (n, k), self.id_dtype, "concept_ids", spec)
        self._check_latents(ids, spec)
        scores = np.asarray(concept_scores)
        if scores.shape != (n, k):
            raise CocomixError(f"concept_scores of {spec.relpath} has shape {scores.shape}, expected {(n, k)}")
        scores = np.ascontiguousarray(scores, dtype=self.score_dtype)
        columns = [
            pa.array(tok),
            pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), k),
            pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), k),
        ]
        if sorted(extra) != sorted(self.extra_columns):
            raise CocomixError(f"shard {spec.relpath} got columns {sorted(extra)}, the plan has {sorted(self.extra_columns)}")
        for field in self.schema.names[3:]:
            col = self.extra_columns[field]
            values = np.asarray(extra[field])
            shape = (n, int(col["width"]))
            if values.shape != shape:
                raise CocomixError(f"{field} of {spec.relpath} has shape {values.shape}, expected {shape}")
            dtype = np.dtype(col["dtype"])
            values = _checked_ints(values, shape, dtype, field, spec) if dtype.kind == "u" else values.astype(dtype)
            columns.append(pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(values).reshape(-1)), shape[1]))
        return pa.RecordBatch.from_arrays(columns, schema=self.schema)

    def _check_latents(self, ids: np.ndarray, spec: ShardSpec) -> None:
        n_latents = (self.meta.get("sae") or {}).get("n_latents")
        if n_latents is None:
            return
        bad = (ids >= n_latents) & (ids != self.ignore_id)
        if bad.any():
            raise CocomixError(f"concept id {int(ids[bad][0])} in {spec.relpath} is not a latent of an SAE with {n_latents}")

    def _write_batch(self, spec: ShardSpec, batch) -> dict:
        import pyarrow as pa

        final = self.out / spec.relpath
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.{os.getpid()}.tmp")
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, self.schema) as writer:
            writer.write_batch(batch)
        info = {**spec.to_json(), "path": spec.relpath, "rows": spec.rows, "sha256": sha256_file(tmp),
                "bytes": tmp.stat().st_size, "schema_version": TARGETS_SCHEMA_VERSION,
                block_check.KEY: block_check.block_crcs(block_check.column_rows(batch))}
        atomic_replace(tmp, final)
        atomic_write_json(sidecar_path(final), info)
        self._write_stamp(spec, final, info["sha256"])
        return info

    # ---- manifest ---------------------------------------------------------------------------
    def finalize(self, extra: dict | None = None) -> Path:
        """Write ``manifest.json`` (the last write) once every shard of the plan is done."""
        missing = [s for s in self.plan if not self.is_done(s)]
        if missing:
            raise IntegrityError(f"{len(missing)} of {len(self.plan)} shards of {self.out} are not done (first: {missing[0].relpath}); run the extract again to finish them")
        shards = [json.loads(sidecar_path(self.out / s.relpath).read_text()) for s in self.plan]
        lengths: dict[str, int] = {}
        for s in self.plan:
            lengths[s.split] = max(lengths.get(s.split, 0), s.end)
        manifest = {
            **self._plan_record(), "format": FORMAT, "n_latents": (self.meta.get("sae") or {}).get("n_latents"),
            "splits": lengths, "shards": shards, "extra": _jsonable(extra or {}),
        }
        for stale in [*self.out.glob("*/.*.tmp"), *self.out.glob("offset-*/*/.*.tmp")]:
            stale.unlink(missing_ok=True)  # left by killed writers; every shard is final by now
        atomic_write_json(self.out / MANIFEST, manifest)
        log.info("wrote %s (%d shards)", self.out / MANIFEST, len(shards))
        return self.out / MANIFEST


def join_writers(out: Path) -> tuple[int, bool]:
    """Open ``.locks/writers.lock``, held shared by every writer of the folder for its lifetime.

    Returns (fd, alone): alone when the exclusive lock was free, i.e. no other process writes
    here; the caller then holds it exclusively until it has set the folder up (so nobody joins
    a folder that is being cleared). Otherwise the fd holds a shared lock already.
    """
    lock = Path(out) / LOCKS / WRITERS
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    while True:
        for mode, alone in ((fcntl.LOCK_EX, True), (fcntl.LOCK_SH, False)):
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return fd, alone
            except BlockingIOError:
                pass
        time.sleep(0.05)  # another process holds it exclusively while it sets the folder up (a moment)


def _checked_ints(arr: np.ndarray, shape: tuple, dtype: np.dtype, name: str, spec: ShardSpec) -> np.ndarray:
    """``arr`` as ``dtype``, refusing wrong shapes and values that do not fit."""
    if arr.shape != shape:
        raise CocomixError(f"{name} of {spec.relpath} has shape {arr.shape}, expected {shape}")
    if arr.dtype != dtype and arr.size:
        info = np.iinfo(dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise CocomixError(f"{name} values [{lo}, {hi}] in {spec.relpath} do not fit {dtype.name}; use a wider dtype")
    return np.ascontiguousarray(arr, dtype=dtype)


def _plan_diff(old: list, new: list, old_window: Any, new_window: Any) -> list[Difference]:
    """A changed shard plan in words: splits, split lengths, windows (or tokens) per shard."""
    parts = []
    lo, ln = _split_lengths(old), _split_lengths(new)
    if sorted(lo) != sorted(ln):
        parts.append(Difference("splits", ", ".join(sorted(lo)) or "none", ", ".join(sorted(ln)) or "none"))
    parts += [Difference(f"tokens of split {s}", lo[s], ln[s]) for s in sorted(lo) if s in ln and lo[s] != ln[s]]
    so, sn = _shard_tokens(old), _shard_tokens(new)
    if so != sn:
        if old_window == new_window and isinstance(new_window, int) and so and sn and so % new_window == sn % new_window == 0:
            parts.append(Difference("windows per shard", so // new_window, sn // new_window))
        else:
            parts.append(Difference("tokens per shard", so or "one shard per split", sn or "one shard per split"))
    return parts or [Difference("shard plan", f"{len(old)} shards", f"{len(new)} shards")]


def _describe_plan_change(old: dict, new: dict) -> str:
    """What differs between two plan records (paths that only locate an input left out)."""
    old, new = folder_identity(old), folder_identity(new)
    windows = (old.get("meta", {}).get("window"), new.get("meta", {}).get("window"))
    return describe_diff(old, new, special={"shards": lambda a, b: _plan_diff(a or [], b or [], *windows)}) \
        or "unknown difference"


def _split_lengths(shards: list) -> dict[str, int]:
    lengths: dict[str, int] = {}
    for s in shards:
        lengths[s.get("split")] = max(lengths.get(s.get("split"), 0), int(s.get("end") or 0))
    return lengths


def _shard_tokens(shards: list) -> int | None:
    """Tokens per shard of a plan: the first shard of a split cut in several (None if none is)."""
    splits = [s.get("split") for s in shards]
    for s in shards:
        if s.get("index") == 0 and splits.count(s.get("split")) > 1:
            return int(s["end"]) - int(s["start"])
    return None
