"""Concept labels of a batch of windows: teacher + SAE + attribution (DESIGN.md §4).

The official extractor (RAM ``projects/cocomix/models/concept_extractor.py``) runs the
whole teacher forward, ``loss.backward()`` with gradients for every parameter, the
dense ``(grad_x @ decoder.weight) * latents`` over all latents and ``topk``. The same
labels come out of much less work here:

1. blocks ``0..layer`` under ``no_grad``: their activations are never stored;
2. ``h`` becomes a leaf that requires grad; parameters are frozen, so the backward
   computes only input gradients, and only through blocks ``layer+1..`` and the head;
3. the head and the cross-entropy run chunk by chunk over the sequence, each chunk's
   backward right after its forward, so ``[B, T, V]`` fp32 logits never all exist;
4. only the k active latents can score non-zero: ``(g . W_dec[:, idx]) * val`` is k dot
   products by gather instead of a ``[D, L]`` matmul.

Labels are the ``k_attr`` best strictly positive scores, best first; other slots hold
``ignore_id`` (the fix of DESIGN.md §4.6). The loss is the mean CE *per window*
(§4.2: the teacher sees each window alone), so a window's labels and scores do not
depend on what else shares its batch; the official mean over the whole batch only
rescales every score of a batch of B windows by 1/B, which leaves the labels unchanged.

Shape legend: ``B`` windows, ``T`` tokens, ``D`` model width, ``V`` vocabulary,
``L`` SAE latents, ``K`` SAE active latents, ``A`` labels kept per token (k_attr), ``N`` B*T.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cocomix.stage1_extract.sae import TopKSAE
from cocomix.stage1_extract.teacher import Teacher, embed, run_blocks

HEAD_CHUNK_TOKENS = 8192  #: rows of logits ([rows, V] fp32) alive at once in the chunked head
GATHER_CHUNK_TOKENS = 4096  #: tokens per gather of decoder columns ([rows, K, D])
DENSE_CHUNK_TOKENS = 1024  #: tokens per dense [rows, L] product (``--attribution-input pre``)


@dataclass(frozen=True)
class AttributionSpec:
    """How labels are chosen (the ``extract`` flags that change labels)."""

    layer: int
    k_attr: int = 4
    selection: str = "attribution"  #: ``attribution`` or ``activation``
    attribution_input: str = "post"  #: ``post`` (TopK activations) or ``pre`` (dense pre-activations)
    ignore_id: int = 65535
    autocast_dtype: torch.dtype | None = None  #: bf16 autocast for the teacher; None = fp32


class WindowLabels(NamedTuple):
    """Labels of a batch of equal-length windows."""

    ids_BTA: torch.Tensor  #: int64 latent ids, best first; ``ignore_id`` where no positive score
    scores_BTA: torch.Tensor  #: float32 scores; 0 where the id is ``ignore_id``
    loss_B: torch.Tensor  #: per-window mean next-token CE (NaN-free unless the teacher diverged)
    finite_B: torch.Tensor  #: bool: the window's activation and loss are finite


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def hidden_below(teacher: Teacher, ids_BT: torch.Tensor, spec: AttributionSpec):
    """Output of block ``layer`` in fp32 (no grad), plus the mask and positions the upper blocks need."""
    with torch.no_grad(), _autocast(ids_BT.device, spec.autocast_dtype):
        h_BTD, mask, pos = embed(teacher, ids_BT)
        h_BTD = run_blocks(teacher, h_BTD, mask, pos, 0, spec.layer + 1)
    return h_BTD.float(), mask, pos


def chunked_ce_grad(teacher: Teacher, top_BTD: torch.Tensor, ids_BT: torch.Tensor,
                    autocast_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window mean CE of the head on ``top_BTD`` (after ln_f) and d(sum of window means)/d top_BTD.

    Each chunk of positions runs head forward, fp32 CE and the head's input-gradient
    right away, so only one chunk of logits exists at a time and the head runs once.
    """
    B, T, _ = top_BTD.shape
    loss_B = top_BTD.new_zeros(B, dtype=torch.float32)
    grad_BTD = torch.zeros_like(top_BTD)
    if T < 2:
        return loss_B, grad_BTD
    rows = max(1, HEAD_CHUNK_TOKENS // B)
    for s in range(0, T - 1, rows):
        e = min(T - 1, s + rows)
        x_BCD = top_BTD[:, s:e].detach().requires_grad_(True)
        with torch.enable_grad():
            with _autocast(ids_BT.device, autocast_dtype):
                logits_BCV = teacher.model.lm_head(x_BCD)
            logits_BCV = logits_BCV.float()  # fp32 softmax
            ce_BC = F.cross_entropy(logits_BCV.flatten(0, 1), ids_BT[:, s + 1:e + 1].flatten(), reduction="none")
            chunk_B = ce_BC.view(B, e - s).sum(1) / (T - 1)
            (g_BCD,) = torch.autograd.grad(chunk_B.sum(), x_BCD)
        loss_B += chunk_B.detach()
        grad_BTD[:, s:e] = g_BCD
    return loss_B, grad_BTD


def loss_and_grad(teacher: Teacher, h_BTD: torch.Tensor, mask, pos, ids_BT: torch.Tensor,
                  spec: AttributionSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-window loss and ``g = d loss / d h`` through blocks ``layer+1..`` and the head only."""
    h_leaf = h_BTD.detach().requires_grad_(True)
    n_layer = len(teacher.model.transformer.h)
    with torch.enable_grad(), _autocast(ids_BT.device, spec.autocast_dtype):
        top_BTD = run_blocks(teacher, h_leaf, mask, pos, spec.layer + 1, n_layer)
        top_BTD = teacher.model.transformer.ln_f(top_BTD)
    loss_B, grad_top_BTD = chunked_ce_grad(teacher, top_BTD, ids_BT, spec.autocast_dtype)
    (g_BTD,) = torch.autograd.grad(top_BTD, h_leaf, grad_outputs=grad_top_BTD.to(top_BTD.dtype))
    return loss_B, g_BTD.float()


def active_scores(g_NTD: torch.Tensor, W_dec_DL: torch.Tensor, idx_NK: torch.Tensor, val_NK: torch.Tensor) -> torch.Tensor:
    """``(g . W_dec[:, idx]) * val`` for the K active latents of each row: [N, K], by gather."""
    W_LD = W_dec_DL.t()
    out = []
    for s in range(0, g_NTD.shape[0], GATHER_CHUNK_TOKENS):
        cols_NKD = W_LD[idx_NK[s:s + GATHER_CHUNK_TOKENS]]  # [n, K, D] gathered decoder columns
        dots_NK = torch.bmm(cols_NKD, g_NTD[s:s + GATHER_CHUNK_TOKENS].unsqueeze(-1)).squeeze(-1)
        out.append(dots_NK * val_NK[s:s + GATHER_CHUNK_TOKENS])
    return torch.cat(out)


def dense_pre_scores(g_ND: torch.Tensor, W_dec_DL: torch.Tensor, pre_NL: torch.Tensor, k_attr: int):
    """Paper Eq. 1: ``(g @ W_dec) * pre`` over all latents, top ``k_attr``: ([N, A] scores, [N, A] ids)."""
    vals, ids = [], []
    for s in range(0, g_ND.shape[0], DENSE_CHUNK_TOKENS):
        dense_NL = (g_ND[s:s + DENSE_CHUNK_TOKENS] @ W_dec_DL) * pre_NL[s:s + DENSE_CHUNK_TOKENS]
        v, i = dense_NL.topk(k_attr, dim=-1)
        vals.append(v)
        ids.append(i)
    return torch.cat(vals), torch.cat(ids)


def keep_positive(scores_NC: torch.Tensor, ids_NC: torch.Tensor, k_attr: int, ignore_id: int):
    """The ``k_attr`` largest strictly positive scores, best first; other slots ``ignore_id`` / 0."""
    k = min(k_attr, scores_NC.shape[-1])
    best_NA, pick_NA = scores_NC.topk(k, dim=-1)
    ids_NA = ids_NC.gather(-1, pick_NA)
    if k < k_attr:  # the SAE has fewer active latents than labels requested: pad
        pad = k_attr - k
        best_NA = F.pad(best_NA, (0, pad), value=0.0)
        ids_NA = F.pad(ids_NA, (0, pad), value=ignore_id)
    valid_NA = best_NA > 0
    return torch.where(valid_NA, best_NA, 0.0), torch.where(valid_NA, ids_NA, ignore_id)


def label_batch(teacher: Teacher, sae: TopKSAE, ids_BT: torch.Tensor, spec: AttributionSpec) -> WindowLabels:
    """Labels for a batch of equal-length windows ``ids_BT`` (each window seen alone by the teacher)."""
    B, T = ids_BT.shape
    h_BTD, mask, pos = hidden_below(teacher, ids_BT, spec)
    h_finite_B = torch.isfinite(h_BTD).flatten(1).all(1)
    with torch.no_grad():
        enc = sae.encode(h_BTD, dense=spec.attribution_input == "pre" and spec.selection == "attribution")
    if spec.selection == "activation":
        loss_B = h_BTD.new_zeros(B)
        scores_NC, ids_NC = enc.top_val.flatten(0, 1), enc.top_idx.flatten(0, 1)
    else:
        loss_B, g_BTD = loss_and_grad(teacher, h_BTD, mask, pos, ids_BT, spec)
        scores_NC, ids_NC = _attribution_scores(sae, g_BTD, enc, spec)
    scores_NA, ids_NA = keep_positive(scores_NC, ids_NC, spec.k_attr, spec.ignore_id)
    finite_B = h_finite_B & torch.isfinite(loss_B)
    return WindowLabels(ids_NA.view(B, T, -1), scores_NA.view(B, T, -1).float(), loss_B, finite_B)


def _attribution_scores(sae: TopKSAE, g_BTD: torch.Tensor, enc, spec: AttributionSpec):
    """Candidate (scores, ids) per token: the K active latents (post) or the dense top ``k_attr`` (pre)."""
    g_ND = g_BTD.flatten(0, 1)
    W_dec_DL = sae.W_dec.detach()
    with torch.no_grad():
        if spec.attribution_input == "pre":
            return dense_pre_scores(g_ND, W_dec_DL, enc.pre.flatten(0, 1), spec.k_attr)
        idx_NK, val_NK = enc.top_idx.flatten(0, 1), enc.top_val.flatten(0, 1)
        return active_scores(g_ND, W_dec_DL, idx_NK, val_NK), idx_NK
