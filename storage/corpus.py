"""Corpus sources: a hub dataset name or a local file/folder, as one ordered stream of documents.

- ``.txt``: one file = one document (read here: exact count of bytes that are not UTF-8);
- ``.jsonl``: one line = one record = one document (read here line by line, for the same
  reason: the ``datasets`` JSON builder hands invalid bytes to Arrow and fails);
- ``.json`` / ``.parquet``: through ``datasets.load_dataset(..., streaming=True)``;
- anything else that is not an existing path: a hub dataset, streamed (``openwebtext`` is an
  alias of ``Skylion007/openwebtext``).

The order is deterministic (files sorted by relative path, grouped by kind), which is what
makes the seeded document split and resuming by document count exact.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from cocomix.core.errors import CocomixError

log = logging.getLogger(__name__)

HUB_ALIASES = {"openwebtext": "Skylion007/openwebtext"}
LOCAL_KINDS = {".txt": "txt", ".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_ERRORS = "cocomix-count-replace"


@dataclass
class DecodeStats:
    """Bytes that were not UTF-8 (each replaced by U+FFFD) and the documents holding them."""

    replaced_bytes: int = 0
    bad_docs: int = 0


_current: list[DecodeStats] = [DecodeStats()]


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _current[0].replaced_bytes += err.end - err.start
    return "\ufffd", err.end


codecs.register_error(_ERRORS, _count_and_replace)


def decode_counting(data: bytes, stats: DecodeStats) -> str:
    """UTF-8 decode; invalid bytes become U+FFFD and are counted in ``stats``."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        _current[0] = stats
        stats.bad_docs += 1
        return data.decode("utf-8", errors=_ERRORS)


@dataclass
class Corpus:
    """An ordered document source; :meth:`documents` can start after any number of documents."""

    source: str
    kind: str                       # "local" or "hub"
    text_field: str
    files: list[Path] = field(default_factory=list)
    hub_name: str | None = None
    n_docs: int | None = None       # known up front (txt folders, hub metadata), for the ETA
    stats: DecodeStats = field(default_factory=DecodeStats)

    def fingerprint(self) -> str:
        """Identity of the source: hub name, or relative paths + sizes + sha256 of each file's head and tail."""
        h = hashlib.sha256(f"{self.kind}:{self.hub_name or ''}:{self.text_field}".encode())
        root = _root(self.source)
        for file in self.files:
            h.update(f"{file.relative_to(root) if root != file else file.name}:{file.stat().st_size}:{_head_tail(file)}".encode())
        return h.hexdigest()

    def probe(self) -> None:
        """Open the source and read its first document, so a missing field, an empty corpus or an
        unreachable hub fails before an output folder is created."""
        first = next(iter(self.documents()), None)
        self.stats = DecodeStats()
        if first is None:
            raise CocomixError(f"corpus {self.source} holds no documents; pass a non-empty corpus")

    def documents(self, skip: int = 0) -> Iterator[str]:
        """Document texts in order, starting after the first ``skip`` (skipped ones are not decoded)."""
        if self.kind == "hub":
            return _hub_docs(self.hub_name, self.text_field, skip)
        return self._local_docs(_Skip(skip))

    def _local_docs(self, skip: "_Skip") -> Iterator[str]:
        for kind, files in _group_by_kind(self.files):
            yield from _READERS[kind](files, self.text_field, self.stats, skip)


@dataclass
class _Skip:
    """Documents still to pass over; shared by the readers of consecutive file groups."""

    n: int

    def take(self) -> bool:
        """True (and one less to skip) while documents remain to be skipped."""
        if self.n > 0:
            self.n -= 1
            return True
        return False


def resolve_corpus(source: str, text_field: str = "text") -> Corpus:
    """A :class:`Corpus` for ``source``, or a clear error when the path is missing or empty."""
    path = Path(source).expanduser()
    if path.exists():
        files = _local_files(path)
        n_txt = sum(f.suffix == ".txt" for f in files)
        return Corpus(source, "local", text_field, files, n_docs=n_txt if n_txt == len(files) else None)
    if _looks_like_path(source):
        raise CocomixError(f"corpus path {source} does not exist; pass an existing .txt/.jsonl/.json/.parquet file or folder, or a hub dataset name")
    name = HUB_ALIASES.get(source, source)
    log.info("--corpus %s is no local path: loading hub dataset %r (offline, the hub client retries for about a "
             "minute; HF_HUB_OFFLINE=1 fails at once)", source, name)
    return Corpus(source, "hub", text_field, hub_name=name, n_docs=_hub_size(name))


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or "\\" in source or Path(source).suffix.lower() in LOCAL_KINDS or source.count("/") > 1


def _local_files(path: Path) -> list[Path]:
    if path.is_file():
        if path.suffix.lower() not in LOCAL_KINDS:
            raise CocomixError(f"corpus file {path} is not .txt/.jsonl/.json/.parquet; convert it or pass a folder of such files")
        return [path]
    files = sorted((p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in LOCAL_KINDS), key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise CocomixError(f"corpus folder {path} holds no .txt/.jsonl/.json/.parquet files; the corpus is empty")
    return files


def _root(source: str) -> Path:
    path = Path(source).expanduser()
    return path if path.is_dir() else path.parent


def _head_tail(file: Path, n: int = 1 << 16) -> str:
    with open(file, "rb") as f:
        head = f.read(n)
        f.seek(max(f.seek(0, 2) - n, len(head)))
        return hashlib.sha256(head + f.read(n)).hexdigest()


def _group_by_kind(files: list[Path]) -> list[tuple[str, list[Path]]]:
    order = ["txt", "jsonl", "json", "parquet"]
    groups = {k: [f for f in files if LOCAL_KINDS[f.suffix.lower()] == k] for k in order}
    return [(k, fs) for k, fs in groups.items() if fs]


def _read_txt(files: list[Path], text_field: str, stats: DecodeStats, skip: _Skip) -> Iterator[str]:
    for file in files:
        if not skip.take():
            yield decode_counting(file.read_bytes(), stats)


def _read_jsonl(files: list[Path], text_field: str, stats: DecodeStats, skip: _Skip) -> Iterator[str]:
    for file in files:
        with open(file, "rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip() or skip.take():
                    continue
                try:
                    record = json.loads(decode_counting(line, stats))
                except ValueError as err:
                    raise CocomixError(f"{file}:{lineno} is not valid JSON ({err}); fix or remove that line") from None
                yield _text_of(record, text_field, f"{file}:{lineno}")


def _read_with_datasets(files: list[Path], text_field: str, stats: DecodeStats, skip: _Skip) -> Iterator[str]:
    import datasets

    builder = "parquet" if files[0].suffix.lower() == ".parquet" else "json"
    ds = datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", streaming=True)
    for i, record in enumerate(ds):
        if not skip.take():
            yield _text_of(record, text_field, f"{files[0]}{'' if len(files) == 1 else ' (and others)'} record {i}")


_READERS = {"txt": _read_txt, "jsonl": _read_jsonl, "json": _read_with_datasets, "parquet": _read_with_datasets}


def _text_of(record: dict, text_field: str, where: str) -> str:
    if not isinstance(record, dict) or text_field not in record:
        found = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
        raise CocomixError(f"{where} has no field {text_field!r} (fields found: {found}); pass --text-field with one of those")
    text = record[text_field]
    if text is None:
        return ""
    if not isinstance(text, str):  # a list, dict or number would be tokenized as its Python repr
        raise CocomixError(f"{where}: field {text_field!r} holds a {type(text).__name__}, not text; "
                           "pass --text-field naming a text field, or fix that record")
    return text


def _hub_size(name: str) -> int | None:
    try:
        import datasets

        info = datasets.load_dataset_builder(name).info
        return int(info.splits["train"].num_examples) if info.splits and "train" in info.splits else None
    except Exception:  # noqa: BLE001 - the size only feeds the ETA; loading reports real errors
        return None


def _open_hub(name: str):
    """Stream the train split; datasets that still ship a loading script (which ``datasets`` >= 4
    refuses) are read from the hub's automatic Parquet conversion instead."""
    import datasets

    try:
        return datasets.load_dataset(name, split="train", streaming=True)
    except RuntimeError as err:
        if "scripts are no longer supported" not in str(err):
            raise
        log.info("%s ships a loading script; streaming its Parquet conversion (refs/convert/parquet)", name)
        return datasets.load_dataset(name, split="train", streaming=True, revision="refs/convert/parquet")


def _hub_docs(name: str, text_field: str, skip: int) -> Iterator[str]:
    try:
        ds = _open_hub(name)
    except Exception as err:  # noqa: BLE001 - hub/network errors come in many types
        raise CocomixError(
            f"could not load hub dataset {name!r} ({type(err).__name__}: {str(err)[:200]}); "
            "offline? pass a local .txt/.jsonl/.json/.parquet file or folder to --corpus"
        ) from None
    if skip:
        ds = ds.skip(skip)
    for i, record in enumerate(ds):
        yield _text_of(record, text_field, f"hub dataset {name} record {skip + i}")
