"""``cocomix concepts describe TARGETS --out DIR``: a dictionary of the SAE's concepts, read off their labels.

One streaming pass over the target shards keeps, per latent, how often it is a label
(``frequency``: any of a token's K slots; ``top1_frequency``: slot 0, its token's best label)
and its ``top_n`` highest-score labelled positions. Memory is bounded by the latents, not the
corpus: counts ``[L]`` and the best scores and positions ``[L, N]``, read a chunk of rows at a
time. The top-N merge is vectorised: one gather drops every candidate that does not beat its
latent's current N-th best (after the first chunks, nearly all of them), the rest are merged by
one ``lexsort`` over (latent, -score, position); ties go to the earlier position.
After the pass the winners' contexts (``context`` tokens either side) are read from the shards'
own ``token`` column and decoded with the token store's tokenizer.

Output folder::

    concepts.arrow   Arrow IPC file, one row per latent (0 .. L-1):
                     latent uint32, frequency int64, top1_frequency int64,
                     examples list<struct<score float32, split string, token_position int64,
                                          left string, token string, right string>>  (best first)
    describe.json    the targets it describes (label identity, shard sha256s), top_n, context, counts

Shape legend: L latents, N contexts kept per latent, R rows (tokens) of a chunk, K labels per
token, M candidate label slots, U latents touched by a merge.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cocomix.core.errors import CocomixError, IntegrityError, MismatchError
from cocomix.stage2_pretrain.concepts_config import DescribeConfig
from cocomix.storage.files import atomic_write_bytes, atomic_write_json
from cocomix.storage.identity import folder_identity
from cocomix.storage.target_reader import TargetReader

log = logging.getLogger(__name__)

TABLE, INFO = "concepts.arrow", "describe.json"
FORMAT, VERSION = "cocomix-concepts", 1
CHUNK_ROWS = 1 << 18  #: rows per step of the pass (bounds the first chunks' merge, where every label is a candidate)
SPLIT_SHIFT = 40  #: a position key is ``split_index << SPLIT_SHIFT | token_position``: stream order


class ConceptStats(NamedTuple):
    """What the pass keeps: label counts and, per latent, its best (score, position key) pairs, best first."""

    frequency_L: np.ndarray
    top1_L: np.ndarray
    score_LN: np.ndarray  #: float32, -inf where a latent has fewer than N labels
    key_LN: np.ndarray  #: int64 position keys, -1 where empty
    rows: int


class TopContexts:
    """Running per-latent counts and top-N (score, position) pairs; ``update`` takes one chunk of rows."""

    def __init__(self, n_latents: int, top_n: int) -> None:
        self.n_latents, self.top_n = n_latents, top_n
        self.frequency = np.zeros(n_latents + 1, dtype=np.int64)  # bin L collects ignore_id slots
        self.top1 = np.zeros(n_latents + 1, dtype=np.int64)
        self.score_LN = np.full((n_latents, top_n), -np.inf, dtype=np.float32)
        self.key_LN = np.full((n_latents, top_n), -1, dtype=np.int64)
        self.threshold = np.full(n_latents + 1, -np.inf, dtype=np.float32)  # N-th best per latent; +inf: never a candidate
        self.threshold[n_latents] = np.inf
        self.rows = 0

    def update(self, ids_RK: np.ndarray, scores_RK: np.ndarray, first_key: int) -> None:
        """Rows whose position keys are ``first_key, first_key + 1, ...``."""
        ids_RK = np.minimum(ids_RK, self.n_latents)  # ignore_id (>= L) -> the unused bin L
        self.frequency += np.bincount(ids_RK.ravel(), minlength=self.n_latents + 1)
        self.top1 += np.bincount(ids_RK[:, 0], minlength=self.n_latents + 1)
        self.rows += len(ids_RK)
        row_M, slot_M = np.nonzero(scores_RK > self.threshold[ids_RK])
        if len(row_M):
            self._merge(ids_RK[row_M, slot_M], scores_RK[row_M, slot_M].astype(np.float32), first_key + row_M)

    def _merge(self, ids_M: np.ndarray, scores_M: np.ndarray, keys_M: np.ndarray) -> None:
        """Merge candidates into the top-N of the latents they touch (one lexsort)."""
        N = self.top_n
        lat_U = np.unique(ids_M)
        all_ids = np.concatenate([np.repeat(lat_U, N), ids_M])
        all_scores = np.concatenate([self.score_LN[lat_U].ravel(), scores_M])
        all_keys = np.concatenate([self.key_LN[lat_U].ravel(), keys_M])
        order = np.lexsort((all_keys, -all_scores, all_ids))  # by latent, best score first, earlier position on ties
        starts_U = np.searchsorted(all_ids[order], lat_U)
        rank = np.arange(len(order)) - np.repeat(starts_U, np.diff(np.append(starts_U, len(order))))
        best = order[rank < N]  # every touched latent has >= N entries (its current N), so N each, in lat_U order
        self.score_LN[lat_U] = all_scores[best].reshape(-1, N)
        self.key_LN[lat_U] = all_keys[best].reshape(-1, N)
        self.threshold[lat_U] = self.score_LN[lat_U, -1]

    def result(self) -> ConceptStats:
        L = self.n_latents
        return ConceptStats(self.frequency[:L].copy(), self.top1[:L].copy(), self.score_LN, self.key_LN, self.rows)


def scan_targets(reader: TargetReader, top_n: int, advance=None, chunk_rows: int = CHUNK_ROWS) -> ConceptStats:
    """One pass over every split of ``reader``; ``advance(rows)`` after each chunk."""
    if reader.n_latents <= 0:
        raise IntegrityError(f"targets {reader.path} do not record their SAE's n_latents; re-run the extract")
    top = TopContexts(reader.n_latents, top_n)
    for split_index, split in enumerate(reader.splits):
        length = reader.split_length(split)
        for start in range(0, length, chunk_rows):
            w = reader.window(split, start, start + chunk_rows)
            top.update(w.concept_ids, w.concept_scores, (split_index << SPLIT_SHIFT) + start)
            if advance is not None:
                advance(len(w.concept_ids))
    return top.result()


# ----------------------------------------------------------------------------- contexts
class Example(NamedTuple):
    """One labelled position: its score, where it is, and its decoded context."""

    score: float
    split: str
    token_position: int
    left: str
    token: str
    right: str


def decode_examples(reader: TargetReader, tokenizer, stats: ConceptStats, context: int) -> list[list[Example]]:
    """Per latent, its kept positions (best first) with ``context`` tokens either side, decoded."""
    lat, rank = np.nonzero(stats.key_LN >= 0)
    keys = stats.key_LN[lat, rank]
    pieces = [_pieces(reader, int(k), context) for k in keys]
    texts = decode_batch(tokenizer, [p for trio in pieces for p in trio])
    out: list[list[Example]] = [[] for _ in range(reader.n_latents)]
    for i, (latent, key) in enumerate(zip(lat, keys)):
        split, pos = reader.splits[int(key) >> SPLIT_SHIFT], int(key) & ((1 << SPLIT_SHIFT) - 1)
        out[latent].append(Example(float(stats.score_LN[latent, rank[i]]), split, pos, *texts[3 * i:3 * i + 3]))
    return out


def decode_batch(tokenizer, seqs: list[list[int]]) -> list[str]:
    """``tokenizer.batch_decode`` through the fast tokenizer's Rust backend when that gives the same
    text (no clean-up of spaces): transformers' per-sequence Python checks cost 5x the decoding."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return tokenizer.batch_decode(seqs)
    return backend.decode_batch(seqs, skip_special_tokens=False)


def _pieces(reader: TargetReader, key: int, context: int) -> tuple[list[int], list[int], list[int]]:
    split, pos = reader.splits[key >> SPLIT_SHIFT], key & ((1 << SPLIT_SHIFT) - 1)
    lo = max(pos - context, 0)
    tokens = reader.window(split, lo, pos + context + 1).tokens.tolist()
    at = pos - lo
    return tokens[:at], tokens[at:at + 1], tokens[at + 1:]


def target_tokenizer(reader: TargetReader, tokens: str | None):
    """The tokenizer of ``--tokens`` (checked against the targets), else of the store the manifest recorded."""
    from cocomix.storage.token_store import TokenStore

    recorded = (reader.meta.get("tokens") or {}).get("path")
    path = tokens or (recorded if recorded and Path(recorded).is_dir() else None)
    if path is None:
        raise CocomixError(f"the token store of targets {reader.path} ({recorded or 'not recorded'}) is not there to decode contexts; pass --tokens STORE")
    store = TokenStore.open(path)
    reader.check_tokens(store.provenance())
    return store.load_tokenizer()


# ----------------------------------------------------------------------------- output
def label_identity(meta: dict) -> dict:
    """What makes two label sets the same (teacher, SAE, layer, selection, token content), without paths."""
    meta = {k: v for k, v in meta.items() if k != "targets_path"}
    return folder_identity({"meta": meta})["meta"]


def table_schema():
    import pyarrow as pa

    example = pa.struct([("score", pa.float32()), ("split", pa.string()), ("token_position", pa.int64()),
                         ("left", pa.string()), ("token", pa.string()), ("right", pa.string())])
    return pa.schema([("latent", pa.uint32()), ("frequency", pa.int64()), ("top1_frequency", pa.int64()),
                      ("examples", pa.list_(example))])


def write_describe(out: Path, reader: TargetReader, stats: ConceptStats, examples: list[list[Example]], cfg: DescribeConfig) -> None:
    """``concepts.arrow`` then ``describe.json`` (last: a folder without it is incomplete), each written atomically."""
    import pyarrow as pa

    table = pa.table({
        "latent": pa.array(np.arange(reader.n_latents, dtype=np.uint32)),
        "frequency": pa.array(stats.frequency_L), "top1_frequency": pa.array(stats.top1_L),
        "examples": pa.array([[e._asdict() for e in ex] for ex in examples], type=table_schema().field("examples").type),
    }, schema=table_schema())
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)
    atomic_write_bytes(out / TABLE, sink.getvalue().to_pybytes())
    atomic_write_json(out / INFO, {
        "format": FORMAT, "version": VERSION, "n_latents": reader.n_latents, "k_attr": reader.k_attr,
        "top_n": cfg.top_n, "context": cfg.context, "rows": stats.rows, "label_slots": int(stats.frequency_L.sum()),
        "targets": {"path": str(Path(reader.path).resolve()), "identity": label_identity(reader.meta),
                    "shards_sha256": [s["sha256"] for s in reader.manifest["shards"]]},
    })


@dataclass
class Dictionary:
    """A describe folder: its info record and per-latent rows (read on demand)."""

    path: Path
    info: dict
    table: object  #: pyarrow.Table

    def n_latents(self) -> int:
        return int(self.info["n_latents"])

    def rows(self, latents: list[int]) -> dict[int, dict]:
        """``{latent: {frequency, top1_frequency, examples}}`` for these latents."""
        return {int(r["latent"]): r for r in self.table.take(np.asarray(sorted(set(latents)), dtype=np.int64)).to_pylist()}

    def check_labels(self, provenance: dict, what: str) -> None:
        """MismatchError when this dictionary was built from other labels than ``provenance`` (a target meta)."""
        if not provenance:
            raise MismatchError(f"{what} records no targets it was trained on, so --describe {self.path} cannot be checked against them; "
                                "pass a checkpoint written by `cocomix pretrain`")
        if label_identity(provenance) != self.info["targets"]["identity"]:
            raise MismatchError(f"--describe {self.path} describes targets {self.info['targets']['path']}, not the ones {what} was trained on "
                                f"({provenance.get('targets_path', 'recorded in its config')}); run `cocomix concepts describe` on those targets")


def load_describe(path: str | Path) -> Dictionary:
    import pyarrow as pa

    path = Path(path)
    info_file = path / INFO
    if not info_file.is_file():
        raise CocomixError(f"{path} is not a `cocomix concepts describe` folder (no {INFO}); run `cocomix concepts describe TARGETS --out {path}`")
    info = json.loads(info_file.read_text())
    if info.get("format") != FORMAT or info.get("version") != VERSION:
        raise IntegrityError(f"{info_file} is not a version-{VERSION} concept dictionary; run `cocomix concepts describe` again")
    try:
        table = pa.ipc.open_file(pa.memory_map(str(path / TABLE), "r")).read_all()
    except (pa.ArrowInvalid, OSError) as err:
        raise IntegrityError(f"{path / TABLE} is unreadable ({err}); run `cocomix concepts describe` again") from None
    if not table.schema.equals(table_schema()) or len(table) != info["n_latents"]:
        raise IntegrityError(f"{path / TABLE} does not hold one row per latent in the expected columns; run `cocomix concepts describe` again")
    return Dictionary(path, info, table)


# ----------------------------------------------------------------------------- command
class DescribeResult(NamedTuple):
    """Where the dictionary went and how fast the pass read."""

    out: Path
    rows: int
    label_slots: int
    labelled_latents: int
    seconds: float


def run_describe(cfg: DescribeConfig) -> DescribeResult:
    reader = TargetReader.open(cfg.targets)
    tokenizer = target_tokenizer(reader, cfg.tokens)
    total = sum(reader.split_length(s) for s in reader.splits)
    t0 = time.monotonic()
    with token_progress(total) as advance:
        stats = scan_targets(reader, cfg.top_n, advance)
    seconds = time.monotonic() - t0
    log.info("decoding %s contexts (%d tokens either side)", f"{int((stats.key_LN >= 0).sum()):,}", cfg.context)
    examples = decode_examples(reader, tokenizer, stats, cfg.context)
    out = Path(cfg.out)
    write_describe(out, reader, stats, examples, cfg)
    result = DescribeResult(out, stats.rows, int(stats.frequency_L.sum()), int((stats.frequency_L > 0).sum()), seconds)
    _print_summary(result, stats)
    return result


@contextmanager
def token_progress(total: int):
    """A progress bar over target rows (tok/s, ETA); yields its advance function."""
    from rich.progress import BarColumn, TextColumn, TimeRemainingColumn

    from cocomix.core.progress import progress_display

    columns = (TextColumn("[bold]describe"), BarColumn(), TextColumn("{task.completed:,.0f}/{task.total:,.0f} tok"),
               TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn())
    t0, done = time.monotonic(), [0]
    with progress_display(*columns, unit="tok", transient=True) as display:
        task = display.add_task("describe", total=total, rate="")

        def advance(n: int) -> None:
            done[0] += n
            display.update(task, advance=n, rate=f"{done[0] / max(time.monotonic() - t0, 1e-9):,.0f} tok/s")

        yield advance


def _print_summary(r: DescribeResult, stats: ConceptStats) -> None:
    from rich.table import Table

    from cocomix.core.logs import console

    top = np.argsort(-stats.frequency_L, kind="stable")[:5]
    table = Table(title=f"concepts describe -> {r.out}", show_header=False, show_edge=False)
    table.add_row("tokens read", f"{r.rows:,} ({r.rows / max(r.seconds, 1e-9):,.0f} tok/s)")
    table.add_row("label slots", f"{r.label_slots:,}")
    table.add_row("latents ever labelled", f"{r.labelled_latents:,} of {len(stats.frequency_L):,}")
    table.add_row("most frequent", ", ".join(f"{int(i)} ({int(stats.frequency_L[i]):,})" for i in top if stats.frequency_L[i]))
    table.add_row("files", f"{r.out / TABLE}, {r.out / INFO}")
    console.print(table)
