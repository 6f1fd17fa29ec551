"""The CoCoMix student (docs/ARCHITECTURE.md, stage 2): a GPT-2 that predicts SAE concepts and mixes them back in.

Follows the official ``modeling_gpt2_cocomix.py`` (facebookresearch/RAM, projects/cocomix):

1. blocks ``0 .. insert_layer-1`` run on the T token positions, as in GPT-2;
2. at the input of block ``insert_layer``: ``x, mu, std = LN_unbiased(h)``, ``x -= b_pre``,
   concept logits ``z = W_pred x + b_pred`` over the SAE's L latents;
3. keep the top-C raw logits (no ReLU) and compress them into one continuous concept
   ``c = (W_comp z~ + b_comp + b_pre) * std + mu``. Only C of W_comp's L columns matter, so
   we gather them (``F.embedding_bag``) instead of the official dense ``[.., L] @ [L, D]``;
4. interleave ``[h_1, c_1, h_2, c_2, ...]`` (2T positions) and run the upper blocks causally.
   Position embeddings are added once at the input, as in the official code: ``c_t`` gets no
   position embedding of its own, it inherits position ``t`` through ``h_t``;
5. next-token logits come from the ``c`` positions -> ``ln_f`` -> tied ``lm_head``.

Ablations (paper §3) are settings of the same class, each a small piece chosen once in
``__init__`` or looked up in a table, never a branch of ``forward``: ``mix`` picks how ``c``
enters the stream (:data:`MIXES`: interleave, ``add`` = ``h + c`` on T positions, ``none`` =
prediction only, no compression layer at all), ``concept_target="hidden"`` swaps the concept
head for a 2-layer MLP that predicts the teacher's hidden state (:mod:`.hidden_target`).

Loss = CE_ntp + lam * concept CE. Officially the concept CE is ``(1/K) sum_i mean_t CE(z_t, label_ti)``,
i.e. the mean over all (t, i) label slots. Here slots holding ``ignore_id`` (see docs/ARCHITECTURE.md)
are dropped and the mean is over the remaining slots; with no ignored slot both are equal.

Shape legend: B batch, T tokens, S = 2T interleaved positions, D width, H heads, E head width,
V vocabulary, L SAE latents, C = k_concept kept logits, K = k_attr labels per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from cocomix.core.layernorm import Normalized, layernorm_unbiased
from cocomix.stage2_pretrain.hidden_target import HiddenBottleneck, HiddenPredictor


class CoCoMixConfig(PretrainedConfig):
    """GPT-2 fields plus the concept settings. ``concept_provenance`` records where the labels came from."""

    model_type = "cocomix"
    attribute_map = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                     "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}

    def __init__(self, vocab_size: int = 50257, n_positions: int = 1024, n_embd: int = 768, n_layer: int = 12,
                 n_head: int = 12, dropout: float = 0.0, layer_norm_epsilon: float = 1e-5,
                 initializer_range: float = 0.02, insert_layer: int = 5, n_latents: int = 32768,
                 k_concept: int = 32, k_attr: int = 4, lam: float = 0.1, ignore_id: int = 65535,
                 concept_provenance: dict | None = None, tie_word_embeddings: bool = True,
                 mix: str = "interleave", concept_target: str = "concepts", hidden_loss: str = "cosine",
                 d_teacher: int = 0, **kwargs):
        self.vocab_size, self.n_positions, self.n_embd = vocab_size, n_positions, n_embd
        self.n_layer, self.n_head, self.dropout = n_layer, n_head, dropout
        self.layer_norm_epsilon, self.initializer_range = layer_norm_epsilon, initializer_range
        self.insert_layer, self.n_latents, self.k_concept = insert_layer, n_latents, k_concept
        self.k_attr, self.lam, self.ignore_id = k_attr, lam, ignore_id
        self.concept_provenance = concept_provenance or {}
        self.mix, self.concept_target, self.hidden_loss, self.d_teacher = mix, concept_target, hidden_loss, d_teacher
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        assert n_embd % n_head == 0, "n_embd must be a multiple of n_head"
        assert 0 <= insert_layer < n_layer, "insert_layer must name a block"
        assert 0 < k_concept <= n_latents, "k_concept must be in 1..n_latents"
        assert mix in MIXES, f"mix must be one of {', '.join(MIXES)}"
        assert concept_target in ("concepts", "hidden"), "concept_target must be concepts or hidden"


@dataclass
class CoCoMixOutput(ModelOutput):
    """``loss = ntp_loss + lam * concept_loss`` (each None when its labels were not given)."""

    loss: torch.Tensor | None = None
    ntp_loss: torch.Tensor | None = None
    concept_loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None  #: [B, T, V], from the concept positions
    concept_logits: torch.Tensor | None = None  #: [B, T, L], raw z (before the top-C mask)


class ConceptStep(NamedTuple):
    """What the concept bottleneck computes at ``insert_layer``."""

    z_BTL: torch.Tensor  #: concept logits over all latents
    top_idx_BTC: torch.Tensor  #: latents kept (top-C of z)
    top_val_BTC: torch.Tensor  #: their raw logits
    c_BTD: torch.Tensor | None  #: the continuous concept, back in the residual stream's scale (None: prediction only)
    loss: torch.Tensor | None = None  #: concept CE (when labels were given)


# ----------------------------------------------------------------------------- GPT-2 block
class SelfAttention(nn.Module):
    """Causal multi-head attention through ``F.scaled_dot_product_attention`` (flash/SDPA kernels)."""

    def __init__(self, cfg: CoCoMixConfig):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.c_proj.is_residual_proj = True  # scaled init, see CoCoMixForCausalLM._init_weights
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q_BSD, k_BSD, v_BSD = self.c_attn(x_BSD).split(D, dim=2)
        q_BHSE, k_BHSE, v_BHSE = (t.view(B, S, self.n_head, D // self.n_head).transpose(1, 2)
                                  for t in (q_BSD, k_BSD, v_BSD))
        p = self.dropout if self.training else 0.0
        y_BHSE = F.scaled_dot_product_attention(q_BHSE, k_BHSE, v_BHSE, dropout_p=p, is_causal=True)
        y_BSD = y_BHSE.transpose(1, 2).reshape(B, S, D)
        return self.resid_dropout(self.c_proj(y_BSD))


class MLP(nn.Module):
    """GPT-2's 4d MLP with tanh-approximated GELU (``gelu_new``)."""

    def __init__(self, cfg: CoCoMixConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.c_proj.is_residual_proj = True
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x_BSD), approximate="tanh")))


class Block(nn.Module):
    """Pre-LN transformer block, GPT-2 layout (same parameter count as ``GPT2Block``)."""

    def __init__(self, cfg: CoCoMixConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.attn = SelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.mlp = MLP(cfg)

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        x_BSD = x_BSD + self.attn(self.ln_1(x_BSD))
        return x_BSD + self.mlp(self.ln_2(x_BSD))


# ----------------------------------------------------------------------------- concept bottleneck
class ConceptPredictor(nn.Module):
    """Concept logits from ``h`` and their loss, nothing mixed back (``mix="none"``: prediction only).

    Only the loss is needed, so the fused :class:`SelectAndScore` runs with a top-1 selection
    that nothing reads (cheaper than the autograd loss, which passes over z about ten times).
    """

    def __init__(self, cfg: CoCoMixConfig):
        super().__init__()
        self.k_concept, self.ignore_id = cfg.k_concept, cfg.ignore_id
        self.pre_bias = nn.Parameter(torch.zeros(cfg.n_embd))  # b_pre
        self.predictor = nn.Linear(cfg.n_embd, cfg.n_latents)  # W_pred, b_pred

    def forward(self, h_BTD: torch.Tensor, concept_ids: torch.Tensor | None = None, **_) -> ConceptStep:
        norm = layernorm_unbiased(h_BTD)
        z_BTL = self.predictor(norm.x - self.pre_bias)
        if concept_ids is None:
            return ConceptStep(z_BTL, None, None, None, None)
        _, _, loss = SelectAndScore.apply(z_BTL, concept_ids, 1, self.ignore_id)
        return ConceptStep(z_BTL, None, None, None, loss)


class ConceptBottleneck(ConceptPredictor):
    """Predict concept logits from ``h`` and compress the top-C of them into one vector ``c``.

    ``compress.weight`` is W_comp stored transposed, ``[L, D]`` (row j = the official column
    ``W_comp[:, j]``), so that gathering C rows per token is one ``embedding_bag`` call.
    """

    def __init__(self, cfg: CoCoMixConfig):
        super().__init__(cfg)
        self.compress = nn.Embedding(cfg.n_latents, cfg.n_embd)  # W_comp^T
        self.compress_bias = nn.Parameter(torch.zeros(cfg.n_embd))  # b_comp

    def forward(self, h_BTD: torch.Tensor, concept_ids: torch.Tensor | None = None, **_) -> ConceptStep:
        """With labels ``concept_ids`` [B, T, K] the top-C selection and the concept CE share one fused pass over z."""
        ids_BTK = concept_ids
        norm = layernorm_unbiased(h_BTD)
        z_BTL = self.predictor(norm.x - self.pre_bias)
        if ids_BTK is None:
            (top_val_BTC, top_idx_BTC), loss = z_BTL.topk(self.k_concept, dim=-1), None
        else:
            top_val_BTC, top_idx_BTC, loss = SelectAndScore.apply(z_BTL, ids_BTK, self.k_concept, self.ignore_id)
        c_BTD = self.compress_sparse(top_idx_BTC, top_val_BTC, norm)
        return ConceptStep(z_BTL, top_idx_BTC, top_val_BTC, c_BTD, loss)

    def compress_sparse(self, idx_BTC: torch.Tensor, val_BTC: torch.Tensor, norm: Normalized) -> torch.Tensor:
        """``c = (sum_j val_j W_comp[:, idx_j] + b_comp + b_pre) * std + mu``; touches C rows, not L."""
        B, T, C = idx_BTC.shape
        mixed_ND = F.embedding_bag(idx_BTC.reshape(B * T, C), self.compress.weight,
                                   per_sample_weights=val_BTC.reshape(B * T, C).to(self.compress.weight.dtype),
                                   mode="sum")
        return self._denormalize(mixed_ND.view(B, T, -1), norm)

    def compress_dense(self, z_BTL: torch.Tensor, norm: Normalized) -> torch.Tensor:
        """The official formula ``compress_layer(mask * z)``: the reference for :meth:`compress_sparse`."""
        top_idx_BTC = z_BTL.topk(self.k_concept, dim=-1).indices
        mask_BTL = torch.zeros_like(z_BTL, dtype=torch.bool).scatter_(-1, top_idx_BTC, True)
        return self._denormalize((mask_BTL * z_BTL) @ self.compress.weight, norm)

    def _denormalize(self, mixed_BTD: torch.Tensor, norm: Normalized) -> torch.Tensor:
        return (mixed_BTD + self.compress_bias + self.pre_bias) * norm.std + norm.mu


# ----------------------------------------------------------------------------- the model
class GPT2Body(nn.Module):
    """Embeddings, blocks and final LayerNorm; named as in HF GPT-2 (``transformer.wte`` ...)."""

    def __init__(self, cfg: CoCoMixConfig):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)


def interleave(h_BTD: torch.Tensor, c_BTD: torch.Tensor) -> torch.Tensor:
    """``[h_1, c_1, h_2, c_2, ...]``: even positions hold tokens, odd positions concepts."""
    B, T, D = h_BTD.shape
    return torch.stack([h_BTD, c_BTD.to(h_BTD.dtype)], dim=2).view(B, 2 * T, D)  # [B, T, 2, D] -> [B, S, D]


class Mixed(NamedTuple):
    """The upper blocks' input and which of its positions feed the head."""

    x_BSD: torch.Tensor
    read: slice


#: how ``c`` enters the residual stream at ``insert_layer`` (paper §3): insertion, intervention, prediction only
MIXES = {
    "interleave": lambda h_BTD, c_BTD: Mixed(interleave(h_BTD, c_BTD), slice(1, None, 2)),  # odd = c_t
    "add": lambda h_BTD, c_BTD: Mixed(h_BTD + c_BTD.to(h_BTD.dtype), slice(None)),
    "none": lambda h_BTD, c_BTD: Mixed(h_BTD, slice(None)),
}

#: the module at ``insert_layer``, by (concept_target, whether c is mixed in)
BOTTLENECKS = {("concepts", True): ConceptBottleneck, ("concepts", False): ConceptPredictor,
               ("hidden", True): HiddenBottleneck, ("hidden", False): HiddenPredictor}


def init_gpt2_weights(module: nn.Module, cfg) -> None:
    """GPT-2 init: N(0, 0.02) weights, zero biases, residual projections scaled by 1/sqrt(2 n_layer).

    Uses ``transformers.initialization`` so that ``from_pretrained`` never re-initialises loaded weights.
    """
    std = cfg.initializer_range
    if getattr(module, "is_residual_proj", False):  # (HF skips modules without own parameters)
        std = std / math.sqrt(2 * cfg.n_layer)
    if isinstance(module, (nn.Linear, nn.Embedding)):
        init.normal_(module.weight, mean=0.0, std=std)
    if isinstance(module, nn.Linear) and module.bias is not None:
        init.zeros_(module.bias)
    if isinstance(module, nn.LayerNorm):
        init.ones_(module.weight)
        init.zeros_(module.bias)


class CoCoMixForCausalLM(PreTrainedModel):
    """CoCoMix student; ``forward(input_ids, labels, concept_ids)`` -> :class:`CoCoMixOutput`."""

    config_class = CoCoMixConfig
    base_model_prefix = "transformer"
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _supports_sdpa = True

    def __init__(self, config: CoCoMixConfig):
        super().__init__(config)
        self.transformer = GPT2Body(config)
        self.concept = BOTTLENECKS[(config.concept_target, config.mix != "none")](config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _init_weights(self, module: nn.Module) -> None:
        init_gpt2_weights(module, self.config)
        for name in ("pre_bias", "compress_bias"):
            if isinstance(getattr(module, name, None), nn.Parameter):
                init.zeros_(getattr(module, name))

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                concept_ids: torch.Tensor | None = None, teacher_hidden: torch.Tensor | None = None,
                **kwargs) -> CoCoMixOutput:
        """``labels`` = ``input_ids`` (HF convention, shifted here; -100 ignored); ``concept_ids`` [B, T, K]
        (or, with ``concept_target="hidden"``, ``teacher_hidden`` [B, T, d_teacher]).

        Windows are full (no padding mask); other HF keyword arguments are accepted and ignored.
        """
        cfg, body = self.config, self.transformer
        pos_T = torch.arange(input_ids.shape[1], device=input_ids.device)
        h_BTD = body.drop(body.wte(input_ids) + body.wpe(pos_T))
        for block in body.h[:cfg.insert_layer]:
            h_BTD = block(h_BTD)
        step = self.concept(h_BTD, concept_ids=concept_ids, teacher_hidden=teacher_hidden)
        x_BSD, read = MIXES[cfg.mix](h_BTD, step.c_BTD)
        for block in body.h[cfg.insert_layer:]:
            x_BSD = block(x_BSD)
        logits_BTV = self.lm_head(body.ln_f(x_BSD[:, read]))  # interleave: odd positions = concepts c_t
        ntp_loss = None if labels is None else next_token_loss(logits_BTV, labels)
        return CoCoMixOutput(loss=combine(ntp_loss, step.loss, cfg.lam), ntp_loss=ntp_loss,
                             concept_loss=step.loss, logits=logits_BTV, concept_logits=step.z_BTL)

    def predict_concepts(self, input_ids: torch.Tensor) -> ConceptStep:
        """The concept step of ``forward`` alone (blocks below ``insert_layer`` only): z and its top-C."""
        body = self.transformer
        pos_T = torch.arange(input_ids.shape[1], device=input_ids.device)
        h_BTD = body.drop(body.wte(input_ids) + body.wpe(pos_T))
        for block in body.h[:self.config.insert_layer]:
            h_BTD = block(h_BTD)
        return self.concept(h_BTD)


# ----------------------------------------------------------------------------- losses
def next_token_loss(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Mean CE of position t against label t+1 (HF's convention), fp32, ``-100`` ignored.

    Shifts the labels, not the logits: ``logits[:, :-1]`` would copy the [B, T, V] tensor.
    """
    V = logits_BTV.size(-1)
    next_BT = F.pad(labels_BT[:, 1:], (0, 1), value=-100)
    return F.cross_entropy(logits_BTV.float().reshape(-1, V), next_BT.reshape(-1), ignore_index=-100)


def concept_ce(z_BTL: torch.Tensor, ids_BTK: torch.Tensor, ignore_id: int) -> torch.Tensor:
    """Mean over valid label slots of ``CE(z_t, label_ti) = logsumexp(z_t) - z_t[label_ti]``.

    The plain autograd reference of :class:`SelectAndScore`'s loss. All slots ignored -> 0, not NaN.
    """
    valid_BTK = ids_BTK != ignore_id
    z_BTL = z_BTL.float()
    lse_BT1 = torch.logsumexp(z_BTL, dim=-1, keepdim=True)
    picked_BTK = z_BTL.gather(-1, torch.where(valid_BTK, ids_BTK, 0).long())
    ce_BTK = torch.where(valid_BTK, lse_BT1 - picked_BTK, 0.0)
    return ce_BTK.sum() / valid_BTK.sum().clamp(min=1)


class SelectAndScore(torch.autograd.Function):
    """``z.topk(C)`` and :func:`concept_ce` with one hand-written backward.

    z is the model's largest tensor (16 x 1024 x 32768 per micro-batch at 69m) and every pass over
    it costs about as much as a block. Autograd would run ~10 passes in backward (softmax, two
    zero-filled scatters for gather and topk, their sums); here: one chunked ``softmax * coef``
    pass plus two sparse ``scatter_add_``. Checked against the autograd reference in the tests.
    """

    CHUNK = 2048  #: rows per fp32 temporary (bounds memory under bf16 autocast)

    @staticmethod
    def forward(ctx, z_BTL, ids_BTK, k: int, ignore_id: int):
        top_val_BTC, top_idx_BTC = z_BTL.topk(k, dim=-1)
        valid_BTK = ids_BTK != ignore_id
        safe_BTK = torch.where(valid_BTK, ids_BTK, 0).long()
        lse_BT = torch.cat([torch.logsumexp(zc.float(), -1) for zc in z_BTL.flatten(0, 1).split(SelectAndScore.CHUNK)])
        lse_BT = lse_BT.view(z_BTL.shape[:2])
        n_valid = valid_BTK.sum().clamp(min=1)
        ce_BTK = torch.where(valid_BTK, lse_BT[..., None] - z_BTL.gather(-1, safe_BTK).float(), 0.0)
        ctx.save_for_backward(z_BTL, lse_BT, safe_BTK, valid_BTK, top_idx_BTC, n_valid)
        ctx.mark_non_differentiable(top_idx_BTC)
        return top_val_BTC, top_idx_BTC, ce_BTK.sum() / n_valid

    @staticmethod
    def backward(ctx, g_val_BTC, _g_idx, g_loss):
        z_BTL, lse_BT, safe_BTK, valid_BTK, top_idx_BTC, n_valid = ctx.saved_tensors
        scale = g_loss / n_valid  # d loss / d CE of each valid slot
        coef_BT = valid_BTK.sum(-1) * scale  # d loss / d lse_t
        grad_BTL = torch.empty_like(z_BTL)
        rows = (t.flatten(0, 1).split(SelectAndScore.CHUNK) for t in (grad_BTL, z_BTL, lse_BT, coef_BT))
        for g_NL, z_NL, lse_N, coef_N in zip(*rows):  # softmax(z) * coef, chunk by chunk
            if g_NL.dtype == torch.float32:  # straight into the gradient buffer
                torch.sub(z_NL, lse_N[:, None], out=g_NL).exp_().mul_(coef_N[:, None])
            else:  # bf16/fp16: through an fp32 chunk
                g_NL.copy_((z_NL.float() - lse_N[:, None]).exp_().mul_(coef_N[:, None]))
        grad_BTL.scatter_add_(-1, safe_BTK, (-scale * valid_BTK).to(grad_BTL.dtype))
        if g_val_BTC is not None:
            grad_BTL.scatter_add_(-1, top_idx_BTC, g_val_BTC.to(grad_BTL.dtype))
        return grad_BTL, None, None, None


def combine(ntp_loss: torch.Tensor | None, concept_loss: torch.Tensor | None, lam: float) -> torch.Tensor | None:
    """``ntp + lam * concept``; either part may be missing (e.g. evaluation without labels)."""
    if ntp_loss is None:
        return None if concept_loss is None else lam * concept_loss
    return ntp_loss if concept_loss is None else ntp_loss + lam * concept_loss


AutoConfig.register("cocomix", CoCoMixConfig)
AutoModelForCausalLM.register(CoCoMixConfig, CoCoMixForCausalLM)

# The pause student reuses this file's body and registers itself; importing it here registers both
# students wherever one is (every name it needs is defined above).
from cocomix.stage2_pretrain import model_pause  # noqa: E402,F401
