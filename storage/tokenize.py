"""``cocomix tokenize``: corpus -> Zarr token store (docs/ARCHITECTURE.md, formats), resumable.

Table of contents of :func:`run_tokenize`: resolve the corpus -> decide (fresh / resume /
no-op / refuse) -> tokenizer (load or train) -> stream batches through the tokenizer ->
append to the store, committing progress every few seconds -> mark complete -> summary.

Split rules (``--split-rule``), both pure functions of the document index, so a resumed run
assigns every document exactly as an uninterrupted one would:

- ``hash``: document ``i`` goes to ``val`` when ``splitmix64(i ^ splitmix64(seed)) / 2**64 <
  val_fraction`` (streams; needs no document count).
- ``nanogpt`` (the default for ``--corpus openwebtext``): the official pipeline's split, nanoGPT's
  ``prepare.py`` calling ``datasets``' ``train_test_split(test_size=0.0005, seed=2357, shuffle=True)``:
  val = the first ``ceil(val_fraction * n_docs)`` indices of ``np.random.default_rng(seed).permutation(n_docs)``,
  so validation perplexity is measured on the paper's documents (kept in corpus order here).
"""
from __future__ import annotations

import logging
import math
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from cocomix.core.errors import CocomixError, MismatchError
from cocomix.core.workspace import tokens_dir, workspace_root
from cocomix.storage import bpe
from cocomix.storage.config import TokenizeConfig
from cocomix.storage.corpus import Corpus, resolve_corpus
from cocomix.storage.encode import batched, encode_stream
from cocomix.storage.identity import content_identity, describe_diff
from cocomix.storage.progress_ui import TokenizeProgress, print_summary
from cocomix.storage.store_writer import PROGRESS, StoreWriter, clear_folder
from cocomix.storage.token_store import FORMAT, SCHEMA_VERSION, TOKENIZER_DIR, token_dtype, tokenizer_fingerprint

log = logging.getLogger(__name__)

COMMIT_SECONDS = 30.0
SPLIT_RULE = "val if splitmix64(doc_index ^ splitmix64(seed)) / 2**64 < val_fraction"
NANOGPT_RULE = ("val = np.random.default_rng(seed).permutation(n_docs)[:ceil(val_fraction * n_docs)] "
                "(datasets train_test_split(test_size=val_fraction, seed=seed, shuffle=True), as nanoGPT's prepare.py)")
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


@dataclass
class TokenizeResult:
    """What a tokenize run produced (or found already finished)."""

    path: Path
    counts: dict[str, dict[str, int]]   # split -> {"n_tokens", "n_docs"}
    vocab_size: int
    already_complete: bool = False      # the store was finished before this run: nothing was done
    resumed_after_docs: int = 0         # documents a previous, interrupted run had committed
    replaced_bytes: int = 0             # bytes that were not UTF-8, replaced by U+FFFD
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, vectorised over uint64 (wrapping arithmetic)."""
    z = (x.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)) & _M64
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def val_mask(doc_index: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """True where document ``doc_index`` belongs to the ``val`` split."""
    key = splitmix64(np.array([seed], dtype=np.uint64))[0]
    u = splitmix64(np.asarray(doc_index, dtype=np.uint64) ^ key) >> np.uint64(11)
    return u.astype(np.float64) / float(1 << 53) < val_fraction


class ValSplit:
    """Which documents go to ``val`` under ``cfg.split_rule`` (see the module docstring)."""

    def __init__(self, cfg: TokenizeConfig, corpus: Corpus):
        self.cfg, self.is_val = cfg, None
        if cfg.split_rule == "nanogpt":
            n = corpus.n_docs if corpus.n_docs is not None else _count_documents(corpus)
            self.n_docs = n
            self.is_val = np.zeros(n, dtype=bool)
            self.is_val[np.random.default_rng(cfg.seed).permutation(n)[:math.ceil(cfg.val_fraction * n)]] = True

    def mask(self, doc_index: np.ndarray) -> np.ndarray:
        if self.is_val is None:
            return val_mask(doc_index, self.cfg.val_fraction, self.cfg.seed)
        if len(doc_index) and doc_index[-1] >= len(self.is_val):
            raise CocomixError(f"corpus {self.cfg.corpus} holds more than the {len(self.is_val)} documents it was counted "
                               "with (it changed while tokenizing?); re-run with --overwrite")
        return self.is_val[doc_index]

    def record(self) -> dict:
        """The rule as the store's attributes record it."""
        if self.is_val is None:
            return {"rule": SPLIT_RULE, "val_fraction": self.cfg.val_fraction, "seed": self.cfg.seed}
        return {"rule": NANOGPT_RULE, "name": "nanogpt", "val_fraction": self.cfg.val_fraction, "seed": self.cfg.seed,
                "n_docs": self.n_docs}


def _count_documents(corpus: Corpus) -> int:
    log.info("counting the documents of %s (the nanogpt split permutes all of them)", corpus.source)
    return sum(1 for _ in corpus.documents())


def run_tokenize(cfg: TokenizeConfig) -> TokenizeResult:
    t0 = time.monotonic()
    out = Path(cfg.out) if cfg.out else tokens_dir(workspace_root(cfg.workspace), cfg.corpus)
    corpus = resolve_corpus(cfg.corpus, cfg.text_field)
    corpus.probe()
    identity = _identity(cfg, corpus)
    attrs = _existing_attrs(out)
    same = attrs is not None and _same_identity(attrs.get("identity"), identity)
    if same and attrs.get("complete"):
        log.info("token store %s is already complete; nothing to do", out)
        return TokenizeResult(out, attrs["counts"], attrs["vocab_size"], already_complete=True)
    if attrs is not None and not same:
        _refuse_or_clear(out, attrs, identity, cfg.overwrite)
        attrs = None
    split = ValSplit(cfg, corpus)
    writer, tok = _resume(out) if attrs is not None else (None, None)
    created = writer is None
    if created:
        writer, tok = _create(cfg, corpus, out, identity, split)
    resumed = writer.docs_done
    corpus.stats.replaced_bytes = int(writer.notes.get("replaced_bytes", 0))
    corpus.stats.bad_docs = int(writer.notes.get("bad_utf8_docs", 0))
    try:
        _tokenize_all(cfg, corpus, writer, tok, split)
    except CocomixError:
        if created:  # a record the corpus must fix: the store this run started is removed, the retry starts clean
            clear_folder(writer.path)
        raise
    counts = _finish(writer, corpus, cfg)
    result = TokenizeResult(out, counts, len(tok), resumed_after_docs=resumed,
                            replaced_bytes=corpus.stats.replaced_bytes, seconds=time.monotonic() - t0)
    print_summary(result, corpus.stats)
    return result


def _identity(cfg: TokenizeConfig, corpus: Corpus) -> dict:
    """What must match for a re-run to continue an existing store."""
    if cfg.train_tokenizer is not None:
        tokenizer = {"train_bpe": cfg.train_tokenizer}
    else:
        spec = cfg.tokenizer or bpe.DEFAULT_TOKENIZER
        tokenizer = {"name": spec, "sha256": tokenizer_fingerprint(bpe.load_tokenizer(spec))}
    return {
        "corpus": {"source": cfg.corpus, "fingerprint": corpus.fingerprint(), "text_field": cfg.text_field},
        "tokenizer": tokenizer,
        "split": {"val_fraction": cfg.val_fraction, "seed": cfg.seed,
                  **({"rule": cfg.split_rule} if cfg.split_rule != "hash" else {})},  # hash stores predate the key
        "max_docs": cfg.max_docs,
    }


def _same_identity(old: dict | None, new: dict) -> bool:
    return content_identity(old) == content_identity(new)


def _existing_attrs(out: Path) -> dict | None:
    """Attributes of a store at ``out``; None for a missing or empty folder."""
    from cocomix.storage.token_store import read_store_attrs

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return None
    if not (out / "zarr.json").is_file():
        raise CocomixError(f"output folder {out} exists and is not a token store; choose another --out (it is never deleted)")
    return read_store_attrs(out)


def _refuse_or_clear(out: Path, attrs: dict, identity: dict, overwrite: bool) -> None:
    old = attrs.get("identity") or {}
    ours, theirs = content_identity(old), content_identity(identity)  # equal content under other paths is no change
    keys = [k for k in identity if ours.get(k) != theirs.get(k)] or list(identity)
    differs = describe_diff({k: old.get(k) for k in keys}, {k: identity.get(k) for k in keys}) or "other settings"
    if not overwrite:
        raise MismatchError(f"{out} holds a token store made with other settings ({differs}); "
                            "pass --overwrite to replace it or choose another --out")
    log.warning("--overwrite: replacing %s (%s)", out, differs)
    clear_folder(out)


def _resume(out: Path) -> tuple[StoreWriter | None, object]:
    """Continue an unfinished store; (None, None) when nothing was committed yet (start over)."""
    if not (out / PROGRESS).is_file() or not (out / TOKENIZER_DIR / "tokenizer.json").is_file():
        clear_folder(out)
        return None, None
    return StoreWriter.resume(out), bpe.load_tokenizer(str(out / TOKENIZER_DIR))


def _create(cfg: TokenizeConfig, corpus: Corpus, out: Path, identity: dict, split: ValSplit) -> tuple[StoreWriter, object]:
    if cfg.train_tokenizer is not None:
        docs = corpus.documents()
        if cfg.max_docs is not None:
            docs = (text for _, text in zip(range(cfg.max_docs), docs))
        tok = bpe.train_bpe(docs, cfg.train_tokenizer)
        name = f"byte-level BPE trained on {cfg.corpus}"
    else:
        tok = bpe.load_tokenizer(cfg.tokenizer or bpe.DEFAULT_TOKENIZER)
        name = cfg.tokenizer or bpe.DEFAULT_TOKENIZER
    dtype = token_dtype(len(tok))
    writer = StoreWriter.create(out, _attrs(cfg, corpus, identity, tok, name, dtype, split), dtype, cfg.chunk_tokens, cfg.shard_tokens)
    bpe.save_tokenizer(tok, out / TOKENIZER_DIR)
    return writer, tok


def _attrs(cfg: TokenizeConfig, corpus: Corpus, identity: dict, tok, name: str, dtype: np.dtype, split: ValSplit) -> dict:
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "identity": identity,
        "tokenizer": {"name": name, "sha256": tokenizer_fingerprint(tok), "path": TOKENIZER_DIR},
        "eos_id": int(tok.eos_token_id),
        "vocab_size": len(tok),
        "dtype": dtype.name,
        "corpus": {"source": cfg.corpus, "kind": corpus.kind, "hub_name": corpus.hub_name,
                   "fingerprint": identity["corpus"]["fingerprint"], "text_field": cfg.text_field},
        "split": split.record(),
        "chunk_tokens": cfg.chunk_tokens,
        "shard_tokens": cfg.shard_tokens,
        "counts": {},
    }


def _tokenize_all(cfg: TokenizeConfig, corpus: Corpus, writer: StoreWriter, tok, split: ValSplit) -> None:
    """Stream every remaining document into the store, committing every COMMIT_SECONDS."""
    start = writer.docs_done
    limit = None if cfg.max_docs is None else max(cfg.max_docs - start, 0)
    total = corpus.n_docs if cfg.max_docs is None else min(cfg.max_docs, corpus.n_docs or cfg.max_docs)
    encoder_args = (tok.backend_tokenizer.to_str(), int(tok.eos_token_id), token_dtype(len(tok)).name)
    batches = batched(corpus.documents(skip=start), cfg.batch_size, start, limit)
    last_commit = time.monotonic()
    with TokenizeProgress(total, start) as bar, deferred_interrupt() as interrupted:
        for batch in encode_stream(batches, encoder_args, cfg.num_proc):
            is_val = split.mask(np.arange(batch.first, batch.first + len(batch.ids)))
            for ids, val in zip(batch.ids, is_val):
                writer.add("val" if val else "train", ids)
            writer.documents_consumed(len(batch.ids))
            writer.flush()
            stop = interrupted()  # read once: a signal arriving later is handled after the next batch
            if stop or time.monotonic() - last_commit >= COMMIT_SECONDS:
                writer.notes.update(replaced_bytes=corpus.stats.replaced_bytes, bad_utf8_docs=corpus.stats.bad_docs)
                writer.commit()
                last_commit = time.monotonic()
            bar.advance(len(batch.ids), sum(len(ids) for ids in batch.ids))
            if stop:
                raise KeyboardInterrupt  # after committing this batch: a re-run continues from here


@contextmanager
def deferred_interrupt():
    """Ctrl-C (SIGINT) sets a flag the loop checks between batches, so the work done is committed
    first; a second Ctrl-C interrupts at once. Yields the flag's getter (no-op off the main thread)."""
    hit = [False]
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return

    def on_sigint(signum, frame):
        hit[0] = True
        signal.signal(signal.SIGINT, previous)
        log.warning("interrupted: committing the documents tokenized so far (Ctrl-C again to stop at once)")

    previous = signal.signal(signal.SIGINT, on_sigint) or signal.default_int_handler
    try:
        yield lambda: hit[0]
    finally:
        signal.signal(signal.SIGINT, previous)


def _finish(writer: StoreWriter, corpus: Corpus, cfg: TokenizeConfig) -> dict:
    if writer.docs_done == 0:
        clear_folder(writer.path)
        raise CocomixError(f"corpus {cfg.corpus} holds no documents; pass a non-empty corpus")
    tokens = sum(b.n_tokens + b.n_buffered for b in writer.buffers.values())
    if tokens <= writer.docs_done:  # every document is its EOS alone: nothing to learn from
        clear_folder(writer.path)
        raise CocomixError(f"all {writer.docs_done} documents of corpus {cfg.corpus} are empty (no text to tokenize; "
                           f"wrong --text-field?); nothing was written")
    if corpus.stats.replaced_bytes:
        log.warning("%d bytes that are not UTF-8 were replaced by U+FFFD in %d documents of %s",
                    corpus.stats.replaced_bytes, corpus.stats.bad_docs, cfg.corpus)
    extra = {"docs_total": writer.docs_done, "replaced_bytes": corpus.stats.replaced_bytes, "bad_utf8_docs": corpus.stats.bad_docs}
    return writer.finish(extra)
