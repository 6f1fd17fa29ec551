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
    z_BtV = logits_BTV[:, :-1].float()  # t = 0..T-2
    lse_Bt = torch.logsumexp(z_BtV, dim=-1)
    next_Bt = z_BtV.gather(-1, input_ids_BT[:, 1:, None]).squeeze(-1)
    sampled_Bt = z_BtV.gather(-1, kd_ids_BTS[:, :-1]).mean(-1)
    return KdLosses((lse_Bt - next_Bt).mean(), (lse_Bt - sampled_Bt).mean())


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
