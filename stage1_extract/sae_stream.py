"""Teacher activations for ``sae train``, streamed from a token store through a bounded shuffle buffer.

The split is cut into windows of ``window`` tokens, visited in a seeded random order
(a new order every pass); each teacher batch yields ``[B * T, D]`` normalised hidden
states. A mixing buffer of at most ``buffer_tokens`` rows decorrelates neighbouring
tokens: when full it is shuffled, its first half is handed out in batches and the
second half waits for fresh data (as SAELens' activation store does). Memory is bounded
by the buffer plus one teacher batch, however many tokens are trained on.

Shape legend: ``B`` windows, ``T`` tokens per window, ``N`` activations, ``D`` width.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator

import numpy as np
import torch

from cocomix.pipeline.errors import CocomixError
from cocomix.stage1_extract.sae import layernorm_unbiased
from cocomix.stage1_extract.teacher import Teacher, hidden_states_at

log = logging.getLogger(__name__)


def window_starts(n_tokens: int, window: int) -> np.ndarray:
    """Start of every full window (one shorter window when the split is smaller than ``window``)."""
    if n_tokens < 2:
        raise CocomixError(f"the split has {n_tokens} tokens; sae train needs at least 2")
    return np.arange(max(1, n_tokens // window), dtype=np.int64) * window


def window_batches(split, window: int, teacher_batch: int, generator: torch.Generator,
                   passes: int | None = None) -> Iterator[torch.Tensor]:
    """Token windows ``[B, T]`` (int64) in a random order; ``passes=None`` repeats forever."""
    starts = window_starts(len(split), window)
    done = 0
    while passes is None or done < passes:
        order = starts[torch.randperm(len(starts), generator=generator).numpy()]
        for i in range(0, len(order), teacher_batch):
            rows = [split.read(int(s), int(s) + window) for s in order[i:i + teacher_batch]]
            yield torch.from_numpy(np.stack(rows).astype(np.int64))
        done += 1


def normalized_activations(teacher: Teacher, layer: int, windows: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """The SAE's training inputs: unbiased-LayerNorm'd output of block ``layer``, flattened to ``[N, D]``."""
    for ids_BT in windows:
        h_BTD = hidden_states_at(teacher, ids_BT.to(teacher.device), layer)
        x_ND = layernorm_unbiased(h_BTD.float()).x.reshape(-1, h_BTD.shape[-1])
        if not torch.isfinite(x_ND).all():
            raise CocomixError(f"non-finite teacher activations at layer {layer} in a window starting with tokens {ids_BT[0, :8].tolist()}")
        yield x_ND


def shuffled_batches(chunks: Iterator[torch.Tensor], batch: int, buffer_tokens: int,
                     generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Fixed-size ``[batch, D]`` batches drawn from a mixing buffer of at most ``buffer_tokens`` rows."""
    buffer_tokens = max(buffer_tokens, 2 * batch)
    pool: list[torch.Tensor] = []
    held = 0
    for chunk_ND in chunks:
        pool.append(chunk_ND)
        held += len(chunk_ND)
        if held < buffer_tokens:
            continue
        mixed_ND = _shuffle(torch.cat(pool), generator)
        n_out = (len(mixed_ND) - buffer_tokens // 2) // batch * batch
        yield from mixed_ND[:n_out].split(batch)
        pool, held = [mixed_ND[n_out:]], len(mixed_ND) - n_out
    if pool:  # the stream ended (finite passes): hand out what is left, full batches only
        rest_ND = _shuffle(torch.cat(pool), generator)
        yield from rest_ND[: len(rest_ND) // batch * batch].split(batch)


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
