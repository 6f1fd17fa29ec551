"""Training and validation windows for stage 2, read from the token store and the target shards.

An epoch cuts the train split into windows of ``context`` tokens starting at an offset ``r``
(window i covers ``[i*T + r, (i+1)*T + r)``) and visits them in a shuffled order, as the
official loader (``projects/cocomix/data/data.py``) does. Where ``r`` comes from:

- ``aligned`` (the default with target shards): ``r`` is one of the offsets the target folder
  has a label set for (``extract --offsets N``), a new one each epoch (a seeded permutation of
  the set per N epochs), and the labels come from set ``r``, which stage 1 computed on exactly
  these windows. A label depends on its whole window (the gradient of the window's mean loss,
  the teacher's context starting at the window start), so this is the only way the student
  sees the labels the official code computes online. With one set, windows are unshifted.
- ``free`` (the ablation ``--label-windows free``, and NTP runs without targets): ``r`` is drawn
  in ``[0, T]`` each epoch, as the official loader's shift, and labels are read from set 0 at the
  shifted positions, i.e. computed on other window boundaries than the student's.

Unlike the official loader, which draws a fresh ``random.randint`` per window inside unseeded
workers, ``r`` and the permutation are pure functions of ``(seed, epoch)``, so the whole order
is reproducible and a checkpoint only needs the small :class:`DataState` (epoch, position in
that epoch's permutation, the epoch's offset) to continue exactly.

Sharding: every optimizer step consumes one *global batch* of ``micro * accum * world``
windows, the next slice of the global order. Rank ``r`` takes every ``world``-th window
of it; its j-th micro-batch is the j-th run of ``micro`` of those. The union of the
ranks' j-th micro-batches is therefore the j-th micro-batch of a 1-process run with
``micro * world`` windows per micro-batch, so a run's data does not depend on how many
processes share it.

Columns: a :class:`TargetSource` reads the target columns a method asks for (``concept_ids``,
and the optional ``kd_ids`` / ``hidden``) beside the tokens; :func:`collate` stacks whatever
columns a source returns, by name, so a new column needs no change here.

Legend: B windows in a micro-batch, T tokens per window, K labels per token.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Iterator, NamedTuple

import numpy as np
import torch

from cocomix.core.errors import CocomixError
from cocomix.storage import block_ahead

log = logging.getLogger(__name__)


@dataclass
class DataState:
    """Where the training stream stands: ``position`` windows of epoch ``epoch`` are consumed."""

    epoch: int = 0
    position: int = 0
    offset: int = 0  # the epoch's window offset (its label set when aligned); recomputed from the seed, checked on resume

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DataState":
        return cls(epoch=int(d["epoch"]), position=int(d["position"]), offset=int(d.get("offset", 0)))


class MicroBatch(NamedTuple):
    """One forward pass of one rank: ``input_ids`` [B, T] int64, ``concept_ids`` [B, T, K] int64 or None,
    and the other target columns read (``kd_ids`` [B, T, S] int64, ``hidden`` [B, T, d] float16) by name."""

    input_ids: torch.Tensor
    concept_ids: torch.Tensor | None
    extra: dict = {}  # never mutated: the shared default is safe


class StepBatch(NamedTuple):
    """Everything one rank needs for one optimizer step, and the data state after it."""

    micro_batches: list[MicroBatch]
    state: DataState


class WindowOrder:
    """The seeded global order of training windows: pure index arithmetic, no I/O.

    ``offsets``: the label sets' offsets (aligned); None draws the offset freely in [0, T].
    """

    def __init__(self, n_tokens: int, context: int, seed: int, offsets: list[int] | None = None):
        if n_tokens < context:
            raise CocomixError(
                f"the train split holds {n_tokens} tokens, fewer than one window of {context}; "
                "use a bigger corpus (--tokens) or a smaller --size"
            )
        self.n_tokens, self.context, self.seed = n_tokens, context, seed
        self.offsets = None if offsets is None else [int(r) for r in offsets]
        self._starts: OrderedDict[int, np.ndarray] = OrderedDict()  # the last epochs' orders: a 9B-token permutation is ~0.1 s
        self._offset: dict[int, int] = {}  # epoch -> offset (a generator per lookup would cost ~30 us a step)
        if self.offsets is not None and (not self.offsets or max(self.offsets) + context > n_tokens):
            raise CocomixError(f"window offsets {self.offsets} leave no full window of {context} tokens in a split of {n_tokens}")

    def offset(self, epoch: int) -> int:
        """The epoch's offset: from the label sets (a seeded permutation per len(offsets) epochs,
        so consecutive epochs get new ones), or free in [0, T] capped so that one window fits."""
        if epoch in self._offset:
            return self._offset[epoch]
        if len(self._offset) > 64:
            self._offset.clear()
        self._offset[epoch] = r = self._draw_offset(epoch)
        return r

    def _draw_offset(self, epoch: int) -> int:
        if self.offsets is not None:
            cycle, k = divmod(epoch, len(self.offsets))
            perm = np.random.default_rng([self.seed, cycle, 2]).permutation(len(self.offsets))
            return self.offsets[int(perm[k])]
        r = int(np.random.default_rng([self.seed, epoch, 0]).integers(0, self.context + 1))
        return min(r, self.n_tokens - self.context)

    def starts(self, epoch: int) -> np.ndarray:
        """Start token of every window of ``epoch``, in visiting order (int64; read-only, cached)."""
        if epoch in self._starts:
            return self._starts[epoch]
        r = self.offset(epoch)
        n_windows = (self.n_tokens - r) // self.context
        perm = np.random.default_rng([self.seed, epoch, 1]).permutation(n_windows)
        starts = r + perm.astype(np.int64) * self.context
        starts.flags.writeable = False
        self._starts[epoch] = starts
        if len(self._starts) > 3:
            self._starts.popitem(last=False)
        return starts

    def take(self, state: DataState, n: int) -> tuple[np.ndarray, DataState]:
        """The next ``n`` window starts after ``state`` (crossing into later epochs), and the new state."""
        if state.position and state.offset != self.offset(state.epoch):
            raise CocomixError(f"the data state says epoch {state.epoch} has window offset {state.offset}, but this run's "
                               f"windows give {self.offset(state.epoch)}: resume with the --targets and --label-windows it started with")
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

    def read(self, start: int, stop: int) -> tuple[np.ndarray, dict]:
        return self.split.read(start, stop), {}


class TargetSource:
    """Windows of tokens and target columns from the target shards (tokens from the ``token`` column).

    ``columns``: which target columns to read (``concept_ids``, ``kd_ids``, ``hidden``).
    ``aligned``: a window starting at ``s`` reads the label set of offset ``s mod T`` (T = the
    extraction window), computed on exactly that window; otherwise set 0 at the same positions.
    """

    def __init__(self, reader, split: str, store_split=None, columns: tuple[str, ...] = ("concept_ids",), *,
                 aligned: bool = True):
        self.reader, self.split_name, self.columns, self.aligned = reader, split, tuple(columns), aligned
        self.n_tokens = reader.split_length(split)
        self.store_split = store_split  # read tokens from the store instead (see bench/pretrain.py)
        self.checked = ("token", *self.columns)  #: what training reads: its blocks are CRC32C-checked first

    def label_set(self, start: int) -> int:
        if not self.aligned:
            return 0
        r = start % self.reader.window_length
        if r not in self.reader.offsets:
            raise CocomixError(f"a window starts at token {start}, offset {r}, which {self.reader.path} has no labels for "
                               f"(offsets {self.reader.offsets}); this is a cocomix bug")
        return r

    def check_ahead(self, starts: np.ndarray, context: int) -> bool:
        """Hand the windows this rank reads next to the reader's check-ahead helper (per label set);
        False when the reader has none for this split."""
        if not self.reader.can_check_ahead(self.split_name, self.checked):
            return False
        sets = starts % self.reader.window_length if self.aligned and self.reader.window_length else np.zeros_like(starts)
        values, first = np.unique(sets, return_index=True)
        return all([self.reader.check_ahead(self.split_name, self.checked, starts[sets == r], context, int(r))
                    for r in values[np.argsort(first)]])

    def ahead_verified(self, start: int) -> bool:
        """Whether every block of the label set a window starting at ``start`` reads is verified already."""
        return self.reader.ahead_verified(self.split_name, self.label_set(start))

    def read(self, start: int, stop: int) -> tuple[np.ndarray, dict]:
        w = self.reader.window(self.split_name, start, stop, offset=self.label_set(start),
                               check=self.checked)
        tokens = self.store_split.read(start, stop) if self.store_split is not None else w.tokens
        return tokens, {name: w.concept_ids if name == "concept_ids" else w.extra[name] for name in self.columns}


def as_tensor(stacked: np.ndarray) -> torch.Tensor:
    """Ids become int64 (ignore ids kept as they are); floats keep their dtype."""
    return torch.from_numpy(stacked.astype(np.int64) if stacked.dtype.kind in "iu" else stacked)


def collate(source, starts: np.ndarray, context: int) -> MicroBatch:
    """Read and stack the windows starting at ``starts`` into tensors, every column by name."""
    toks, columns = [], []
    for s in starts.tolist():
        t, cols = source.read(s, s + context)
        toks.append(t)
        columns.append(cols)
    stacked = {name: as_tensor(np.stack([c[name] for c in columns])) for name in columns[0]}
    input_ids_BT = torch.from_numpy(np.stack(toks).astype(np.int64))
    return MicroBatch(input_ids_BT, stacked.pop("concept_ids", None), stacked)


class TrainStream:
    """This rank's step batches, continuing from a :class:`DataState` (so a resumed run sees the same data)."""

    def __init__(self, source, *, context: int, micro: int, accum: int, world: int, rank: int, seed: int,
                 offsets: list[int] | None = None):
        self.source, self.context = source, context
        self.micro, self.accum, self.world, self.rank = micro, accum, world, rank
        self.order = WindowOrder(source.n_tokens, context, seed, offsets)
        self._check_ahead = getattr(source, "check_ahead", None)  # a helper verifying blocks before we read them
        self._ahead: DataState | None = None  # where the windows handed to it end ...
        self._ahead_left = 0  # ... and how many global windows that is beyond the next step
        self._ahead_chunk = 0  # windows handed on last time (the next chunk goes when half of it is left)
        self._expected: DataState | None = None

    @property
    def global_windows(self) -> int:
        return self.micro * self.accum * self.world

    def next_step(self, state: DataState) -> StepBatch:
        if self._check_ahead is not None:
            self._feed_ahead(state)
        starts, new_state = self.order.take(state, self.global_windows)
        slices = rank_slices(starts, self.micro, self.world, self.rank)
        self._expected = new_state
        return StepBatch([collate(self.source, s, self.context) for s in slices], new_state)

    def prepare(self, state: DataState) -> None:
        """Hand the check-ahead helper the first windows from ``state`` now, so that the time until the
        first :meth:`next_step` (building the model, loading a checkpoint) is its head start."""
        if self._check_ahead is not None:
            self._feed_ahead(state)
            self._expected = state  # next_step(state) then continues this chunk instead of starting over

    def _feed_ahead(self, state: DataState) -> None:
        """Keep the check-ahead helper about CHUNK_WINDOWS windows ahead of this rank's reads: when half
        of what it was handed is read, hand it the next chunk (skipping epochs whose label set it has
        verified whole)."""
        if state is not self._expected and state != self._expected:  # the first step, or a jump: start over from here
            self._ahead, self._ahead_left, self._ahead_chunk = state, 0, 0
        else:
            self._ahead_left -= self.global_windows
        while self._check_ahead is not None and self._ahead_left <= self._ahead_chunk // 2:
            at = self._ahead
            r = self.order.offset(at.epoch)
            epoch_windows = (self.order.n_tokens - r) // self.context
            if self.source.ahead_verified(r):  # nothing of this epoch to hand on
                self._ahead_left += epoch_windows - at.position
                self._ahead = DataState(at.epoch + 1, 0, self.order.offset(at.epoch + 1))
                continue
            g = self.global_windows
            n = max(1, -(-min(block_ahead.CHUNK_WINDOWS, epoch_windows) // g)) * g  # about an epoch at most (small splits)
            starts, self._ahead = self.order.take(at, n)
            self._ahead_left, self._ahead_chunk = self._ahead_left + n, n
            if not self._check_ahead(starts[self.rank::self.world], self.context):
                self._check_ahead = None  # no helper for this source: nothing more to hand on

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
