"""Training and validation windows for stage 2, read from the token store and the target shards.

Training order follows the official loader (``projects/cocomix/data/data.py``): an epoch
cuts the train split into windows of ``context`` tokens starting at a random offset
``r`` in ``[0, T]`` (window i covers ``[i*T + r, (i+1)*T + r)``) and visits them in a
shuffled order. Unlike the official loader, which draws a fresh ``random.randint`` per
window inside unseeded workers, here ``r`` and the permutation are pure functions of
``(seed, epoch)``, so the whole order is reproducible and a checkpoint only needs the
small :class:`DataState` (epoch, position in that epoch's permutation) to continue exactly.

Sharding: every optimizer step consumes one *global batch* of ``micro * accum * world``
windows, the next slice of the global order. Rank ``r`` takes every ``world``-th window
of it; its j-th micro-batch is the j-th run of ``micro`` of those. The union of the
ranks' j-th micro-batches is therefore the j-th micro-batch of a 1-process run with
``micro * world`` windows per micro-batch, so a run's data does not depend on how many
processes share it.

Legend: B windows in a micro-batch, T tokens per window, K labels per token.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch

from cocomix.pipeline.errors import CocomixError

log = logging.getLogger(__name__)


@dataclass
class DataState:
    """Where the training stream stands: ``position`` windows of epoch ``epoch`` are consumed."""

    epoch: int = 0
    position: int = 0
    offset: int = 0  # the epoch's start offset, recorded for humans; recomputed from the seed

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataState":
        return cls(epoch=int(d["epoch"]), position=int(d["position"]), offset=int(d.get("offset", 0)))


class MicroBatch(NamedTuple):
    """One forward pass of one rank: ``input_ids`` [B, T] int64, ``concept_ids`` [B, T, K] int64 or None."""

    input_ids: torch.Tensor
    concept_ids: torch.Tensor | None


class StepBatch(NamedTuple):
    """Everything one rank needs for one optimizer step, and the data state after it."""

    micro_batches: list[MicroBatch]
    state: DataState


class WindowOrder:
    """The seeded global order of training windows: pure index arithmetic, no I/O."""

    def __init__(self, n_tokens: int, context: int, seed: int):
        if n_tokens < context:
            raise CocomixError(
                f"the train split holds {n_tokens} tokens, fewer than one window of {context}; "
                "use a bigger corpus (--tokens) or a smaller --size"
            )
        self.n_tokens, self.context, self.seed = n_tokens, context, seed

    def offset(self, epoch: int) -> int:
        """The epoch's random start in [0, T], capped so that at least one window fits."""
        r = int(np.random.default_rng([self.seed, epoch, 0]).integers(0, self.context + 1))
        return min(r, self.n_tokens - self.context)

    def starts(self, epoch: int) -> np.ndarray:
        """Start token of every window of ``epoch``, in visiting order (int64)."""
        r = self.offset(epoch)
        n_windows = (self.n_tokens - r) // self.context
        perm = np.random.default_rng([self.seed, epoch, 1]).permutation(n_windows)
        return r + perm.astype(np.int64) * self.context

    def take(self, state: DataState, n: int) -> tuple[np.ndarray, DataState]:
        """The next ``n`` window starts after ``state`` (crossing into later epochs), and the new state."""
        out, epoch, pos = [], state.epoch, state.position
        while n > 0:
            starts = self.starts(epoch)
            chunk = starts[pos:pos + n]
            out.append(chunk)
            n -= len(chunk)
            pos += len(chunk)
            if pos >= len(starts):
                epoch, pos = epoch + 1, 0
        return np.concatenate(out), DataState(epoch, pos, self.offset(epoch))


def rank_slices(global_starts: np.ndarray, micro: int, world: int, rank: int) -> list[np.ndarray]:
    """Rank ``rank``'s micro-batches of one global batch: every ``world``-th window, in runs of ``micro``."""
    mine = global_starts[rank::world]
    assert len(mine) % micro == 0, (len(mine), micro)
    return [mine[j:j + micro] for j in range(0, len(mine), micro)]


class TokenSource:
    """Windows of tokens from one split of a :class:`~cocomix.storage.token_store.TokenStore`."""

    def __init__(self, store, split: str):
        self.split = store.split(split)
        self.n_tokens = len(self.split)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        return self.split.read(start, stop), None


TRAINING_COLUMNS = ("token", "concept_ids")  #: what training reads of the shards (block-checked before use)


class TargetSource:
    """Windows of tokens and concept labels from the target shards (tokens from the ``token`` column)."""

    def __init__(self, reader, split: str, store_split=None):
        self.reader, self.split_name = reader, split
        self.n_tokens = reader.split_length(split)
        self.store_split = store_split  # read tokens from the store instead (see bench/pretrain.py)

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        w = self.reader.window(self.split_name, start, stop, check=TRAINING_COLUMNS)
        tokens = self.store_split.read(start, stop) if self.store_split is not None else w.tokens
        return tokens, w.concept_ids


def collate(source, starts: np.ndarray, context: int) -> MicroBatch:
    """Read and stack the windows starting at ``starts`` into int64 tensors (ignore ids kept as they are)."""
    toks, ids = [], []
    for s in starts.tolist():
        t, c = source.read(s, s + context)
        toks.append(t)
        ids.append(c)
    input_ids_BT = torch.from_numpy(np.stack(toks).astype(np.int64))
    concept_ids_BTK = None if ids[0] is None else torch.from_numpy(np.stack(ids).astype(np.int64))
    return MicroBatch(input_ids_BT, concept_ids_BTK)


class TrainStream:
    """This rank's step batches, continuing from a :class:`DataState` (so a resumed run sees the same data)."""

    def __init__(self, source, *, context: int, micro: int, accum: int, world: int, rank: int, seed: int):
        self.source, self.context = source, context
        self.micro, self.accum, self.world, self.rank = micro, accum, world, rank
        self.order = WindowOrder(source.n_tokens, context, seed)

    @property
    def global_windows(self) -> int:
        return self.micro * self.accum * self.world

    def next_step(self, state: DataState) -> StepBatch:
        starts, new_state = self.order.take(state, self.global_windows)
        slices = rank_slices(starts, self.micro, self.world, self.rank)
        return StepBatch([collate(self.source, s, self.context) for s in slices], new_state)

    def steps(self, state: DataState) -> Iterator[StepBatch]:
        while True:
            batch = self.next_step(state)
            state = batch.state
            yield batch


def val_starts(n_tokens: int, window: int, max_windows: int | None = None) -> list[tuple[int, int]]:
    """Non-overlapping ``(start, stop)`` windows covering the split; the last one may be shorter.

    A short tail (>= 2 tokens, so it predicts something) is kept: perplexity is a
    token-weighted mean, so it counts exactly as much as its tokens.
    """
    spans = [(s, min(s + window, n_tokens)) for s in range(0, n_tokens, window)]
    spans = [(a, b) for a, b in spans if b - a >= 2]
    return spans[:max_windows] if max_windows is not None else spans
