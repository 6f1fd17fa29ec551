"""The frozen teacher: a GPT-2-family causal LM, split at the hooked block.

Stage 1 needs two things from the teacher: the residual stream after block ``layer``
(``h = hidden_states[layer + 1]``) and the loss of the blocks above it.
:func:`embed` and :func:`run_blocks` call the stock HF modules (``transformer.wte/wpe/h[i]``;
attribution.py applies ``ln_f`` and the head) exactly as ``GPT2Model.forward`` does (same causal
mask helper, same attention implementation), so the truncated forward matches
``model(input_ids, output_hidden_states=True)``; a test pins this.

Shape legend: ``B`` windows, ``T`` tokens, ``D`` model width.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from cocomix.core.errors import CocomixError, ConfigError, MismatchError

log = logging.getLogger(__name__)


@dataclass
class Teacher:
    """A frozen, eval-mode causal LM with its tokenizer and identity."""

    model: Any  #: ``GPT2LMHeadModel`` (or a GPT-2-family model with ``.transformer`` and ``.lm_head``)
    tokenizer: Any  #: its fast HF tokenizer
    info: dict = field(default_factory=dict)  #: id, revision or sha256, n_layer, d_model, vocab_size

    @property
    def n_layer(self) -> int:
        return len(self.model.transformer.h)

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return self.model.lm_head.weight.device


def _is_local(spec: str) -> bool:
    return Path(spec).expanduser().exists()


def _weights_sha256(folder: Path) -> str:
    """sha256 over the weight files of a local model folder (the identity of a local teacher)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def _offline_error(spec: str, err: Exception) -> CocomixError:
    return CocomixError(
        f"cannot load teacher {spec!r} from the Hugging Face hub ({type(err).__name__}; offline?): "
        f"pass a local model folder with --teacher DIR"
    )


def _from_pretrained(spec: str) -> tuple[Any, Any]:
    """Model and tokenizer, no remote code, weights exactly covering the config (see :mod:`~cocomix.storage.safe_load`)."""
    from transformers import AutoModelForCausalLM

    from cocomix.storage.safe_load import load_model, load_tokenizer

    try:
        # fp32 weights whatever the checkpoint stores: --dtype bfloat16 is autocast, never cast weights
        model = load_model(AutoModelForCausalLM, spec, "--teacher", attn_implementation="sdpa", dtype=torch.float32)
        tokenizer = load_tokenizer(spec, "--teacher")
    except CocomixError:
        raise
    except (OSError, ValueError, KeyError) as err:
        if _is_local(spec):
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CocomixError(f"--teacher {spec}: not a loadable causal-LM folder ({first})") from None
        raise _offline_error(spec, err) from None
    except Exception as err:  # network errors surface as requests/httpx/hub errors
        if _is_local(spec):
            raise
        raise _offline_error(spec, err) from None
    return model, tokenizer


def _check_family(spec: str, model: Any) -> None:
    if not (hasattr(model, "transformer") and hasattr(model.transformer, "h") and hasattr(model, "lm_head")):
        raise ConfigError(
            f"--teacher {spec}: {type(model).__name__} is not a GPT-2-family causal LM "
            "(needs .transformer.h blocks and .lm_head)"
        )


def load_teacher(spec: str, device: str | torch.device = "cpu") -> Teacher:
    """Load a teacher from a hub id or a local folder; frozen (no parameter requires grad), eval mode."""
    model, tokenizer = _from_pretrained(spec)
    _check_family(spec, model)
    model.eval().requires_grad_(False).to(device)
    if _is_local(spec):
        identity = {"id": str(Path(spec).expanduser().resolve()), "sha256": _weights_sha256(Path(spec).expanduser())}
    else:
        identity = {"id": spec, "revision": getattr(model.config, "_commit_hash", None) or "unknown"}
    info = {**identity, "n_layer": len(model.transformer.h), "d_model": model.config.hidden_size,
            "vocab_size": model.config.vocab_size}
    log.info("teacher %s: %d layers, d_model %d", spec, info["n_layer"], info["d_model"])
    return Teacher(model=model, tokenizer=tokenizer, info=info)


def check_layer(teacher: Teacher, layer: int) -> None:
    """``--layer`` must name a block of the teacher."""
    if not 0 <= layer < teacher.n_layer:
        raise ConfigError(
            f"--layer {layer} is out of range for teacher {teacher.info.get('id')}: "
            f"valid layers are 0..{teacher.n_layer - 1}"
        )


def check_window(teacher: Teacher, window: int) -> None:
    """A window must fit the teacher's learned positions."""
    n_positions = teacher.model.config.n_positions
    if window > n_positions:
        raise ConfigError(f"--window {window} exceeds the context of teacher {teacher.info.get('id')} ({n_positions} positions); pass --window {n_positions} or less")


def check_tokenizer(teacher: Teacher, store: Any) -> None:
    """The token store must have been made with the teacher's tokenizer (same fingerprint)."""
    from cocomix.storage.token_store import tokenizer_fingerprint

    mine = tokenizer_fingerprint(teacher.tokenizer)
    theirs = store.tokenizer_sha256
    if mine != theirs:
        raise MismatchError(
            f"token store {store.path} was made with tokenizer sha256 {theirs[:12]}, but teacher "
            f"{teacher.info.get('id')} uses tokenizer sha256 {mine[:12]}: re-tokenize the corpus with "
            f"the teacher's tokenizer (cocomix tokenize --tokenizer {teacher.info.get('id')})"
        )


def check_vocab(teacher: Teacher, store: Any) -> None:
    """Every token id of the store must have a row in the teacher's embedding."""
    rows = teacher.model.transformer.wte.num_embeddings
    if rows < store.vocab_size:
        raise MismatchError(f"teacher {teacher.info.get('id')} embeds {rows} token ids, but token store {store.path} "
                            f"has a vocabulary of {store.vocab_size}; pass the teacher the store was tokenized for")


def embed(teacher: Teacher, input_ids_BT: torch.Tensor) -> tuple[torch.Tensor, Any, torch.Tensor]:
    """Token + position embeddings and the causal mask, exactly as ``GPT2Model.forward`` builds them."""
    from transformers.masking_utils import create_causal_mask

    tr = teacher.model.transformer
    if input_ids_BT.shape[1] > teacher.model.config.n_positions:
        raise ConfigError(
            f"--window {input_ids_BT.shape[1]} exceeds the teacher's context ({teacher.model.config.n_positions} positions)"
        )
    embeds_BTD = tr.wte(input_ids_BT)
    position_ids = torch.arange(input_ids_BT.shape[1], device=input_ids_BT.device).unsqueeze(0)
    h_BTD = embeds_BTD + tr.wpe(position_ids)
    mask = create_causal_mask(config=tr.config, inputs_embeds=embeds_BTD, attention_mask=None,
                              cache=None, position_ids=position_ids)
    return tr.drop(h_BTD), mask, position_ids


def run_blocks(teacher: Teacher, h_BTD: torch.Tensor, mask: Any, position_ids: torch.Tensor,
               start: int, stop: int) -> torch.Tensor:
    """Blocks ``start .. stop-1`` on the residual stream."""
    for block in teacher.model.transformer.h[start:stop]:
        h_BTD = block(h_BTD, None, mask, position_ids=position_ids)
    return h_BTD


def hidden_states_at(teacher: Teacher, input_ids_BT: torch.Tensor, layer: int) -> torch.Tensor:
    """Output of block ``layer`` (= HF ``hidden_states[layer + 1]``); runs only blocks 0..layer, no grad."""
    check_layer(teacher, layer)
    with torch.no_grad():
        h_BTD, mask, position_ids = embed(teacher, input_ids_BT)
        return run_blocks(teacher, h_BTD, mask, position_ids, 0, layer + 1)
