"""The student's hand-written GPT-2 block stack (``stage2_pretrain/model.py``: SDPA attention, nn.Linear
layout) against HF ``GPT2Block`` (eager attention, Conv1D layout) with the same weights: the logits
and the gradient of every parameter agree."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from transformers import GPT2Config, GPT2LMHeadModel

from cocomix.stage2_pretrain.model import CoCoMixConfig, CoCoMixForCausalLM

V, T = 97, 24
LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # nn.Linear here, Conv1D (transposed) in HF


def student(seed: int = 0) -> CoCoMixForCausalLM:
    torch.manual_seed(seed)
    cfg = CoCoMixConfig(vocab_size=V, n_positions=32, n_embd=32, n_layer=3, n_head=4, insert_layer=1, n_latents=16,
                        k_concept=4, k_attr=2)
    model = CoCoMixForCausalLM(cfg).eval()
    with torch.no_grad():  # non-zero biases and LayerNorm affines, so that every weight matters
        for name, p in model.transformer.named_parameters():
            if name.endswith("bias") or ".ln_" in name or name.startswith("ln_f"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def hf_twin(model: CoCoMixForCausalLM) -> GPT2LMHeadModel:
    """A stock GPT2LMHeadModel holding the student's body weights (Conv1D weights = Linear weights transposed)."""
    c = model.config
    cfg = GPT2Config(vocab_size=V, n_positions=c.n_positions, n_embd=c.n_embd, n_layer=c.n_layer, n_head=c.n_head,
                     activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     layer_norm_epsilon=c.layer_norm_epsilon)
    cfg._attn_implementation = "eager"
    hf = GPT2LMHeadModel(cfg).eval()
    hf_params = dict(hf.transformer.named_parameters())
    with torch.no_grad():
        for name, p in model.transformer.named_parameters():
            hf_params[name].copy_(p.t() if _is_linear_weight(name) else p)
    return hf


def _is_linear_weight(name: str) -> bool:
    return name.endswith(".weight") and any(f".{lin}." in f".{name}" for lin in LINEARS)


def block_stack(model: CoCoMixForCausalLM, ids_BT: torch.Tensor) -> torch.Tensor:
    """The student's embeddings, blocks, final LayerNorm and tied head, on T token positions."""
    body = model.transformer
    h_BTD = body.wte(ids_BT) + body.wpe(torch.arange(ids_BT.shape[1]))
    for block in body.h:
        h_BTD = block(h_BTD)
    return model.lm_head(body.ln_f(h_BTD))


@pytest.mark.parametrize("seed", [0, 1])
def test_block_stack_equals_hf_gpt2_blocks_in_logits_and_gradients(seed):
    model = student(seed)
    hf = hf_twin(model)
    ids_BT = torch.randint(0, V, (3, T), generator=torch.Generator().manual_seed(seed))
    ours, theirs = block_stack(model, ids_BT), hf(ids_BT).logits
    assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    for logits in (ours, theirs):
        F.cross_entropy(logits[:, :-1].reshape(-1, V), ids_BT[:, 1:].reshape(-1)).backward()
    hf_params = dict(hf.transformer.named_parameters())
    checked = 0
    for name, p in model.transformer.named_parameters():
        want = hf_params[name].grad
        assert p.grad is not None and want is not None, name
        assert_close(p.grad, want.t() if _is_linear_weight(name) else want, rtol=1e-4, atol=1e-6, msg=name)
        checked += 1
    assert checked == 2 + 3 * 12 + 2  # wte, wpe; 12 tensors per block; ln_f
    assert hf.lm_head.weight is hf.transformer.wte.weight and model.lm_head.weight is model.transformer.wte.weight
