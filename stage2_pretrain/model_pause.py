"""The pause-token student (paper §3 baseline): CoCoMix's architecture with ``c_t`` replaced by
one learned vector, and no concept head or loss.

1. blocks ``0 .. insert_layer-1`` run on the T token positions, as in GPT-2;
2. at the input of block ``insert_layer`` the sequence becomes ``[h_1, p, h_2, p, ...]`` (2T
   positions; ``p`` is one learned vector, the same at every position, with no position
   embedding of its own, as ``c_t`` in CoCoMix);
3. the upper blocks run causally on 2T positions; next-token logits come from the ``p``
   positions -> ``ln_f`` -> tied ``lm_head``.

So the pause student gets CoCoMix's extra compute (upper blocks on 2T positions) without any
teacher signal: the baseline that separates "more compute per token" from "concepts".
Registered with ``AutoModelForCausalLM`` (``model_type = "cocomix-pause"``).

Shape legend: B batch, T tokens, S = 2T interleaved positions, D width, V vocabulary.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import CausalLMOutput

from cocomix.stage2_pretrain.model import GPT2Body, init_gpt2_weights, interleave, next_token_loss


class PauseConfig(PretrainedConfig):
    """GPT-2 fields plus ``insert_layer`` (where the pause vector is interleaved)."""

    model_type = "cocomix-pause"
    attribute_map = {"hidden_size": "n_embd", "max_position_embeddings": "n_positions",
                     "num_attention_heads": "n_head", "num_hidden_layers": "n_layer"}

    def __init__(self, vocab_size: int = 50257, n_positions: int = 1024, n_embd: int = 768, n_layer: int = 12,
                 n_head: int = 12, dropout: float = 0.0, layer_norm_epsilon: float = 1e-5,
                 initializer_range: float = 0.02, insert_layer: int = 5, tie_word_embeddings: bool = True, **kwargs):
        self.vocab_size, self.n_positions, self.n_embd = vocab_size, n_positions, n_embd
        self.n_layer, self.n_head, self.dropout = n_layer, n_head, dropout
        self.layer_norm_epsilon, self.initializer_range = layer_norm_epsilon, initializer_range
        self.insert_layer = insert_layer
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
        assert n_embd % n_head == 0, "n_embd must be a multiple of n_head"
        assert 0 <= insert_layer < n_layer, "insert_layer must name a block"


class PauseForCausalLM(PreTrainedModel):
    """Pause student; ``forward(input_ids, labels)`` -> ``CausalLMOutput`` (logits [B, T, V] from the pause positions)."""

    config_class = PauseConfig
    base_model_prefix = "transformer"
    _tied_weights_keys = {"lm_head.weight": "transformer.wte.weight"}
    _supports_sdpa = True

    def __init__(self, config: PauseConfig):
        super().__init__(config)
        self.transformer = GPT2Body(config)
        self.pause = nn.Parameter(torch.zeros(config.n_embd))  # the one learned vector p
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def _init_weights(self, module: nn.Module) -> None:
        init_gpt2_weights(module, self.config)
        if isinstance(module, PauseForCausalLM):
            init.normal_(module.pause, mean=0.0, std=self.config.initializer_range)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **kwargs) -> CausalLMOutput:
        """``labels`` = ``input_ids`` (HF convention, shifted here; -100 ignored). Other HF keyword arguments are ignored."""
        cfg, body = self.config, self.transformer
        B, T = input_ids.shape
        pos_T = torch.arange(T, device=input_ids.device)
        h_BTD = body.drop(body.wte(input_ids) + body.wpe(pos_T))
        for block in body.h[:cfg.insert_layer]:
            h_BTD = block(h_BTD)
        x_BSD = interleave(h_BTD, self.pause.expand(B, T, -1))
        for block in body.h[cfg.insert_layer:]:
            x_BSD = block(x_BSD)
        logits_BTV = self.lm_head(body.ln_f(x_BSD[:, 1::2]))  # odd positions = pause vectors
        loss = None if labels is None else next_token_loss(logits_BTV, labels)
        return CausalLMOutput(loss=loss, logits=logits_BTV)


AutoConfig.register("cocomix-pause", PauseConfig)
AutoModelForCausalLM.register(PauseConfig, PauseForCausalLM)
