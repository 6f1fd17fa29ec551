"""Sparse, unbiased KD targets: N token ids per position drawn from the teacher's next-token softmax.

A full teacher distribution is 50,257 floats per token; N i.i.d. samples ``id_1..id_N ~ p_T``
are N ids, and ``-(1/N) sum_n log q(id_n)`` is an unbiased estimate of the cross-entropy
``CE(p_T, q) = KL(p_T || q) + H(p_T)``, so its gradient w.r.t. the student's logits is, in
expectation, the gradient of the full-vocabulary KL (random-sampling KD; top-k truncation
would be biased).

Drawing: inverse CDF. Per position the fp32 probabilities are summed cumulatively and each
uniform ``u`` (scaled by the row's total, so rounding in the sum cannot push it past the end)
picks the first id whose cumulative sum exceeds it. The uniforms of a window are a pure
function of (split, first token of the window): ``numpy.random.default_rng([SEED_TAG,
crc32(split), window_start]).random((T, N))`` as float32, so the bytes depend only on the
position, never on the batch, the process or a restart. Ids whose probability is below
float32 resolution near 1 (about 6e-8) are never drawn.

Shape legend: ``B`` windows, ``T`` tokens, ``n`` rows of a chunk, ``V`` vocabulary, ``S`` samples per position.
"""
from __future__ import annotations

import zlib

import numpy as np
import torch

SEED_TAG = 0x6B64  #: "kd": keeps these streams apart from any other seeded stream of a window
CDF_CHUNK_ROWS = 256  #: rows of the [n, V] cumulative sum alive at once
RULE = ("inverse CDF of the teacher's fp32 next-token softmax; uniforms of the window starting at token w of "
        "split s: numpy.random.default_rng([0x6B64, crc32(s), w]).random((T, N)) as float32, scaled by the row's sum")


def window_uniforms(split: str, window_start: int, T: int, n_samples: int) -> np.ndarray:
    """The [T, S] float32 uniforms of the window of ``split`` starting at token ``window_start``."""
    rng = np.random.default_rng([SEED_TAG, zlib.crc32(split.encode()), int(window_start)])
    return rng.random((T, n_samples), dtype=np.float32)


def batch_uniforms(split: str, first: int, B: int, T: int, n_samples: int) -> torch.Tensor:
    """Uniforms [B, T, S] of ``B`` consecutive windows of length ``T``, the first starting at token ``first``."""
    return torch.from_numpy(np.stack([window_uniforms(split, first + b * T, T, n_samples) for b in range(B)]))


def sample_from_probs(probs_nV: torch.Tensor, u_nS: torch.Tensor) -> torch.Tensor:
    """Ids [n, S] (int64) by inverse CDF of each row of ``probs_nV`` (rows need not be normalised).

    ``CDF_CHUNK_ROWS`` rows at a time, so at most that many [*, V] cumulative sums exist.
    """
    n, V = probs_nV.shape
    out_nS = torch.empty(u_nS.shape, dtype=torch.int64, device=probs_nV.device)
    u_nS = u_nS.to(probs_nV.device, torch.float32)
    buffer = torch.empty(min(n, CDF_CHUNK_ROWS), V, dtype=torch.float32, device=probs_nV.device)  # reused
    for s in range(0, n, CDF_CHUNK_ROWS):
        e = min(n, s + CDF_CHUNK_ROWS)
        cdf_cV = torch.cumsum(probs_nV[s:e], dim=-1, dtype=torch.float32, out=buffer[: e - s])
        target_cS = u_nS[s:e] * cdf_cV[:, -1:]
        out_nS[s:e] = torch.searchsorted(cdf_cV, target_cS, right=True).clamp_(max=V - 1)
    return out_nS


def sample_from_logits(logits_nV: torch.Tensor, u_nS: torch.Tensor) -> torch.Tensor:
    """:func:`sample_from_probs` of ``softmax(logits)`` in fp32 (for positions the attribution pass does not cover)."""
    return sample_from_probs(torch.softmax(logits_nV.float(), dim=-1), u_nS)
