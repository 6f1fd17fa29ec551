"""Read side of the token store (docs/ARCHITECTURE.md, formats): a Zarr v3 group, one subgroup per split.

::

    <store>/zarr.json            group; attributes = provenance (schema_version, tokenizer, corpus, split rule, counts)
    <store>/train/tokens         uint16|uint32 [n_tokens]   documents in order, each followed by EOS
    <store>/train/doc_offsets    int64 [n_docs + 1]         start of each document, then the end
    <store>/val/...              same for the validation split
    <store>/tokenizer/           the fast HF tokenizer that made the tokens
    <store>/progress.json        resume record of an unfinished run (see :mod:`.store_writer`)

A store is usable only once its attributes say ``complete``; :meth:`TokenStore.open`
refuses anything else, so an interrupted ``tokenize`` is never mistaken for a corpus.
"""
from __future__ import annotations

import hashlib
import json
import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cocomix.core.errors import CocomixError, IntegrityError
from cocomix.storage.chunk_reader import chunk_reader, damaged_file, missing_file

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FORMAT = "cocomix-token-store"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 0:
        raise CocomixError(f"vocabulary size must be positive, got {vocab_size}")
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    raise CocomixError(f"vocabulary of {vocab_size} ids does not fit uint32 token ids; use a tokenizer with fewer than 2**32 ids")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of what decides the ids: model (vocab + merges), added/special tokens, normalizer, pre-tokenizer.

    Padding/truncation settings and the post-processor are left out: they change with how
    a tokenizer is loaded, not which id a piece of text gets (we never add special tokens).
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not hasattr(backend, "to_str"):
        raise CocomixError(f"tokenizer {type(tokenizer).__name__} is not a fast (Rust) tokenizer; pass a folder with tokenizer.json")
    spec = json.loads(backend.to_str())
    keep = {key: spec.get(key) for key in ("model", "added_tokens", "normalizer", "pre_tokenizer")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class TokenSplit:
    """One split: ``len(split)`` tokens, ``n_docs`` documents, random-access reads."""

    def __init__(self, name: str, group: Any, folder: Path | None = None) -> None:
        self.name = name
        self._tokens = group["tokens"]
        self._offsets = group["doc_offsets"]
        self.n_tokens = int(self._tokens.shape[0])
        self.n_docs = int(self._offsets.shape[0]) - 1
        self._folder = folder
        self._fast = chunk_reader(folder / "tokens", folder.parent) if folder is not None else None

    def __len__(self) -> int:
        return self.n_tokens

    @property
    def direct(self) -> bool:
        """True when :meth:`read` decodes the chunk files itself instead of going through zarr."""
        return self._fast is not None

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` as a 1-D array (clipped to the split)."""
        if start < 0 or stop < start:
            raise IndexError(f"bad token range [{start}, {stop}) for split {self.name!r} of {self.n_tokens} tokens")
        stop = min(stop, self.n_tokens)
        if self._fast is not None:
            return self._fast.read(start, stop)
        return self.read_zarr(start, stop)

    def read_zarr(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` through zarr, after checking their files exist; a file that fails to decode is named."""
        files = self.files(start, stop)
        for _, _, file in files:
            if not file.is_file():
                raise missing_file(self._folder.parent, file)
        try:
            return self._tokens[start:stop]
        except Exception as whole:  # noqa: BLE001 - a corrupt chunk surfaces as a codec error of any type
            for lo, hi, file in files:  # read file by file to name the damaged one
                try:
                    self._tokens[lo:hi]
                except Exception as err:  # noqa: BLE001
                    raise damaged_file(self._folder.parent, file, f"{type(err).__name__}: {err}") from None
            raise damaged_file(self._folder.parent, self._folder, f"{type(whole).__name__}: {whole}") from None

    def files(self, start: int, stop: int) -> list[tuple[int, int, Path]]:
        """``(lo, hi, file)`` of each chunk (or shard) file holding tokens of ``[start, stop)``; none without a folder."""
        stop = min(stop, self.n_tokens)
        if self._folder is None or stop <= start:
            return []
        arr = self._tokens
        block = int((arr.shards or arr.chunks)[0])
        encode = arr.metadata.chunk_key_encoding.encode_chunk_key
        return [
            (i * block, min((i + 1) * block, self.n_tokens), self._folder / "tokens" / encode((i,)))
            for i in range(start // block, (stop - 1) // block + 1)
        ]

    def doc_offsets(self) -> np.ndarray:
        """int64 [n_docs + 1]: start of each document, then the split's end."""
        return self._offsets[:]

    @property
    def tokens_array(self) -> Any:
        """The underlying Zarr array."""
        return self._tokens


class TokenStore:
    """A finished token store; see the module docstring for the layout."""

    def __init__(self, path: Path, group: Any) -> None:
        self.path = path
        self._group = group
        self.attrs: dict = dict(group.attrs)
        self.splits: list[str] = [s for s in self.attrs["counts"]]
        self.vocab_size = int(self.attrs["vocab_size"])
        self.eos_id = int(self.attrs["eos_id"])
        self.dtype = np.dtype(self.attrs["dtype"])
        self.tokenizer_sha256 = str(self.attrs["tokenizer"]["sha256"])

    @classmethod
    def open(cls, path: str | Path) -> "TokenStore":
        path = Path(path)
        attrs = read_store_attrs(path)
        check_store_attrs(path, attrs)
        import zarr

        for split in attrs.get("counts") or ():
            for array in ("tokens", "doc_offsets"):
                meta = path / split / array / "zarr.json"
                if not meta.is_file():
                    raise IntegrityError(f"token store {path} is damaged: {meta.relative_to(path)} is missing; "
                                         "restore it from a copy or re-run `cocomix tokenize --overwrite`")
        return cls(path, zarr.open_group(str(path), mode="r"))

    def split(self, name: str) -> TokenSplit:
        if name not in self.splits:
            raise CocomixError(f"token store {self.path} has no split {name!r}; known splits: {', '.join(self.splits)}")
        return self._splits[name]

    @cached_property
    def _splits(self) -> dict[str, TokenSplit]:
        return {name: TokenSplit(name, self._group[name], self.path / name) for name in self.splits}

    def load_tokenizer(self) -> Any:
        """The fast HF tokenizer saved inside the store."""
        from cocomix.storage.safe_load import load_tokenizer

        return load_tokenizer(self.path / TOKENIZER_DIR, "tokenizer of token store")

    def provenance(self) -> dict:
        """JSON-able identity of these tokens (stage 1 copies it into the target manifest).

        ``path`` (absolute) only helps later commands find the store; comparisons such as
        :meth:`TargetReader.check_tokens` ignore it, so a moved store still matches.
        """
        a = self.attrs
        return {
            "path": str(self.path.resolve()),
            "schema_version": a["schema_version"],
            "tokenizer": dict(a["tokenizer"]),
            "tokenizer_sha256": self.tokenizer_sha256,
            "vocab_size": self.vocab_size,
            "eos_id": self.eos_id,
            "dtype": self.dtype.name,
            "corpus": dict(a["corpus"]),
            "split": dict(a["split"]),
            "counts": {k: dict(v) for k, v in a["counts"].items()},
        }


def read_store_attrs(path: Path) -> dict:
    """The group attributes from ``zarr.json``, or a clear error when ``path`` is not a token store."""
    meta_file = Path(path) / "zarr.json"
    if not Path(path).exists():
        raise CocomixError(f"token store {path} does not exist; run `cocomix tokenize --out {path}` first")
    if not meta_file.is_file():
        raise IntegrityError(f"{path} is not a token store (no zarr.json); pass the folder written by `cocomix tokenize`")
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, ValueError) as err:
        raise IntegrityError(f"{meta_file} is unreadable ({err}); run `cocomix tokenize --overwrite` to rebuild it") from None
    return meta.get("attributes", {})


def check_store_attrs(path: Path, attrs: dict) -> None:
    """Refuse stores of another format/version and unfinished ones."""
    if attrs.get("format") != FORMAT:
        raise IntegrityError(f"{path} is a Zarr group but not a cocomix token store (format {attrs.get('format')!r})")
    if attrs.get("schema_version") != SCHEMA_VERSION:
        raise IntegrityError(
            f"token store {path} has schema_version {attrs.get('schema_version')}, this cocomix reads {SCHEMA_VERSION}; "
            "re-run `cocomix tokenize --overwrite`"
        )
    if not attrs.get("complete"):
        raise IntegrityError(f"token store {path} is incomplete (tokenize was interrupted); run the same `cocomix tokenize` again to finish it")
