"""Hidden-state prediction, the paper's ablation of concepts (``pretrain --concept-target hidden``).

Instead of the SAE's concept logits, a 2-layer MLP predicts the teacher's hidden state at the
SAE's layer (stored by ``extract --store-hidden``), and that prediction is compressed by a
linear map and mixed in exactly where ``c`` would be:

    x, mu, std = LN_unbiased(h)                       # the student's normalisation, as for concepts
    y^ = W_2 gelu(W_1 x + b_1) + b_2                   # d_teacher outputs
    loss = l1 | l2 | cosine (y^, LN_unbiased(y_T))     # target: the teacher state, normalised alike
    c  = (W_c y^ + b_c) * std + mu                     # back in the residual stream's scale

The target is the teacher state normalised like the SAE's input (zero mean, unit std per
token), so one loss scale fits every teacher: raw GPT-2 residuals carry a few dimensions in
the hundreds that an L2 loss would spend itself on.

Shape legend: B batch, T tokens, D student width, E teacher width (d_teacher).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from cocomix.core.layernorm import layernorm_unbiased


def l1_loss(pred_BTE: torch.Tensor, target_BTE: torch.Tensor) -> torch.Tensor:
    return (pred_BTE - target_BTE).abs().mean()


def l2_loss(pred_BTE: torch.Tensor, target_BTE: torch.Tensor) -> torch.Tensor:
    return (pred_BTE - target_BTE).pow(2).mean()


def cosine_loss(pred_BTE: torch.Tensor, target_BTE: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(pred_BTE, target_BTE, dim=-1)).mean()


HIDDEN_LOSSES = {"l1": l1_loss, "l2": l2_loss, "cosine": cosine_loss}


class HiddenStep(NamedTuple):
    """What the hidden-state head computes at ``insert_layer`` (field names as the concept step's)."""

    z_BTL: torch.Tensor  #: the predicted, normalised teacher state [B, T, E]
    top_idx_BTC: None
    top_val_BTC: None
    c_BTD: torch.Tensor | None  #: the compressed prediction (None: prediction only)
    loss: torch.Tensor | None  #: the hidden loss (when the teacher state was given)


def hidden_loss(name: str, pred_BTE: torch.Tensor, teacher_BTE: torch.Tensor | None) -> torch.Tensor | None:
    """``name`` loss of the prediction against the normalised teacher state, in fp32; None without a target."""
    if teacher_BTE is None:
        return None
    return HIDDEN_LOSSES[name](pred_BTE.float(), layernorm_unbiased(teacher_BTE.float()).x)


class HiddenPredictor(nn.Module):
    """The 2-layer MLP and its loss; nothing mixed back (``mix="none"``)."""

    def __init__(self, cfg):
        super().__init__()
        if cfg.d_teacher < 1:
            raise ValueError("concept_target='hidden' needs d_teacher (the teacher's width) >= 1")
        self.loss_name = cfg.hidden_loss
        self.fc = nn.Linear(cfg.n_embd, cfg.d_teacher)
        self.proj = nn.Linear(cfg.d_teacher, cfg.d_teacher)

    def predict(self, h_BTD: torch.Tensor):
        norm = layernorm_unbiased(h_BTD)
        return norm, self.proj(F.gelu(self.fc(norm.x), approximate="tanh"))

    def forward(self, h_BTD: torch.Tensor, teacher_hidden: torch.Tensor | None = None, **_) -> HiddenStep:
        _, pred_BTE = self.predict(h_BTD)
        return HiddenStep(pred_BTE, None, None, None, hidden_loss(self.loss_name, pred_BTE, teacher_hidden))


class HiddenBottleneck(HiddenPredictor):
    """The MLP, its loss, and the linear compression back to the student's width."""

    def __init__(self, cfg):
        super().__init__(cfg)
        self.compress = nn.Linear(cfg.d_teacher, cfg.n_embd)

    def forward(self, h_BTD: torch.Tensor, teacher_hidden: torch.Tensor | None = None, **_) -> HiddenStep:
        norm, pred_BTE = self.predict(h_BTD)
        c_BTD = self.compress(pred_BTE) * norm.std + norm.mu
        return HiddenStep(pred_BTE, None, None, c_BTD, hidden_loss(self.loss_name, pred_BTE, teacher_hidden))
