"""Batched fast tokenization, in-process or in ``--num-proc`` worker processes.

Workers receive the tokenizer as its JSON string (no transformers import, no pickling of
Python wrappers) and return one id array per document with EOS appended. At most
``2 * num_proc`` batches are in flight, so memory does not grow with the corpus.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import signal
from collections import deque
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from cocomix.core.errors import CocomixError

log = logging.getLogger(__name__)


class EncodedBatch(NamedTuple):
    """Documents ``first, first + len(ids)`` of the source, each as ids ending with EOS."""

    first: int
    ids: list[np.ndarray]


class Encoder:
    """Tokenizes lists of texts with the Rust tokenizer; no special tokens except the EOS we append."""

    def __init__(self, tokenizer_json: str, eos_id: int, dtype: str) -> None:
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_str(tokenizer_json)
        self.tokenizer.no_padding()
        self.tokenizer.no_truncation()
        self.eos_id = eos_id
        self.dtype = np.dtype(dtype)
        self.max_id = np.iinfo(self.dtype).max

    def __call__(self, texts: list[str]) -> list[np.ndarray]:
        fast = getattr(self.tokenizer, "encode_batch_fast", self.tokenizer.encode_batch)
        encodings = fast(texts, add_special_tokens=False)
        return [self._to_array(e.ids) for e in encodings]

    def _to_array(self, ids: list[int]) -> np.ndarray:
        arr = np.empty(len(ids) + 1, dtype=np.int64)
        arr[:-1] = ids
        arr[-1] = self.eos_id
        if len(arr) and arr.max() > self.max_id:
            raise CocomixError(f"token id {int(arr.max())} does not fit {self.dtype.name}; the tokenizer's vocabulary is larger than it reports")
        return arr.astype(self.dtype)


_worker: Encoder | None = None


def _init_worker(tokenizer_json: str, eos_id: int, dtype: str) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's: it commits, then stops the pool
    _worker = Encoder(tokenizer_json, eos_id, dtype)


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    assert _worker is not None
    return _worker(texts)


def encode_stream(batches: Iterable[tuple[int, list[str]]], encoder_args: tuple[str, int, str], num_proc: int) -> Iterator[EncodedBatch]:
    """Encode ``(first_doc_index, texts)`` batches in order."""
    if num_proc <= 1:
        encoder = Encoder(*encoder_args)
        for first, texts in batches:
            yield EncodedBatch(first, encoder(texts))
        return
    ctx = mp.get_context("spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=encoder_args) as pool:
        pending: deque = deque()
        for first, texts in batches:
            pending.append((first, pool.apply_async(_encode_in_worker, (texts,))))
            if len(pending) >= 2 * num_proc:
                head, job = pending.popleft()
                yield EncodedBatch(head, job.get())
        while pending:
            head, job = pending.popleft()
            yield EncodedBatch(head, job.get())


def batched(docs: Iterator[str], size: int, first: int, limit: int | None) -> Iterator[tuple[int, list[str]]]:
    """``(index of the first document, texts)`` batches of ``size``, stopping after ``limit`` documents."""
    taken = 0
    while limit is None or taken < limit:
        want = size if limit is None else min(size, limit - taken)
        texts = [text for _, text in zip(range(want), docs)]
        if not texts:
            return
        yield first + taken, texts
        taken += len(texts)
