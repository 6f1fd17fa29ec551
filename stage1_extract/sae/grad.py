"""Encoder gradient through the selected latents only (the training-side half of sparse TopK).

Only the k (+ AuxK) selected pre-activations of each row receive a gradient, so the
encoder backward is a sparse ``[L, N] @ [N, D]`` product instead of the dense
``[L, N] @ [N, D]`` that autograd of ``topk`` over a dense ``pre`` performs (sparsify
does the same with a fused ``embedding_bag`` backward). The forward reuses ``pre``
computed without autograd. Tested against dense autograd with ``assert_close``.

Shape legend: ``N`` rows, ``D`` width, ``L`` latents, ``Z`` selected latents per row (TopK k, plus AuxK in training).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


class _GatheredPre(torch.autograd.Function):
    """``pre[n, idx[n, s]]`` where ``pre = xc @ W_enc.T + b_enc``; backward touches only gathered latents."""

    @staticmethod
    def forward(ctx, xc_ND, W_enc_LD, b_enc_L, pre_NL, idx_NZ):
        ctx.save_for_backward(xc_ND, W_enc_LD, idx_NZ)
        return pre_NL.gather(-1, idx_NZ)

    @staticmethod
    def backward(ctx, grad_NZ):
        xc_ND, W_enc_LD, idx_NZ = ctx.saved_tensors
        n_rows, n_sel = idx_NZ.shape
        n_latents = W_enc_LD.shape[0]
        flat_idx, flat_grad = idx_NZ.reshape(-1), grad_NZ.reshape(-1).to(W_enc_LD.dtype)
        rows = torch.arange(n_rows, device=idx_NZ.device).repeat_interleave(n_sel)
        grad_LN = torch.sparse_coo_tensor(torch.stack([flat_idx, rows]), flat_grad, (n_latents, n_rows),
                                          check_invariants=False)
        grad_W_LD = torch.sparse.mm(grad_LN, xc_ND)  # duplicate (latent, row) pairs are summed, as they should be
        grad_b_L = torch.zeros(n_latents, dtype=W_enc_LD.dtype, device=W_enc_LD.device).index_add_(0, flat_idx, flat_grad)
        grad_xc_ND = F.embedding_bag(idx_NZ, W_enc_LD, per_sample_weights=grad_NZ.to(W_enc_LD.dtype), mode="sum")
        return grad_xc_ND, grad_W_LD, grad_b_L, None, None


def gathered_pre_activations(sae, x_ND: torch.Tensor, pre_NL: torch.Tensor, idx_NZ: torch.Tensor) -> torch.Tensor:
    """Differentiable ``pre[n, idx]`` ([N, Z]) for a ``pre_NL`` computed under ``no_grad`` from the same weights.

    Gradients reach ``W_enc`` and ``b_enc`` (only the gathered rows) and ``b_pre`` (through ``x - b_pre``).
    """
    return _GatheredPre.apply(x_ND - sae.b_pre, sae.W_enc, sae.b_enc, pre_NL.detach(), idx_NZ)
