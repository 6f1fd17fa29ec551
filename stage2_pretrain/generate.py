"""``cocomix generate CKPT --prompt TEXT``: sample a continuation from a student checkpoint.

A *decoder* takes the new tokens of the sequence and returns the next-token logits after each
of them, keeping whatever state it needs between calls:

- CoCoMix, cached: :class:`~.kv_cache.InterleavedDecoder` (one position per lower block, two per
  upper block for every new token);
- NTP (a stock HF GPT-2): :class:`HFDecoder`, HF's own KV cache;
- either, ``--no-cache``: :class:`FullDecoder`, the model's plain forward over the whole
  sequence at every step (the reference the caches are tested against).

:func:`generate` is one loop for all of them: prefill the prompt, then sample a token and feed
it. The sampler draws from a CPU generator seeded with ``--seed``, so a run is reproducible
and cached and uncached runs draw the same random numbers.

Shape legend: B batch, T tokens, N new tokens of one decoder call, V vocabulary.
"""
from __future__ import annotations

import inspect
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch

from cocomix.core.errors import CocomixError, ConfigError
from cocomix.stage2_pretrain.generate_config import GenerateConfig
from cocomix.stage2_pretrain.kv_cache import InterleavedDecoder

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- sampling
class Sampling(NamedTuple):
    """How the next token is drawn from the logits."""

    temperature: float = 1.0  #: 0 = greedy
    top_k: int = 0  #: 0 = no limit
    top_p: float = 1.0  #: 1 = no limit


def sample_next(logits_BV: torch.Tensor, s: Sampling, gen: torch.Generator) -> torch.Tensor:
    """Next token ids ``[B, 1]``: greedy at temperature 0, else top-k / top-p filtered sampling."""
    if s.temperature == 0:
        return logits_BV.argmax(-1, keepdim=True)
    logits_BV = logits_BV.float() / s.temperature
    if 0 < s.top_k < logits_BV.shape[-1]:
        kth_B1 = logits_BV.topk(s.top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth_B1, float("-inf"))
    if s.top_p < 1:
        sorted_BV, order_BV = logits_BV.sort(dim=-1, descending=True)
        p_BV = sorted_BV.softmax(-1)
        drop_sorted_BV = p_BV.cumsum(-1) - p_BV >= s.top_p  # the tokens ranked above already hold p
        drop_BV = torch.empty_like(drop_sorted_BV).scatter_(-1, order_BV, drop_sorted_BV)  # back to vocabulary order
        logits_BV = logits_BV.masked_fill(drop_BV, float("-inf"))
    probs_BV = logits_BV.softmax(-1).cpu()
    return torch.multinomial(probs_BV, 1, generator=gen).to(logits_BV.device)


# ----------------------------------------------------------------------------- decoders
class FullDecoder:
    """No cache: the model's forward over the whole sequence for every call (the reference)."""

    def __init__(self, model):
        self.model, self.ids_BT = model, None

    @torch.no_grad()
    def __call__(self, ids_BN: torch.Tensor) -> torch.Tensor:
        self.ids_BT = ids_BN if self.ids_BT is None else torch.cat([self.ids_BT, ids_BN], dim=1)
        return self.model(input_ids=self.ids_BT).logits[:, -ids_BN.shape[1]:]


class HFDecoder:
    """A HF causal LM with its own KV cache (the NTP students are stock ``GPT2LMHeadModel``)."""

    def __init__(self, model):
        params = inspect.signature(model.forward).parameters
        self.model, self.cache = model, None
        self.cache_arg = "cache" if "cache" in params else "past_key_values"  # renamed in transformers 5

    @torch.no_grad()
    def __call__(self, ids_BN: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids_BN, use_cache=True, **{self.cache_arg: self.cache})
        self.cache = out[self.cache_arg]  # the output field is named as the argument
        return out.logits


def is_cocomix(model) -> bool:
    return getattr(model.config, "model_type", None) == "cocomix"


def make_decoder(model, *, cache: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """The decoder for ``model``. CoCoMix interleaves ``model.concept(h).c_BTD``, looked up at every
    call, so a steered bottleneck swapped in by ``cocomix steer`` is used by both paths; a pause
    student interleaves its learned vector. CoCoMix ablations that do not interleave (``mix`` add /
    none) decode without a cache."""
    model_type = getattr(model.config, "model_type", None)
    if model_type == "cocomix" and getattr(model.config, "mix", "interleave") != "interleave":
        cache = False  # intervention / prediction-only ablations: T upper positions, no cached path yet
    if not cache:
        return FullDecoder(model)
    if model_type == "cocomix":
        return InterleavedDecoder(model, lambda h_BND: model.concept(h_BND).c_BTD)
    if model_type == "cocomix-pause":  # one learned vector interleaved instead of the concept
        return InterleavedDecoder(model, lambda h_BND: model.pause.expand_as(h_BND))
    return HFDecoder(model)


def context_length(model) -> int:
    cfg = model.config
    return getattr(cfg, "n_positions", None) or cfg.max_position_embeddings


# ----------------------------------------------------------------------------- the loop
@dataclass
class Generation:
    """Output of :func:`generate`."""

    new_ids_BT: torch.Tensor  #: the sampled tokens (prompt excluded)
    logits: list[torch.Tensor]  #: ``[B, V]`` logits each token was drawn from (only with ``keep_logits``)
    seconds: float  #: wall time, prefill included


def generate(decoder, prompt_BT: torch.Tensor, *, max_new_tokens: int, sampling: Sampling, seed: int = 0,
             eos_id: int | None = None, keep_logits: bool = False) -> Generation:
    """Prefill ``prompt_BT``, then sample up to ``max_new_tokens`` tokens (stops early when every row drew ``eos_id``)."""
    gen = torch.Generator().manual_seed(seed)
    t0, new, kept = time.perf_counter(), [], []
    logits_BV = decoder(prompt_BT)[:, -1]
    while True:
        if keep_logits:
            kept.append(logits_BV)
        new.append(sample_next(logits_BV, sampling, gen))
        if len(new) == max_new_tokens or (eos_id is not None and bool((new[-1] == eos_id).all())):
            break
        logits_BV = decoder(new[-1])[:, -1]
    return Generation(torch.cat(new, dim=1), kept, time.perf_counter() - t0)


# ----------------------------------------------------------------------------- checkpoint, tokenizer, prompt
def load_for_generation(ckpt: str, device: torch.device):
    """The checkpoint's model, in eval mode on ``device``."""
    from cocomix.stage2_pretrain.evaluate import load_checkpoint_model

    return load_checkpoint_model(Path(ckpt)).to(device).eval()


def load_tokenizer(ckpt: str, config, override: str | None = None) -> Any:
    """``override``, else the checkpoint's own tokenizer files, else the token store its run recorded."""
    from cocomix.storage.safe_load import load_tokenizer as safe_tokenizer  # no remote code, one line when unreadable

    if override is not None:
        if not Path(override).exists():
            raise ConfigError(f"--tokenizer {override} does not exist; pass a tokenizer folder")
        return safe_tokenizer(override, "--tokenizer")
    if any((Path(ckpt) / name).exists() for name in ("tokenizer.json", "vocab.json")):
        return safe_tokenizer(ckpt, "checkpoint", config=config)
    return store_tokenizer(ckpt, config)


def store_tokenizer(ckpt: str, config) -> Any:
    """The tokenizer saved in the token store the checkpoint's run read (path recorded in its config)."""
    from cocomix.storage.token_store import TokenStore

    tokens = (getattr(config, "concept_provenance", None) or {}).get("tokens") or getattr(config, "cocomix_tokens", None) or {}
    path = tokens.get("path")
    if not path or not Path(path).exists():
        raise CocomixError(f"checkpoint {ckpt} has no tokenizer files and its token store ({path or 'not recorded'}) is not here; "
                           "pass --tokenizer DIR")
    store = TokenStore.open(path)
    if tokens.get("tokenizer_sha256") not in (None, store.tokenizer_sha256):
        raise CocomixError(f"the token store at {path} now holds another tokenizer than checkpoint {ckpt} was trained with; pass --tokenizer DIR")
    return store.load_tokenizer()


def encode_prompt(tokenizer, prompt: str, context: int, max_new_tokens: int) -> tuple[list[int], int]:
    """Prompt ids cropped from the left so that prompt + new tokens fit ``context``; (ids, tokens dropped)."""
    if max_new_tokens >= context:
        raise ConfigError(f"--max-new-tokens {max_new_tokens} leaves no room for the prompt in the model's context of "
                          f"{context} tokens; pass --max-new-tokens {context - 1} or less")
    ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise ConfigError("--prompt encodes to no token; pass some text")
    keep = context - max_new_tokens
    if len(ids) > keep:
        log.warning("the prompt's %d tokens + %d new ones exceed the context of %d: keeping the prompt's last %d tokens",
                    len(ids), max_new_tokens, context, keep)
    return ids[-keep:], max(0, len(ids) - keep)


# ----------------------------------------------------------------------------- cocomix generate
@dataclass
class GenerateResult:
    """What ``cocomix generate`` printed."""

    prompt: str  #: the prompt as the model saw it (decoded, after any cropping)
    completion: str  #: the generated text
    new_tokens: int
    cropped: int  #: prompt tokens dropped to fit the context
    seconds: float
    tokens_per_s: float


def run_generate(cfg: GenerateConfig) -> GenerateResult:
    from cocomix.core.device import resolve_device

    device = resolve_device(cfg.device)
    model = load_for_generation(cfg.ckpt, device)
    tokenizer = load_tokenizer(cfg.ckpt, model.config, cfg.tokenizer)
    prompt_ids, cropped = encode_prompt(tokenizer, cfg.prompt, context_length(model), cfg.max_new_tokens)
    out = generate(make_decoder(model, cache=cfg.cache), torch.tensor([prompt_ids], device=device),
                   max_new_tokens=cfg.max_new_tokens, sampling=sampling_of(cfg), seed=cfg.seed,
                   eos_id=tokenizer.eos_token_id if cfg.stop_at_eos else None)
    n = out.new_ids_BT.shape[1]
    result = GenerateResult(tokenizer.decode(prompt_ids), tokenizer.decode(out.new_ids_BT[0].tolist()), n, cropped,
                            out.seconds, n / max(out.seconds, 1e-9))
    print_generation(result)
    log.info("%d new tokens in %.2f s (%.1f tokens/s, %s)", n, out.seconds, result.tokens_per_s,
             "KV cache" if cfg.cache else "no cache")
    return result


def sampling_of(cfg: GenerateConfig) -> Sampling:
    return Sampling(cfg.temperature, cfg.top_k, cfg.top_p)


def print_generation(r: GenerateResult) -> None:
    """Prompt (dim) then completion, on stdout (pipe-able); logs and errors stay on stderr."""
    from rich.console import Console
    from rich.text import Text

    Console(highlight=False, soft_wrap=True).print(Text(r.prompt, style="dim") + Text(r.completion))
