"""KV-cached decoding of students that interleave one vector after every token.

The CoCoMix forward (:mod:`.model`) runs the lower blocks on T token positions and the upper
blocks on the 2T interleaved positions ``[h_1, c_1, h_2, c_2, ...]``. Decoding one more token
therefore costs one position in each lower block and two (``h_t``, then ``c_t``) in each upper
block, against the keys and values cached for everything before: :class:`InterleavedDecoder`.

What is interleaved is a function of the hidden state at ``insert_layer`` (``insert``): the
CoCoMix concept ``c_t`` here, a learned pause vector for a pause-token student, a steered
concept for ``cocomix steer``. The blocks are the model's own modules; only the attention is
re-assembled to take past keys and values (:func:`block_step`). Its reference is the model's
uncached forward (the tests compare their logits at every step).

Shape legend: B batch, N new positions in this call, S positions cached so far (this call's
included), D width, H heads, E head width, V vocabulary.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from cocomix.stage2_pretrain.model import Block, interleave


class KVCache:
    """Keys and values ``[B, H, S, E]`` of every position each block has seen, in buffers
    allocated once per block at ``capacity[i]`` positions (no re-copying as the sequence grows)."""

    def __init__(self, capacity: list[int]):
        self.capacity = capacity
        self.keys: list[torch.Tensor | None] = [None] * len(capacity)
        self.values: list[torch.Tensor | None] = [None] * len(capacity)
        self.lengths = [0] * len(capacity)

    def extend(self, i: int, k_BHNE: torch.Tensor, v_BHNE: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append N positions to block ``i``; returns all its keys and values so far."""
        start, N = self.lengths[i], k_BHNE.shape[2]
        assert start + N <= self.capacity[i], f"KV cache of block {i} holds {self.capacity[i]} positions, {start + N} asked"
        if self.keys[i] is None:
            B, H, _, E = k_BHNE.shape
            self.keys[i] = k_BHNE.new_empty(B, H, self.capacity[i], E)
            self.values[i] = v_BHNE.new_empty(B, H, self.capacity[i], E)
        self.keys[i][:, :, start:start + N] = k_BHNE
        self.values[i][:, :, start:start + N] = v_BHNE
        self.lengths[i] = start + N
        return self.keys[i][:, :, :start + N], self.values[i][:, :, :start + N]


def attend(q_BHNE: torch.Tensor, k_BHSE: torch.Tensor, v_BHSE: torch.Tensor) -> torch.Tensor:
    """Causal attention of N new queries over S keys, the last N of which are the queries' own.

    ``is_causal`` aligns the mask top-left, which is right only without a past; with a past and
    several new positions (the ``h_t, c_t`` pair) the mask is written out.
    """
    N, S = q_BHNE.shape[2], k_BHSE.shape[2]
    if S == N:
        return F.scaled_dot_product_attention(q_BHNE, k_BHSE, v_BHSE, is_causal=True)
    mask_NS = None if N == 1 else torch.ones(N, S, dtype=torch.bool, device=q_BHNE.device).tril(S - N)
    return F.scaled_dot_product_attention(q_BHNE, k_BHSE, v_BHSE, attn_mask=mask_NS)


def block_step(block: Block, x_BND: torch.Tensor, cache: KVCache, i: int) -> torch.Tensor:
    """``block(x)`` for N new positions given the cached past of block ``i`` (eval mode: no dropout)."""
    attn = block.attn
    B, N, D = x_BND.shape
    q_BND, k_BND, v_BND = attn.c_attn(block.ln_1(x_BND)).split(D, dim=2)
    q_BHNE, k_BHNE, v_BHNE = (t.view(B, N, attn.n_head, D // attn.n_head).transpose(1, 2) for t in (q_BND, k_BND, v_BND))
    k_BHSE, v_BHSE = cache.extend(i, k_BHNE, v_BHNE)
    y_BND = attend(q_BHNE, k_BHSE, v_BHSE).transpose(1, 2).reshape(B, N, D)
    x_BND = x_BND + attn.c_proj(y_BND)
    return x_BND + block.mlp(block.ln_2(x_BND))


class InterleavedDecoder:
    """Feed new tokens, get next-token logits; keeps the KV cache of a model that interleaves
    ``insert(h)`` after every token at ``insert_layer`` and reads logits at the inserted positions.

    ``model`` needs CoCoMix's layout: ``transformer.{wte, wpe, drop, h, ln_f}``, ``lm_head`` and
    ``config.{insert_layer, n_positions}``.
    """

    def __init__(self, model, insert: Callable[[torch.Tensor], torch.Tensor]):
        cfg = model.config
        self.model, self.insert, self.split = model, insert, cfg.insert_layer
        self.cache = KVCache([cfg.n_positions] * cfg.insert_layer + [2 * cfg.n_positions] * (cfg.n_layer - cfg.insert_layer))
        self.length = 0  #: tokens fed so far

    @torch.no_grad()
    def __call__(self, ids_BN: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, N, V]`` after each of the N new tokens (positions continue from the cache)."""
        body, L = self.model.transformer, self.split
        pos_N = torch.arange(self.length, self.length + ids_BN.shape[1], device=ids_BN.device)
        h_BND = body.drop(body.wte(ids_BN) + body.wpe(pos_N))
        for i, block in enumerate(body.h[:L]):
            h_BND = block_step(block, h_BND, self.cache, i)
        x_BMD = interleave(h_BND, self.insert(h_BND))  # M = 2N: h_t, then the inserted vector
        for i, block in enumerate(body.h[L:], start=L):
            x_BMD = block_step(block, x_BMD, self.cache, i)
        self.length += ids_BN.shape[1]
        return self.model.lm_head(body.ln_f(x_BMD[:, 1::2]))
