"""Concept labels of a batch of windows: teacher + SAE + attribution (docs/ARCHITECTURE.md, stage 1).

The official extractor (RAM ``projects/cocomix/models/concept_extractor.py``) runs the
whole teacher forward, ``loss.backward()`` with gradients for every parameter, the
dense ``(grad_x @ decoder.weight) * latents`` over all latents and ``topk``. The same
labels come out of much less work here:

1. blocks ``0..layer`` under ``no_grad``: their activations are never stored;
2. ``h`` becomes a leaf that requires grad; parameters are frozen, so the backward
   computes only input gradients, and only through blocks ``layer+1..`` and the head;
3. the head and the cross-entropy run 2048 rows at a time, the head's input gradient in
   closed form (``(softmax - onehot) @ W_head``, in place in one fp32 buffer), so
   ``[B, T, V]`` fp32 logits never all exist and no autograd graph spans the vocabulary;
4. only the k active latents can score non-zero: ``(g . W_dec[:, idx]) * val`` is k dot
   products by gather instead of a ``[D, L]`` matmul.

With ``kd_samples`` N > 0 the same head pass also draws N ids per position from the fp32
softmax it has just computed (:mod:`.kd_samples`), before that buffer becomes the gradient:
KD targets cost a cumulative sum and a search, not a second teacher pass. The last
position of a window, which predicts nothing inside it, gets one small extra head call.
With ``store_hidden`` the fp32 output of block ``layer`` (the SAE's input) is returned too.

Labels are the ``k_attr`` best strictly positive scores, best first; other slots hold
``ignore_id`` (the one deliberate difference from the official code, docs/ARCHITECTURE.md). The loss is the mean CE *per window*
(§4.2: the teacher sees each window alone), so a window's labels and scores do not
depend on what else shares its batch; the official mean over the whole batch only
rescales every score of a batch of B windows by 1/B, which leaves the labels unchanged.

Shape legend: ``B`` windows, ``T`` tokens, ``D`` model width, ``V`` vocabulary,
``L`` SAE latents, ``Z`` SAE active latents (TopK k), ``K`` labels kept per token (k_attr), ``N`` B*T,
``S`` KD samples per token.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from cocomix.stage1_extract.kd_samples import sample_from_logits, sample_from_probs
from cocomix.stage1_extract.sae.model import TopKSAE
from cocomix.stage1_extract.teacher import Teacher, embed, run_blocks

HEAD_CHUNK_TOKENS = 2048  #: rows of logits ([rows, V] fp32: 400 MB at V = 50257) alive at once
GATHER_CHUNK_TOKENS = 4096  #: tokens per gather of decoder columns ([rows, K, D]) on GPU (64 on CPU)
ENCODE_CHUNK_TOKENS = 2048  #: tokens per SAE encode ([rows, L] pre-activations; also the dense ``pre`` product)


@dataclass(frozen=True)
class AttributionSpec:
    """How labels are chosen (the ``extract`` flags that change labels)."""

    layer: int
    k_attr: int = 4
    selection: str = "attribution"  #: ``attribution`` or ``activation``
    attribution_input: str = "post"  #: ``post`` (TopK activations) or ``pre`` (dense pre-activations)
    ignore_id: int = 65535
    autocast_dtype: torch.dtype | None = None  #: bf16 autocast for the teacher; None = fp32
    kd_samples: int = 0  #: KD ids drawn per position from the teacher's softmax (0: none)
    store_hidden: bool = False  #: also return the hidden state at ``layer``


class WindowLabels(NamedTuple):
    """Labels of a batch of equal-length windows."""

    ids_BTK: torch.Tensor  #: int64 latent ids, best first; ``ignore_id`` where no positive score
    scores_BTK: torch.Tensor  #: float32 scores; 0 where the id is ``ignore_id``
    loss_B: torch.Tensor  #: per-window mean next-token CE (NaN-free unless the teacher diverged)
    finite_B: torch.Tensor  #: bool: the window's activation and loss are finite
    kd_ids_BTS: torch.Tensor | None = None  #: int64 token ids sampled from the teacher's next-token softmax
    hidden_BTD: torch.Tensor | None = None  #: fp32 output of block ``layer``


class HeadPass(NamedTuple):
    """One chunk of the head: weighted CE per row, its input gradient, and KD samples (if asked)."""

    ce_N: torch.Tensor
    g_ND: torch.Tensor
    kd_NS: torch.Tensor | None


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


def head_ce_grad(head: torch.nn.Linear, x_ND: torch.Tensor, targets_N: torch.Tensor, weight_N: torch.Tensor,
                 autocast_dtype: torch.dtype | None = None, u_NS: torch.Tensor | None = None) -> HeadPass:
    """Weighted next-token CE of ``head`` on ``x_ND`` and its gradient w.r.t. ``x_ND``, in closed form.

    ``d CE / d logits = softmax(logits) - onehot(target)``, so the gradient is
    ``(w * (p - onehot)) @ W_head``: one fp32 [n, V] buffer reused in place, no autograd graph.
    With uniforms ``u_NS``, KD ids are drawn from the softmax while the buffer holds it.
    """
    with _autocast(x_ND.device, autocast_dtype):
        logits_NV = head(x_ND)
    logits_NV = logits_NV.float()  # fp32 softmax
    lse_N = torch.logsumexp(logits_NV, dim=-1)
    ce_N = (lse_N - logits_NV.gather(-1, targets_N[:, None]).squeeze(-1)) * weight_N
    probs_NV = logits_NV.sub_(lse_N[:, None]).exp_()  # softmax, in place of the logits
    kd_NS = None if u_NS is None else sample_from_probs(probs_NV, u_NS)
    probs_NV.scatter_add_(-1, targets_N[:, None], probs_NV.new_full((len(targets_N), 1), -1.0))
    probs_NV.mul_(weight_N[:, None])
    with _autocast(x_ND.device, autocast_dtype):
        g_ND = probs_NV @ head.weight  # [n, V] @ [V, D]
    return HeadPass(ce_N, g_ND.float(), kd_NS)


class HeadResult(NamedTuple):
    """What :func:`chunked_ce_grad` returns."""

    loss_B: torch.Tensor  #: per-window mean CE
    grad_BTD: torch.Tensor  #: d(sum of window means) / d top_BTD
    kd_BTS: torch.Tensor | None  #: KD ids at every position (None without uniforms)


def chunked_ce_grad(teacher: Teacher, top_BTD: torch.Tensor, ids_BT: torch.Tensor,
                    autocast_dtype: torch.dtype | None = None, u_BTS: torch.Tensor | None = None) -> HeadResult:
    """Per-window mean CE of the head on ``top_BTD`` (after ln_f) and d(sum of window means)/d top_BTD.

    Positions are taken ``HEAD_CHUNK_TOKENS`` rows at a time (head forward, fp32 CE and
    the head's input gradient at once), so one chunk of logits exists at a time and the
    head runs once. The last position predicts nothing: its gradient is zero. With uniforms
    ``u_BTS`` KD ids are drawn at every position (the last one by a separate [B, V] head call,
    so the chunks, and hence the labels, are those of a run without KD).
    """
    B, T, D = top_BTD.shape
    loss_B = top_BTD.new_zeros(B, dtype=torch.float32)
    grad_BTD = torch.zeros(B, T, D, dtype=torch.float32, device=top_BTD.device)
    kd_BTS = None if u_BTS is None else torch.empty(u_BTS.shape, dtype=torch.int64, device=top_BTD.device)
    rows = max(1, HEAD_CHUNK_TOKENS // B)
    head = teacher.model.lm_head
    for s in range(0, T - 1, rows):
        e = min(T - 1, s + rows)
        x_ND = top_BTD[:, s:e].detach().reshape(-1, D)
        weight_N = x_ND.new_full((len(x_ND),), 1.0 / (T - 1), dtype=torch.float32)
        u_NS = None if u_BTS is None else u_BTS[:, s:e].reshape(len(x_ND), -1)
        out = head_ce_grad(head, x_ND, ids_BT[:, s + 1:e + 1].reshape(-1), weight_N, autocast_dtype, u_NS)
        loss_B += out.ce_N.view(B, e - s).sum(1)
        grad_BTD[:, s:e] = out.g_ND.view(B, e - s, D)
        if kd_BTS is not None:
            kd_BTS[:, s:e] = out.kd_NS.view(B, e - s, -1)
    if kd_BTS is not None:
        kd_BTS[:, T - 1] = sample_rows(head, top_BTD[:, T - 1].detach(), u_BTS[:, T - 1], autocast_dtype)
    return HeadResult(loss_B, grad_BTD, kd_BTS)


def sample_rows(head: torch.nn.Linear, x_nD: torch.Tensor, u_nS: torch.Tensor, autocast_dtype=None) -> torch.Tensor:
    """KD ids [n, S] from the head's fp32 softmax on ``x_nD`` (no gradient, ``HEAD_CHUNK_TOKENS`` rows at a time)."""
    out = torch.empty(u_nS.shape, dtype=torch.int64, device=x_nD.device)
    with torch.no_grad():
        for s in range(0, len(x_nD), HEAD_CHUNK_TOKENS):
            e = min(len(x_nD), s + HEAD_CHUNK_TOKENS)
            with _autocast(x_nD.device, autocast_dtype):
                logits_nV = head(x_nD[s:e])
            out[s:e] = sample_from_logits(logits_nV, u_nS[s:e])
    return out


def loss_and_grad(teacher: Teacher, h_BTD: torch.Tensor, mask, pos, ids_BT: torch.Tensor,
                  spec: AttributionSpec, u_BTS: torch.Tensor | None = None):
    """Per-window loss, ``g = d loss / d h`` through blocks ``layer+1..`` and the head only, and KD ids (with ``u_BTS``)."""
    h_leaf = h_BTD.detach().requires_grad_(True)
    n_layer = len(teacher.model.transformer.h)
    with torch.enable_grad(), _autocast(ids_BT.device, spec.autocast_dtype):
        top_BTD = run_blocks(teacher, h_leaf, mask, pos, spec.layer + 1, n_layer)
        top_BTD = teacher.model.transformer.ln_f(top_BTD)
    head = chunked_ce_grad(teacher, top_BTD, ids_BT, spec.autocast_dtype, u_BTS)
    (g_BTD,) = torch.autograd.grad(top_BTD, h_leaf, grad_outputs=head.grad_BTD.to(top_BTD.dtype))
    return head.loss_B, g_BTD.float(), head.kd_BTS


def kd_without_gradient(teacher: Teacher, h_BTD: torch.Tensor, mask, pos, u_BTS: torch.Tensor,
                        spec: AttributionSpec) -> torch.Tensor:
    """KD ids [B, T, S] when no attribution pass runs (``selection=activation``): upper blocks and head, no grad."""
    n_layer = len(teacher.model.transformer.h)
    with torch.no_grad(), _autocast(h_BTD.device, spec.autocast_dtype):
        top_BTD = teacher.model.transformer.ln_f(run_blocks(teacher, h_BTD, mask, pos, spec.layer + 1, n_layer))
    B, T, S = u_BTS.shape
    return sample_rows(teacher.model.lm_head, top_BTD.flatten(0, 1), u_BTS.flatten(0, 1), spec.autocast_dtype).view(B, T, S)


def gather_chunk_tokens(device: torch.device) -> int:
    """Rows per gather: cache-sized on CPU (the gathered [n, K, D] block stays in L2), large on GPU."""
    return GATHER_CHUNK_TOKENS if device.type == "cuda" else min(GATHER_CHUNK_TOKENS, 64)


def decoder_rows(sae: TopKSAE) -> torch.Tensor:
    """``W_dec`` as contiguous rows [L, D] (one row per latent), cached on the SAE while its weights are unchanged."""
    key = (sae.W_dec.data_ptr(), sae.W_dec._version, sae.W_dec.device)
    cached = getattr(sae, "_cocomix_rows_LD", None)
    if cached is None or cached[0] != key:
        cached = (key, sae.W_dec.detach().t().contiguous())
        sae._cocomix_rows_LD = cached
    return cached[1]


def active_scores(g_ND: torch.Tensor, W_LD: torch.Tensor, idx_NZ: torch.Tensor, val_NZ: torch.Tensor,
                  chunk: int = GATHER_CHUNK_TOKENS) -> torch.Tensor:
    """``(g . W_dec[:, idx]) * val`` for the K active latents of each row: [N, Z], by gather.

    ``W_LD`` holds the decoder columns as rows. Each chunk gathers its [n, K, D] columns
    and takes the K dot products; nothing of size [N, L] exists.
    """
    N, K = idx_NZ.shape
    out_NZ = torch.empty(N, K, dtype=g_ND.dtype, device=g_ND.device)
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        cols_nKD = W_LD.index_select(0, idx_NZ[s:e].reshape(-1)).view(e - s, K, -1)
        dots_nK = (cols_nKD * g_ND[s:e].unsqueeze(1)).sum(-1)  # faster than bmm's n matrix-vector products
        out_NZ[s:e] = dots_nK * val_NZ[s:e]
    return out_NZ


def dense_pre_scores(g_ND: torch.Tensor, W_dec_DL: torch.Tensor, pre_NL: torch.Tensor, k_attr: int):
    """Paper Eq. 1: ``(g @ W_dec) * pre`` over all latents, top ``k_attr``: ([N, K] scores, [N, K] ids)."""
    return ((g_ND @ W_dec_DL) * pre_NL).topk(k_attr, dim=-1)


def keep_positive(scores_NC: torch.Tensor, ids_NC: torch.Tensor, k_attr: int, ignore_id: int):
    """The ``k_attr`` largest strictly positive scores, best first; other slots ``ignore_id`` / 0."""
    k = min(k_attr, scores_NC.shape[-1])
    best_NK, pick_NK = scores_NC.topk(k, dim=-1)
    ids_NK = ids_NC.gather(-1, pick_NK)
    if k < k_attr:  # the SAE has fewer active latents than labels requested: pad
        pad = k_attr - k
        best_NK = F.pad(best_NK, (0, pad), value=0.0)
        ids_NK = F.pad(ids_NK, (0, pad), value=ignore_id)
    valid_NK = best_NK > 0
    return torch.where(valid_NK, best_NK, 0.0), torch.where(valid_NK, ids_NK, ignore_id)


def label_batch(teacher: Teacher, sae: TopKSAE, ids_BT: torch.Tensor, spec: AttributionSpec,
                u_BTS: torch.Tensor | None = None) -> WindowLabels:
    """Labels for a batch of equal-length windows ``ids_BT`` (each window seen alone by the teacher).

    ``u_BTS``: the uniforms of the KD samples (:func:`.kd_samples.batch_uniforms`); required when
    ``spec.kd_samples`` > 0.
    """
    B, T = ids_BT.shape
    assert (u_BTS is None) == (spec.kd_samples == 0), "KD uniforms are given exactly when KD samples are asked for"
    u_BTS = None if u_BTS is None else u_BTS.to(ids_BT.device)
    h_BTD, mask, pos = hidden_below(teacher, ids_BT, spec)
    h_finite_B = torch.isfinite(h_BTD).flatten(1).all(1)
    if spec.selection == "activation":
        loss_B, g_ND = h_BTD.new_zeros(B), None
        kd_BTS = None if u_BTS is None else kd_without_gradient(teacher, h_BTD, mask, pos, u_BTS, spec)
    else:
        loss_B, g_BTD, kd_BTS = loss_and_grad(teacher, h_BTD, mask, pos, ids_BT, spec, u_BTS)
        g_ND = g_BTD.flatten(0, 1)
    with torch.no_grad():
        scores_NK, ids_NK = select_labels(sae, h_BTD.flatten(0, 1), g_ND, spec)
    finite_B = h_finite_B & torch.isfinite(loss_B)
    return WindowLabels(ids_NK.view(B, T, -1), scores_NK.view(B, T, -1).float(), loss_B, finite_B,
                        kd_BTS, h_BTD if spec.store_hidden else None)


def select_labels(sae: TopKSAE, h_ND: torch.Tensor, g_ND: torch.Tensor | None, spec: AttributionSpec):
    """SAE encode and label choice, ``ENCODE_CHUNK_TOKENS`` rows at a time (bounds the [n, L] pre-activations)."""
    N, A = h_ND.shape[0], spec.k_attr
    scores_NK = torch.empty(N, A, dtype=torch.float32, device=h_ND.device)
    ids_NK = torch.empty(N, A, dtype=torch.int64, device=h_ND.device)
    for s in range(0, N, ENCODE_CHUNK_TOKENS):
        e = min(N, s + ENCODE_CHUNK_TOKENS)
        g_nD = None if g_ND is None else g_ND[s:e]
        scores_nC, ids_nC = _candidates(sae, h_ND[s:e], g_nD, spec)
        scores_NK[s:e], ids_NK[s:e] = keep_positive(scores_nC.float(), ids_nC, A, spec.ignore_id)
    return scores_NK, ids_NK


def _candidates(sae: TopKSAE, h_nD: torch.Tensor, g_nD: torch.Tensor | None, spec: AttributionSpec):
    """Candidate (scores, ids) per token: activations, the K active latents' attributions, or the dense top ``k_attr`` (pre)."""
    pre_mode = g_nD is not None and spec.attribution_input == "pre"
    enc = sae.encode(h_nD, dense=pre_mode)
    if g_nD is None:
        return enc.top_val, enc.top_idx
    if pre_mode:
        return dense_pre_scores(g_nD, sae.W_dec.detach(), enc.pre, spec.k_attr)
    chunk = gather_chunk_tokens(g_nD.device)
    return active_scores(g_nD, decoder_rows(sae), enc.top_idx, enc.top_val, chunk), enc.top_idx
