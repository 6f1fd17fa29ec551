"""Tiny random students shared by the generate and steer tests (built here, nothing downloaded)."""
from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from cocomix.stage2_pretrain.model import CoCoMixConfig, CoCoMixForCausalLM

V, L, C, CONTEXT = 97, 48, 6, 40


def cocomix(insert_layer: int = 1, vocab: int = V, seed: int = 0) -> CoCoMixForCausalLM:
    torch.manual_seed(seed)
    cfg = CoCoMixConfig(vocab_size=vocab, n_positions=CONTEXT, n_embd=32, n_layer=3, n_head=4, insert_layer=insert_layer,
                        n_latents=L, k_concept=C, k_attr=4)
    model = CoCoMixForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero biases: every term of the concept step matters
        model.concept.pre_bias.normal_(0, 0.1)
        model.concept.compress_bias.normal_(0, 0.1)
    return model


def ntp(vocab: int = V, seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_positions=CONTEXT, n_embd=32, n_layer=3, n_head=4, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def prompt(B: int = 1, T: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))
