"""Model size presets (the paper's table, docs/ARCHITECTURE.md), model construction and parameter accounting.

Parameter accounting (``count_params``): every parameter once (the tied ``lm_head``/``wte`` matrix
counts once) and **position embeddings included**, as ``num_parameters()`` in HF counts them; with
that rule the NTP widths of the paper's table (624, 1072, 2096) land on 69.4M, 386.3M and 1.37B,
the paper's names. "Active" counts only ``k_concept / n_latents`` of W_comp (its bias fully): each
token uses C of its L columns. Everything else, including the full concept head W_pred, is active.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from cocomix.core.errors import ConfigError
from cocomix.stage2_pretrain.model import CoCoMixConfig, CoCoMixForCausalLM

PAPER_VOCAB = 50257  #: GPT-2's vocabulary: the paper's students share the teacher's tokenizer
PAPER_LATENTS = 32768  #: OpenAI's GPT-2-small 32k SAE


@dataclass(frozen=True)
class Preset:
    """One student size. ``batch_tokens`` is the global batch per optimizer step (gradient
    accumulation fills it from ``micro_batch`` windows of ``context`` tokens per process)."""

    name: str
    cocomix_d: int  #: CoCoMix width
    ntp_d: int  #: NTP baseline width with matched active parameters (paper vocab and latents)
    n_layer: int
    n_head: int
    insert_layer: int  #: block whose input gets the concept step (0-based)
    lr: float  #: peak learning rate
    min_lr: float  #: end of the cosine decay
    batch_tokens: int
    max_steps: int  #: steps for 20B tokens at batch_tokens (tiny: a CPU smoke run)
    micro_batch: int  #: windows per forward pass per process
    context: int  #: window length = position embeddings
    k_concept: int  #: concept logits kept before compression
    dropout: float = 0.1  #: official runs: GPT-2's config default 0.1 (their yaml `dropout: 0.0` is never applied)

    def width(self, method: str) -> int:
        return self.cocomix_d if method == "cocomix" else self.ntp_d


def tiny() -> Preset:
    """CPU smoke size: trains in seconds. ``ntp_d`` is matched for the quickstart's defaults (vocab 4096,
    1024 latents: 557k vs 538k active); for other vocabularies/SAEs use :func:`match_ntp_width`."""
    return Preset("tiny", cocomix_d=64, ntp_d=72, n_layer=4, n_head=4, insert_layer=1, lr=1e-3, min_lr=1e-4,
                  batch_tokens=8 * 128, max_steps=200, micro_batch=8, context=128, k_concept=8, dropout=0.0)


def gpt2_69m() -> Preset:
    return Preset("69m", cocomix_d=512, ntp_d=624, n_layer=8, n_head=8, insert_layer=3, lr=6e-4, min_lr=6e-5,
                  batch_tokens=512 * 1024, max_steps=40_000, micro_batch=16, context=1024, k_concept=32)


def gpt2_386m() -> Preset:
    return Preset("386m", cocomix_d=1024, ntp_d=1072, n_layer=24, n_head=16, insert_layer=5, lr=3e-4, min_lr=3e-5,
                  batch_tokens=512 * 1024, max_steps=40_000, micro_batch=8, context=1024, k_concept=32)


def gpt2_1b() -> Preset:
    return Preset("1b", cocomix_d=2048, ntp_d=2096, n_layer=24, n_head=16, insert_layer=5, lr=2e-4, min_lr=2e-5,
                  batch_tokens=1024 * 1024, max_steps=20_000, micro_batch=4, context=1024, k_concept=32)


PRESETS = {"tiny": tiny, "69m": gpt2_69m, "386m": gpt2_386m, "1b": gpt2_1b}
METHODS = ("cocomix", "ntp")


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ConfigError(f"--size {name!r} is not a preset; known: {', '.join(PRESETS)}")
    return PRESETS[name]()


def build_model(method: str, preset: Preset, *, vocab_size: int, n_latents: int = 0, k_attr: int = 4,
                ignore_id: int = 65535, eos_id: int | None = None, **ablation) -> nn.Module:
    """``cocomix`` -> :class:`CoCoMixForCausalLM` at ``cocomix_d``; ``ntp`` -> stock ``GPT2LMHeadModel`` at ``ntp_d``.

    ``ablation``: CoCoMix settings (``mix``, ``concept_target``, ``hidden_loss``, ``d_teacher``); the
    other students (KD, pause) are built by :func:`.methods.build_student`.
    """
    if method not in METHODS:
        raise ConfigError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    common = dict(vocab_size=vocab_size, n_positions=preset.context, n_layer=preset.n_layer,
                  n_head=preset.n_head, bos_token_id=eos_id, eos_token_id=eos_id)
    if method == "ntp":
        p = preset.dropout
        cfg = GPT2Config(n_embd=preset.ntp_d, resid_pdrop=p, embd_pdrop=p, attn_pdrop=p, **common)
        return GPT2LMHeadModel(cfg)
    if n_latents < preset.k_concept:
        raise ConfigError(f"cocomix needs the targets' n_latents >= k_concept ({preset.k_concept}), got {n_latents}; "
                          "pass --targets made with a larger SAE")
    cfg = CoCoMixConfig(n_embd=preset.cocomix_d, dropout=preset.dropout, insert_layer=preset.insert_layer,
                        n_latents=n_latents, k_concept=preset.k_concept, k_attr=k_attr, ignore_id=ignore_id,
                        **common, **ablation)
    return CoCoMixForCausalLM(cfg)


@dataclass(frozen=True)
class ParamCount:
    total: int  #: every parameter once (tied matrices once, position embeddings included)
    active: int  #: total minus the W_comp columns a token never touches


def count_params(model: nn.Module) -> ParamCount:
    """Counts of a model, also when wrapped by ``torch.compile`` or DDP."""
    model = getattr(model, "_orig_mod", model)
    model = getattr(model, "module", model)
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied tensor once
    compress = getattr(getattr(model, "concept", None), "compress", None)
    if not isinstance(model, CoCoMixForCausalLM) or not isinstance(compress, nn.Embedding):
        return ParamCount(total, total)  # no W_comp whose columns a token skips (ntp, kd, pause, hidden, mix none)
    cfg = model.config
    idle = (cfg.n_latents - cfg.k_concept) * cfg.n_embd
    return ParamCount(total, total - idle)


def count_on_meta(method: str, preset: Preset, *, vocab_size: int, n_latents: int = 0) -> ParamCount:
    """Parameter count without allocating (the model is built on the meta device)."""
    with torch.device("meta"):
        return count_params(build_model(method, preset, vocab_size=vocab_size, n_latents=n_latents))


class WidthMatch(NamedTuple):
    """Result of :func:`match_ntp_width`."""

    preset: Preset  #: the input preset with ``ntp_d`` replaced
    cocomix: ParamCount
    ntp: ParamCount

    @property
    def ratio(self) -> float:
        """NTP active / CoCoMix active."""
        return self.ntp.active / self.cocomix.active


def match_ntp_width(preset: Preset, vocab_size: int, n_latents: int, k_attr: int = 4) -> WidthMatch:
    """The NTP width (a multiple of ``n_head``) whose active count is closest to the CoCoMix model's.

    For vocabularies and SAEs other than the paper's (e.g. the quickstart's). With the paper's own
    (GPT-2 vocabulary, 32k latents) a paper-size preset keeps the table's width, the paper's
    baseline (69m: 624, though 616 lands slightly closer). ``k_attr`` does not change any parameter
    count; it is accepted so callers can pass the targets' settings as they are.
    """
    target = count_on_meta("cocomix", preset, vocab_size=vocab_size, n_latents=n_latents)
    if (vocab_size, n_latents) == (PAPER_VOCAB, PAPER_LATENTS) and preset.name != "tiny":
        return WidthMatch(preset, target, count_on_meta("ntp", preset, vocab_size=vocab_size))
    step = preset.n_head
    lo, hi = 1, 8 * preset.cocomix_d // step  # widths lo*step .. hi*step; the count grows with the width
    while lo < hi:  # smallest width whose count reaches the target
        mid = (lo + hi) // 2
        if _ntp_active(preset, mid * step, vocab_size) < target.active:
            lo = mid + 1
        else:
            hi = mid
    candidates = [w * step for w in (lo - 1, lo) if w >= 1]
    best = min(candidates, key=lambda d: abs(_ntp_active(preset, d, vocab_size) - target.active))
    matched = dataclasses.replace(preset, ntp_d=best)
    return WidthMatch(matched, target, count_on_meta("ntp", matched, vocab_size=vocab_size))


def _ntp_active(preset: Preset, width: int, vocab_size: int) -> int:
    return count_on_meta("ntp", dataclasses.replace(preset, ntp_d=width), vocab_size=vocab_size).active
