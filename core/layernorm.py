"""The unbiased LayerNorm that OpenAI's TopK SAEs normalise their inputs with, and that the CoCoMix
student applies before its concept head: ``(h - mean) / (std + eps)`` with the **unbiased** std
over the last dimension, returning the mean and std that decoding needs."""
from __future__ import annotations

from typing import NamedTuple

import torch

LN_EPS = 1e-5


class Normalized(NamedTuple):
    """Output of :func:`layernorm_unbiased`."""

    x: torch.Tensor  #: ``(h - mu) / (std + eps)``, same shape as ``h``
    mu: torch.Tensor  #: mean over the last dim, keepdim
    std: torch.Tensor  #: **unbiased** std over the last dim, keepdim


def layernorm_unbiased(h: torch.Tensor, eps: float = LN_EPS) -> Normalized:
    """OpenAI SAE input normalisation (also the student's): unbiased std, eps added to std."""
    mu = h.mean(dim=-1, keepdim=True)
    centered = h - mu
    std = centered.std(dim=-1, keepdim=True)  # unbiased, as openai/sparse_autoencoder
    return Normalized(centered / (std + eps), mu, std)
