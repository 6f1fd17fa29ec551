"""Knowledge distillation from stored teacher samples (``pretrain --method kd`` / ``pause-kd``).

``extract --kd-samples N`` stores, per position t, N token ids drawn i.i.d. from the teacher's
next-token distribution p_T(. | x_<=t). The student's loss at t is

    (1 - alpha) * CE(q_t, x_{t+1})  +  alpha * ( -(1/N) sum_n log q_t(id_n) )

The second term is an unbiased estimate of CE(p_T, q_t) = KL(p_T || q_t) + H(p_T), and H(p_T)
does not depend on the student, so its gradient is, in expectation, the gradient of the KL
(random-sampling KD; keeping the teacher's top-k instead would be biased). Both terms are read
at the positions the next-token loss uses (every position but a window's last), and share one
log-sum-exp: ``loss_t = lse_t - (1 - alpha) z_t[x_{t+1}] - alpha/N sum_n z_t[id_n]``.

Shape legend: B batch, T tokens, V vocabulary, S KD samples per position.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


class KdLosses(NamedTuple):
    """Mean next-token CE and mean sampled KD term over the predicted positions (both fp32)."""

    ntp: torch.Tensor
    kd: torch.Tensor


def ntp_and_kd(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, kd_ids_BTS: torch.Tensor) -> KdLosses:
    """Both terms from one fp32 log-sum-exp over the positions 0..T-2 (the last predicts nothing in the window)."""
    ntp, kd = FusedKd.apply(logits_BTV, input_ids_BT, kd_ids_BTS)
    return KdLosses(ntp, kd)


class FusedKd(torch.autograd.Function):
    """:func:`kd_reference`'s two means with a hand-written backward.

    The logits are the largest tensor of a step ([B, T, V]); autograd over ``logsumexp`` and two
    ``gather`` calls writes three [B, T, V] gradients (softmax, and a zero-filled scatter per gather)
    and adds them. Here: ``d/dz_t = (g_ntp + g_kd)/n * softmax(z_t) - g_ntp/n * onehot(x_{t+1})
    - g_kd/(n S) * sum_s onehot(id_s)`` for the n = B (T-1) predicted positions (0 at a window's
    last): one chunked softmax pass into the gradient buffer, then two sparse ``scatter_add_``.
    Rows run over all B T positions (the [B, T-1] slice is no flat view) with the last ones weighted 0.
    Checked against the autograd reference in the tests.
    """

    CHUNK = 2048  #: rows per fp32 temporary

    @staticmethod
    def forward(ctx, logits_BTV, input_ids_BT, kd_ids_BTS):
        B, T, V = logits_BTV.shape
        z_NV = logits_BTV.reshape(-1, V)  # N = B T rows
        w_BT = torch.ones(B, T, device=z_NV.device)
        w_BT[:, -1] = 0.0  # a window's last position predicts nothing
        w_N, n = w_BT.view(-1), B * (T - 1)
        next_N1 = F.pad(input_ids_BT[:, 1:], (0, 1)).reshape(-1, 1)  # (0 at the last position: weight 0)
        kd_NS = kd_ids_BTS.reshape(B * T, -1)
        lse_N = torch.cat([torch.logsumexp(zc.float(), -1) for zc in z_NV.split(FusedKd.CHUNK)])
        ntp = ((lse_N - z_NV.gather(-1, next_N1).float().squeeze(-1)) * w_N).sum() / max(n, 1)
        kd = ((lse_N - z_NV.gather(-1, kd_NS).float().mean(-1)) * w_N).sum() / max(n, 1)
        ctx.save_for_backward(logits_BTV, lse_N, w_N, next_N1, kd_NS)
        return ntp, kd

    @staticmethod
    def backward(ctx, g_ntp, g_kd):
        logits_BTV, lse_N, w_N, next_N1, kd_NS = ctx.saved_tensors
        B, T, V = logits_BTV.shape
        n, S = max(B * (T - 1), 1), kd_NS.shape[1]
        grad_NV = torch.empty(B * T, V, dtype=logits_BTV.dtype, device=logits_BTV.device)
        z_NV = logits_BTV.reshape(-1, V)
        coef_N = w_N * ((g_ntp + g_kd) / n)
        for g_cV, z_cV, lse_c, coef_c in zip(*(t.split(FusedKd.CHUNK) for t in (grad_NV, z_NV, lse_N, coef_N))):
            g_cV.copy_((z_cV.float() - lse_c[:, None]).exp_().mul_(coef_c[:, None]))
        grad_NV.scatter_add_(-1, next_N1, (-g_ntp / n * w_N[:, None]).to(grad_NV.dtype))
        grad_NV.scatter_add_(-1, kd_NS, (-g_kd / (n * S) * w_N[:, None]).expand(-1, S).to(grad_NV.dtype).contiguous())
        return grad_NV.view(B, T, V), None, None


def kd_reference(logits_BTV: torch.Tensor, input_ids_BT: torch.Tensor, kd_ids_BTS: torch.Tensor) -> KdLosses:
    """The plain formulas (``F.cross_entropy`` and ``log_softmax``), the reference of :func:`ntp_and_kd`."""
    V = logits_BTV.size(-1)
    logits = logits_BTV[:, :-1].float()
    ntp = F.cross_entropy(logits.reshape(-1, V), input_ids_BT[:, 1:].reshape(-1))
    kd = -torch.log_softmax(logits, dim=-1).gather(-1, kd_ids_BTS[:, :-1]).mean()
    return KdLosses(ntp, kd)


def kd_combine(ntp: torch.Tensor, kd: torch.Tensor, alpha: float) -> torch.Tensor:
    """``(1 - alpha) * ntp + alpha * kd``."""
    return (1 - alpha) * ntp + alpha * kd
