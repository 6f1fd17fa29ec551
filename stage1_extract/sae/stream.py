"""Teacher activations for ``sae train``, streamed from a token store through a bounded shuffle buffer.

The split is cut into windows of ``window`` tokens, visited in a seeded random order
(a new order every pass); each teacher batch yields ``[B * T, D]`` normalised hidden
states. A mixing buffer of at most ``buffer_tokens`` rows decorrelates neighbouring
tokens: when full it is shuffled, its first half is handed out in batches and the
second half waits for fresh data (as SAELens' activation store does). Memory is bounded
by the buffer plus one teacher batch, however many tokens are trained on.

Both iterators keep their position in plain attributes (``state_dict`` / ``load_state_dict``)
so that ``sae train`` can save it and continue exactly where a killed run stopped.

Shape legend: ``B`` windows, ``T`` tokens per window, ``N`` activations, ``D`` width.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from cocomix.core.errors import CocomixError
from cocomix.core.layernorm import layernorm_unbiased
from cocomix.stage1_extract.teacher import Teacher, hidden_states_at

log = logging.getLogger(__name__)


def window_starts(n_tokens: int, window: int) -> np.ndarray:
    """Start of every full window (one shorter window when the split is smaller than ``window``)."""
    if n_tokens < 2:
        raise CocomixError(f"the split has {n_tokens} tokens; sae train needs at least 2")
    return np.arange(max(1, n_tokens // window), dtype=np.int64) * window


def window_batches(split, window: int, teacher_batch: int, generator: torch.Generator,
                   passes: int | None = None) -> "WindowBatches":
    """Token windows ``[B, T]`` (int64) in a random order; ``passes=None`` repeats forever."""
    return WindowBatches(split, window, teacher_batch, generator, passes)


class WindowBatches:
    """Iterator of :func:`window_batches` whose position (``state_dict``) can be saved and restored.

    The order of a pass is drawn from ``generator`` when its first batch is asked for; the
    generator itself is shared with the rest of the run and saved by the caller.
    """

    def __init__(self, split, window: int, teacher_batch: int, generator: torch.Generator,
                 passes: int | None = None) -> None:
        self.split, self.window, self.teacher_batch, self.generator, self.passes = split, window, teacher_batch, generator, passes
        self.starts = window_starts(len(split), window)
        self.order: np.ndarray | None = None  #: window starts of the current pass
        self.pos = 0  #: windows of ``order`` already handed out
        self.done = 0  #: finished passes

    def __iter__(self) -> "WindowBatches":
        return self

    def __next__(self) -> torch.Tensor:
        if self.order is not None and self.pos >= len(self.order):
            self.order, self.done = None, self.done + 1
        if self.order is None:
            if self.passes is not None and self.done >= self.passes:
                raise StopIteration
            self.order, self.pos = self.starts[torch.randperm(len(self.starts), generator=self.generator).numpy()], 0
        starts = self.order[self.pos:self.pos + self.teacher_batch]
        self.pos += len(starts)
        rows = [self.split.read(int(s), int(s) + self.window) for s in starts]
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def state_dict(self) -> dict:
        order = None if self.order is None else torch.from_numpy(self.order.copy())
        return {"order": order, "pos": self.pos, "done": self.done}

    def load_state_dict(self, state: dict) -> None:
        self.order = None if state["order"] is None else state["order"].numpy().astype(np.int64)
        self.pos, self.done = int(state["pos"]), int(state["done"])


def normalized_activations(teacher: Teacher, layer: int, windows: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The SAE's training inputs: unbiased-LayerNorm'd output of block ``layer``, flattened to ``[N, D]``."""
    for ids_BT in windows:
        h_BTD = hidden_states_at(teacher, ids_BT.to(teacher.device), layer)
        x_ND = layernorm_unbiased(h_BTD.float()).x.reshape(-1, h_BTD.shape[-1])
        if not torch.isfinite(x_ND).all():
            raise CocomixError(f"non-finite teacher activations at layer {layer} in a window starting with tokens {ids_BT[0, :8].tolist()}")
        yield x_ND


def shuffled_batches(chunks: Iterator[torch.Tensor], batch: int, buffer_tokens: int,
                     generator: torch.Generator) -> "ShuffledBatches":
    """Fixed-size ``[batch, D]`` batches drawn from a mixing buffer of at most ``buffer_tokens`` rows."""
    return ShuffledBatches(chunks, batch, buffer_tokens, generator)


class ShuffledBatches:
    """Iterator of :func:`shuffled_batches`; ``state_dict`` holds the buffer's rows (the saved position)."""

    def __init__(self, chunks: Iterator[torch.Tensor], batch: int, buffer_tokens: int, generator: torch.Generator) -> None:
        self.chunks, self.batch, self.generator = chunks, batch, generator
        self.buffer_tokens = max(buffer_tokens, 2 * batch)
        self.pool: list[torch.Tensor] = []  #: rows waiting for the next shuffle
        self.held = 0
        self.ready: torch.Tensor | None = None  #: shuffled rows not yet handed out (whole batches)

    def __iter__(self) -> "ShuffledBatches":
        return self

    def __next__(self) -> torch.Tensor:
        if self.ready is None or len(self.ready) == 0:
            self._refill()
        x_ND, self.ready = self.ready[: self.batch], self.ready[self.batch:]
        return x_ND

    def _refill(self) -> None:
        for chunk_ND in self.chunks:
            self.pool.append(chunk_ND)
            self.held += len(chunk_ND)
            if self.held < self.buffer_tokens:
                continue
            mixed_ND = _shuffle(torch.cat(self.pool), self.generator)
            n_out = (len(mixed_ND) - self.buffer_tokens // 2) // self.batch * self.batch
            self.ready, self.pool, self.held = mixed_ND[:n_out], [mixed_ND[n_out:]], len(mixed_ND) - n_out
            return
        if self.pool:  # the stream ended (finite passes): hand out what is left, full batches only
            rest_ND = _shuffle(torch.cat(self.pool), self.generator)
            self.pool, self.held = [], 0
            self.ready = rest_ND[: len(rest_ND) // self.batch * self.batch]
            if len(self.ready):
                return
        raise StopIteration

    def state_dict(self) -> dict:
        """Copies (a saved view would drag its whole base tensor along)."""
        return {"pool": [torch.cat(self.pool)] if self.pool else [], "held": self.held,
                "ready": None if self.ready is None else self.ready.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.pool, self.held, self.ready = list(state["pool"]), int(state["held"]), state["ready"]


def _shuffle(x_ND: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return x_ND[torch.randperm(len(x_ND), generator=generator).to(x_ND.device)]


def collect(chunks: Iterator[torch.Tensor], n_rows: int) -> torch.Tensor:
    """The first ``n_rows`` rows of a finite or infinite stream (fewer if it ends first)."""
    got: list[torch.Tensor] = []
    have = 0
    for chunk_ND in chunks:
        got.append(chunk_ND[: n_rows - have])
        have += len(got[-1])
        if have >= n_rows:
            break
    if not got:
        raise CocomixError("no activations: the token split is empty")
    return torch.cat(got)
