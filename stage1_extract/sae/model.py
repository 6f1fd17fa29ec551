"""TopK sparse autoencoder (Gao et al. 2024) as used by CoCoMix.

Same parameters and arithmetic as openai/sparse_autoencoder ``model.py`` (names in brackets)::

    x, mu, std = layernorm_unbiased(h)            # only when `normalize` (OpenAI TopK files)
    pre  = (x - b_pre) @ W_enc.T + b_enc          # [pre_bias], [encoder.weight], [latent_bias]
    z    = ReLU(TopK_k(pre)) scattered into zeros
    h^   = (W_dec z + b_pre) * std + mu           # [decoder.weight]

Only the k active latents of ``z`` are kept (``top_idx``/``top_val``); decoding gathers
the k decoder columns instead of multiplying a dense ``[.., L]`` vector.

Shape legend: ``D`` teacher/SAE input width, ``L`` latents, ``Z`` active latents (TopK k),
``N`` flattened leading dims.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cocomix.core.layernorm import Normalized, layernorm_unbiased


class SaeEncoding(NamedTuple):
    """Output of :meth:`TopKSAE.encode`."""

    pre: torch.Tensor | None  #: [..., L] pre-activations (only with ``dense=True``, else None)
    top_idx: torch.Tensor  #: [..., Z] int64 indices of the k largest pre-activations, largest first
    top_val: torch.Tensor  #: [..., Z] ReLU of those pre-activations (the non-zero latents)
    norm: Normalized  #: the normalised input and the (mu, std) that decode needs


class TopKSAE(nn.Module):
    """TopK SAE with OpenAI's parameter layout (``W_enc`` [L, D], ``W_dec`` [D, L])."""

    def __init__(self, d_in: int, n_latents: int, k: int, normalize: bool = True) -> None:
        super().__init__()
        assert 1 <= k <= n_latents, (k, n_latents)
        self.d_in, self.n_latents, self.k, self.normalize = d_in, n_latents, k, normalize
        self.W_enc = nn.Parameter(torch.zeros(n_latents, d_in))  # [L, D] = encoder.weight
        self.b_enc = nn.Parameter(torch.zeros(n_latents))  # [L] = latent_bias
        # [D, L] = decoder.weight, stored column-major (as OpenAI's train.py) so that ``W_dec.t()`` [L, D]
        # is contiguous: gathering K columns reads K rows, and embedding_bag needs no 100 MB copy per call.
        self.W_dec = nn.Parameter(torch.zeros(n_latents, d_in).t())
        self.b_pre = nn.Parameter(torch.zeros(d_in))  # [D] = pre_bias

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, n_latents={self.n_latents}, k={self.k}, normalize={self.normalize}"

    def preprocess(self, h: torch.Tensor) -> Normalized:
        """Unbiased LayerNorm when the SAE normalises; otherwise identity with mu 0, std 1."""
        if self.normalize:
            return layernorm_unbiased(h)
        return Normalized(h, h.new_zeros(()), h.new_ones(()))

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """``(x - b_pre) @ W_enc.T + b_enc`` on an already normalised input: [..., D] -> [..., L]."""
        return F.linear(x - self.b_pre, self.W_enc, self.b_enc)

    def encode(self, h: torch.Tensor, dense: bool = False) -> SaeEncoding:
        """Normalise ``h`` [..., D], keep the k largest pre-activations, ReLU them."""
        return self._encode(self.preprocess(h), dense)

    def encode_normalized(self, x: torch.Tensor, dense: bool = False) -> SaeEncoding:
        """:meth:`encode` of an input that is already normalised (training streams normalised inputs)."""
        return self._encode(Normalized(x, x.new_zeros(()), x.new_ones(())), dense)

    def _encode(self, norm: Normalized, dense: bool) -> SaeEncoding:
        pre = self.pre_activations(norm.x)
        top_val, top_idx = pre.topk(self.k, dim=-1)  # sorted, largest first
        return SaeEncoding(pre if dense else None, top_idx, F.relu(top_val), norm)

    def decode_normalized(self, top_idx: torch.Tensor, top_val: torch.Tensor) -> torch.Tensor:
        """``W_dec z + b_pre`` in the normalised space, gathering only the K active columns.

        ``embedding_bag`` over ``W_dec.t()`` ([L, D], contiguous: see ``__init__``) sums
        ``val * W_dec[:, idx]`` per row without materialising ``[..., L]``.
        """
        lead = top_idx.shape[:-1]
        idx_NZ = top_idx.reshape(-1, top_idx.shape[-1])
        val_NZ = top_val.reshape(-1, top_val.shape[-1]).to(self.W_dec.dtype)
        out_ND = F.embedding_bag(idx_NZ, self.W_dec.t(), per_sample_weights=val_NZ, mode="sum")
        return (out_ND + self.b_pre).reshape(*lead, self.d_in)

    def decode(self, top_idx: torch.Tensor, top_val: torch.Tensor, norm: Normalized) -> torch.Tensor:
        """Reconstruction in the input space: ``(W_dec z + b_pre) * std + mu``."""
        return self.decode_normalized(top_idx, top_val) * norm.std + norm.mu

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Encode and decode (the reconstruction of ``h``)."""
        enc = self.encode(h)
        return self.decode(enc.top_idx, enc.top_val, enc.norm)


def scatter_latents(top_idx: torch.Tensor, top_val: torch.Tensor, n_latents: int) -> torch.Tensor:
    """Dense latent vector [..., L] with ``top_val`` at ``top_idx`` (for references and analysis only)."""
    dense = top_val.new_zeros(*top_idx.shape[:-1], n_latents)
    return dense.scatter_(-1, top_idx, top_val)
