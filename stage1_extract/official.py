"""The official extractor's arithmetic, written out plainly: the one reference that the tests check
:func:`~cocomix.stage1_extract.attribution.label_batch` against and ``bench/extract.py`` times.

It follows RAM ``projects/cocomix/models/concept_extractor.py`` (``TransformerLensSAE``): a
TransformerLens ``HookedTransformer.from_pretrained("gpt2")`` teacher (default weight processing:
LayerNorms folded, writing weights and unembedding centred), forward and backward hooks on
``blocks.{layer}.hook_resid_post``, the mean next-token cross-entropy over the batch,
``loss.backward()`` with every parameter requiring grad, OpenAI's SAE encode
(openai/sparse_autoencoder ``Autoencoder.encode``: unbiased LayerNorm, TopK, ReLU), the dense
``(grad_x @ W_dec) * latents`` over all latents, and ``torch.topk``. The same steps on the stock HF
GPT-2 (:func:`hf_grad`) give the same labels: every reader of the residual stream goes through a
LayerNorm, so TransformerLens' centring does not move them (a test checks this).

Shape legend: B windows, T tokens, D width, L SAE latents, A labels per token.
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn.functional as F


def sae_state(sae) -> dict:
    """A :class:`~cocomix.stage1_extract.sae.model.TopKSAE` as an OpenAI state dict (the keys ``openai_encode`` reads)."""
    return {"encoder.weight": sae.W_enc.detach(), "latent_bias": sae.b_enc.detach(), "decoder.weight": sae.W_dec.detach(),
            "pre_bias": sae.b_pre.detach(), "activation_state_dict": {"k": sae.k}}


def openai_encode(state: dict, x_BTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """openai/sparse_autoencoder ``Autoencoder.encode`` with TopK + ReLU: (dense latents, pre-activations), [B, T, L]."""
    mu = x_BTD.mean(-1, keepdim=True)
    x = x_BTD - mu
    std = x.std(-1, keepdim=True)  # unbiased, as OpenAI's LN
    x = x / (std + 1e-5)
    pre_BTL = F.linear(x - state["pre_bias"], state["encoder.weight"], state["latent_bias"])
    vals, idx = torch.topk(pre_BTL, state["activation_state_dict"]["k"], dim=-1)
    latents_BTL = torch.zeros_like(pre_BTL).scatter_(-1, idx, F.relu(vals))
    return latents_BTL, pre_BTL


def official_labels(scores_BTL: torch.Tensor, k_attr: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk`` over the dense attribution: (values, latent ids), [B, T, A]."""
    return torch.topk(scores_BTL, k_attr, dim=-1)


def official_attribution(state: dict, x_BTD: torch.Tensor, grad_BTD: torch.Tensor, k_attr: int):
    """``(grad_x @ W_dec) * latents`` and its top ``k_attr``: (values, latent ids)."""
    latents_BTL, _ = openai_encode(state, x_BTD)
    return official_labels(torch.matmul(grad_BTD, state["decoder.weight"]) * latents_BTL, k_attr)


def mean_next_token_ce(logits_BTV: torch.Tensor, ids_BT: torch.Tensor) -> torch.Tensor:
    """``compute_loss`` of the official extractor: one mean over every (window, position) of the batch."""
    return F.cross_entropy(logits_BTV[..., :-1, :].reshape(-1, logits_BTV.shape[-1]).float(), ids_BT[..., 1:].reshape(-1))


def hf_grad(model, ids_BT: torch.Tensor, layer: int, *, copy_model: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The output of HF GPT-2 block ``layer`` and its gradient, from a full forward and ``loss.backward()``
    with every parameter requiring grad (gradients are left in place, as the official code never zeroes them)."""
    model = copy.deepcopy(model).requires_grad_(True) if copy_model else model
    cache = {}

    def hook(module, inputs, output):
        out = output[0] if isinstance(output, tuple) else output
        out.retain_grad()
        cache["x"] = out

    handle = model.transformer.h[layer].register_forward_hook(hook)
    try:
        mean_next_token_ce(model(ids_BT).logits, ids_BT).backward()
    finally:
        handle.remove()
    return cache["x"].detach(), cache["x"].grad.detach()


def tl_teacher_from_hf(hf_model):
    """``HookedTransformer.from_pretrained`` on an HF GPT-2 held in memory (no hub access): TransformerLens'
    own GPT-2 weight conversion and its default processing (fold LN, centre writing weights and unembedding)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights

    c = hf_model.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
        d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LNPre", eps=c.layer_norm_epsilon,
        original_architecture="GPT2LMHeadModel", device="cpu", default_prepend_bos=False,
    )
    with warnings.catch_warnings():  # 3.x announces TransformerBridge; the official code uses HookedTransformer
        warnings.simplefilter("ignore", DeprecationWarning)
        model = HookedTransformer(cfg)
    model.load_and_process_state_dict(convert_gpt2_weights(hf_model, cfg))
    return model.train(False)


def tl_grad(model, ids_BT: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``TransformerLensSAE.get_cache_fwd_and_bwd``: fwd and bwd hooks on ``blocks.{layer}.hook_resid_post``."""
    name, cache, grad_cache = f"blocks.{layer}.hook_resid_post", {}, {}
    model.reset_hooks()
    model.add_hook(name, lambda act, hook: cache.__setitem__(hook.name, act.detach()), "fwd")
    model.add_hook(name, lambda act, hook: grad_cache.__setitem__(hook.name, act.detach()), "bwd")
    try:
        mean_next_token_ce(model(ids_BT), ids_BT).backward()
    finally:
        model.reset_hooks()
    return cache[name], grad_cache[name]
