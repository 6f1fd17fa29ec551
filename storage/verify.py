"""``cocomix verify PATH [--tokens DIR]``: prove a token store or target folder is complete and intact.

Stops at the first problem with an :class:`IntegrityError` naming the file and what is
wrong (the CLI prints it and exits non-zero). Reads everything in bounded blocks.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cocomix.core.errors import CocomixError, IntegrityError
from cocomix.core.logs import console
from cocomix.storage.config import VerifyConfig
from cocomix.storage.target_reader import TargetReader, check_ranges, load_manifest
from cocomix.storage.target_schema import MANIFEST, PLAN, safe_path
from cocomix.storage.token_store import TOKENIZER_DIR, TokenStore, tokenizer_fingerprint

log = logging.getLogger(__name__)

BLOCK = 1 << 22


@dataclass
class VerifyResult:
    """What was checked; a failed check raises instead of returning."""

    path: Path
    kind: str            # "tokens" or "targets"
    items: int           # shards (targets) or splits (tokens) checked
    tokens: int          # tokens covered


def detect_kind(path: Path) -> str:
    """"targets" or "tokens" from the marker files; a clear error for anything else."""
    if not path.exists():
        raise CocomixError(f"{path} does not exist; pass a token store or a target folder")
    if (path / MANIFEST).is_file() or (path / PLAN).is_file():
        return "targets"
    if (path / "zarr.json").is_file():
        return "tokens"
    raise CocomixError(f"{path} is neither a token store (zarr.json) nor a target folder ({MANIFEST}); pass one of those")


def run_verify(cfg: VerifyConfig) -> VerifyResult:
    path = Path(cfg.path)
    if detect_kind(path) == "tokens":
        result = verify_token_store(path)
    else:
        result = verify_targets(path, Path(cfg.tokens) if cfg.tokens else None)
        if cfg.upgrade:
            upgraded = add_block_checksums(path)
            console.print(f"[green]upgraded[/] {path}: block checksums added to {upgraded} shard(s)")
    if cfg.upgrade and result.kind == "tokens":
        log.info("--upgrade: token stores need none (zarr's shard index carries its own CRC32C)")
    console.print(f"[green]ok[/] {result.kind} {path}: {result.items} {'shards' if result.kind == 'targets' else 'splits'}, {result.tokens:,} tokens verified")
    return result


def verify_targets(path: Path, tokens: Path | None = None) -> VerifyResult:
    """Manifest, safe paths, contiguous full ranges, then per shard: sha256, schema, rows, ids, tokens."""
    manifest = load_manifest(path)
    for entry in manifest["shards"]:
        safe_path(path, entry["path"])
    check_ranges(manifest)
    reader = TargetReader(path, manifest)
    store = TokenStore.open(tokens) if tokens else None
    if store is not None:
        reader.check_tokens(store.provenance())
    for entry in manifest["shards"]:
        _verify_shard(reader, entry, store)
    return VerifyResult(path, "targets", len(manifest["shards"]), sum(manifest["splits"].values()))


def add_block_checksums(path: Path) -> int:
    """Record block CRC32Cs in the sidecars and manifest of a verified target folder; returns how many shards lacked them."""
    import pyarrow as pa

    from cocomix.storage import block_check
    from cocomix.storage.files import atomic_write_json
    from cocomix.storage.target_schema import sidecar_path

    manifest = load_manifest(path)
    added = 0
    for entry in manifest["shards"]:
        if entry.get(block_check.KEY) is not None:
            continue
        file = safe_path(path, entry["path"])
        with pa.memory_map(str(file), "r") as source:
            batch = pa.ipc.open_file(source).get_batch(0)
            entry[block_check.KEY] = block_check.block_crcs(block_check.column_rows(batch))
        atomic_write_json(sidecar_path(file), entry)
        added += 1
    if added:
        atomic_write_json(path / MANIFEST, manifest)
    return added


def _verify_shard(reader: TargetReader, entry: dict, store: TokenStore | None) -> None:
    reader.check_checksum(entry)
    shard = reader.shard_views(entry)
    shard.blocks.check_all()
    ids = shard.ids_NK
    valid = ids != reader.ignore_id
    if reader.n_latents and (ids[valid] >= reader.n_latents).any():
        raise IntegrityError(f"shard {entry['path']} holds concept ids >= n_latents {reader.n_latents}")
    _verify_extra(reader, entry, shard.extra)
    if store is not None:
        expected = store.split(entry["split"]).read(entry["start"], entry["end"])
        if len(expected) != len(shard.tokens) or not np.array_equal(expected, shard.tokens):
            first = int(np.argmax(expected != shard.tokens)) if len(expected) == len(shard.tokens) else 0
            raise IntegrityError(f"shard {entry['path']}: token column differs from the token store at row {first} (token {entry['start'] + first} of split {entry['split']!r})")


def _verify_extra(reader: TargetReader, entry: dict, extra: dict) -> None:
    """KD ids must be token ids of the vocabulary; stored hidden states must be finite."""
    vocab = reader.meta.get("vocab_size")
    kd = extra.get("kd_ids")
    if kd is not None and vocab is not None and kd.size and int(kd.max()) >= int(vocab):
        raise IntegrityError(f"shard {entry['path']} holds kd_ids up to {int(kd.max())}, outside the vocabulary of {vocab}")
    hidden = extra.get("hidden")
    if hidden is not None and not np.isfinite(hidden).all():
        raise IntegrityError(f"shard {entry['path']} holds non-finite hidden states (float16 overflow or a diverged teacher)")


def verify_token_store(path: Path) -> VerifyResult:
    """Attributes, tokenizer fingerprint, and per split: lengths, offsets, EOS placement, id range, every chunk file present and decoding."""
    store = TokenStore.open(path)
    _verify_tokenizer(store)
    total = 0
    for name in store.splits:
        _verify_split(store, name)
        total += len(store.split(name))
    return VerifyResult(path, "tokens", len(store.splits), total)


def _verify_tokenizer(store: TokenStore) -> None:
    folder = store.path / TOKENIZER_DIR
    if not (folder / "tokenizer.json").is_file():
        raise IntegrityError(f"token store {store.path} lacks {TOKENIZER_DIR}/tokenizer.json; re-run `cocomix tokenize --overwrite`")
    if tokenizer_fingerprint(store.load_tokenizer()) != store.tokenizer_sha256:
        raise IntegrityError(f"{folder} does not match the tokenizer sha256 recorded in {store.path}/zarr.json (it was modified)")


def _verify_split(store: TokenStore, name: str) -> None:
    split = store.split(name)
    counts = store.attrs["counts"][name]
    where = f"split {name!r} of {store.path}"
    if (split.n_tokens, split.n_docs) != (counts["n_tokens"], counts["n_docs"]):
        raise IntegrityError(f"{where} has {split.n_tokens} tokens / {split.n_docs} documents, its attributes say {counts['n_tokens']} / {counts['n_docs']}")
    if split.tokens_array.dtype != store.dtype:
        raise IntegrityError(f"{where} stores {split.tokens_array.dtype}, its attributes say {store.dtype}")
    offsets = split.doc_offsets()
    if offsets[0] != 0 or offsets[-1] != split.n_tokens or (np.diff(offsets) <= 0).any():
        raise IntegrityError(f"{where}: doc_offsets must rise strictly from 0 to {split.n_tokens}")
    for start in range(0, split.n_tokens, BLOCK):
        _verify_block(store, split, offsets, start, min(start + BLOCK, split.n_tokens), where)


def _verify_block(store: TokenStore, split, offsets: np.ndarray, start: int, stop: int, where: str) -> None:
    block = split.read(start, stop)
    if split.direct and not np.array_equal(split.read_zarr(start, stop), block):
        raise IntegrityError(f"{where}: tokens [{start}, {stop}) read differently by zarr and the direct chunk reader; report this as a cocomix bug")
    if block.size and int(block.max()) >= store.vocab_size:
        raise IntegrityError(f"{where}: token id {int(block.max())} in [{start}, {stop}) is outside the vocabulary of {store.vocab_size}")
    ends = offsets[1:] - 1
    ends = ends[(ends >= start) & (ends < stop)]
    if (block[ends - start] != store.eos_id).any():
        raise IntegrityError(f"{where}: a document in [{start}, {stop}) does not end with EOS id {store.eos_id}")
