"""Labels for one target shard: cut it into windows, batch them, run the attribution.

A shard covers tokens ``[start, end)`` of a split, a whole number of windows except at
the end of the split, where the last window is shorter. Windows are batched in order,
``batch_size`` at a time, and a shorter window always gets a batch of its own, so the
batches (and hence every byte written) depend only on the shard and the config, never
on which process or rank computes it.

KD samples are drawn with uniforms keyed by the split and each window's first token
(:mod:`.kd_samples`), so they too depend only on the position.

Shape legend: ``B`` windows, ``T`` tokens, ``K`` labels per token (k_attr), ``N`` tokens of the shard,
``S`` KD samples per token, ``D`` teacher width.
"""
from __future__ import annotations

import logging
from typing import Iterator, NamedTuple

import numpy as np
import torch

from cocomix.core.errors import CocomixError
from cocomix.stage1_extract.attribution import AttributionSpec, label_batch
from cocomix.stage1_extract.kd_samples import batch_uniforms
from cocomix.stage1_extract.sae.model import TopKSAE
from cocomix.stage1_extract.teacher import Teacher

log = logging.getLogger(__name__)


class ShardLabels(NamedTuple):
    """The columns of a target shard, as numpy arrays."""

    tokens_N: np.ndarray  #: token ids (the token store's dtype)
    ids_NK: np.ndarray  #: label ids (uint16/uint32), ``ignore_id`` where no label
    scores_NK: np.ndarray  #: label scores (float32/float16), 0 where no label
    extra: dict = {}  #: optional columns: ``kd_ids`` [N, S] (token dtype), ``hidden`` [N, D] float16


class WindowBatch(NamedTuple):
    """Consecutive equal-length windows of a shard."""

    offset: int  #: first token of the batch, relative to the shard start
    ids_BT: np.ndarray  #: [B, T] token ids


def window_batches(tokens_N: np.ndarray, window: int, batch_size: int) -> Iterator[WindowBatch]:
    """Full windows ``batch_size`` at a time, then the shorter last window (if any) alone."""
    n_full = len(tokens_N) // window
    for first in range(0, n_full, batch_size):
        last = min(n_full, first + batch_size)
        yield WindowBatch(first * window, tokens_N[first * window:last * window].reshape(last - first, window))
    if len(tokens_N) % window:
        yield WindowBatch(n_full * window, tokens_N[n_full * window:][None, :])


class NonFiniteError(CocomixError):
    """The teacher's activation or loss was NaN/inf on a window."""


def label_shard(teacher: Teacher, sae: TopKSAE, tokens_N: np.ndarray, *, split: str, start: int,
                window: int, batch_size: int, spec: AttributionSpec, id_dtype: np.dtype,
                score_dtype: np.dtype, on_batch=None) -> ShardLabels:
    """Labels for the tokens ``tokens_N`` of ``split`` starting at token ``start``.

    ``on_batch(n_tokens)`` is called after each batch (progress). Raises
    :class:`NonFiniteError` naming the split and the window on NaN/inf.
    """
    n, A = len(tokens_N), spec.k_attr
    ids_NK = np.empty((n, A), dtype=id_dtype)
    scores_NK = np.empty((n, A), dtype=score_dtype)
    extra = {}
    if spec.kd_samples:
        extra["kd_ids"] = np.empty((n, spec.kd_samples), dtype=tokens_N.dtype)
    if spec.store_hidden:
        extra["hidden"] = np.empty((n, teacher.d_model), dtype=np.float16)
    device = teacher.device
    for batch in window_batches(tokens_N, window, batch_size):
        ids_BT = torch.from_numpy(batch.ids_BT.astype(np.int64)).to(device)
        B, T = ids_BT.shape
        u_BTS = batch_uniforms(split, start + batch.offset, B, T, spec.kd_samples) if spec.kd_samples else None
        out = label_batch(teacher, sae, ids_BT, spec, u_BTS)
        _check_finite(out.finite_B, split=split, first=start + batch.offset, T=T, window=window)
        rows = slice(batch.offset, batch.offset + ids_BT.numel())
        ids_NK[rows] = out.ids_BTK.reshape(-1, A).cpu().numpy().astype(id_dtype)
        scores_NK[rows] = out.scores_BTK.reshape(-1, A).cpu().numpy().astype(score_dtype)
        if spec.kd_samples:
            extra["kd_ids"][rows] = out.kd_ids_BTS.reshape(B * T, -1).cpu().numpy()
        if spec.store_hidden:
            extra["hidden"][rows] = out.hidden_BTD.reshape(B * T, -1).cpu().numpy()
        if on_batch is not None:
            on_batch(ids_BT.numel())
    return ShardLabels(np.ascontiguousarray(tokens_N), ids_NK, scores_NK, extra)


def _check_finite(finite_B: torch.Tensor, *, split: str, first: int, T: int, window: int) -> None:
    bad = (~finite_B).nonzero().flatten().tolist()
    if not bad:
        return
    a = first + bad[0] * T
    raise NonFiniteError(
        f"non-finite teacher activation or loss in split {split!r}, window {a // window} (tokens [{a}, {a + T})); "
        "finished shards are kept; check the teacher weights or use --dtype float32"
    )
