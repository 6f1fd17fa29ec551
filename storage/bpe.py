"""Tokenizers for ``tokenize``: load a fast HF tokenizer, or train a byte-level BPE on the corpus.

The tokenizer is saved inside the token store (``<store>/tokenizer/``), so the store alone
says which ids mean what, and stage 1/2 load exactly that tokenizer.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Iterable

from cocomix.core.errors import CocomixError

log = logging.getLogger(__name__)

EOS = "<|endoftext|>"
DEFAULT_TOKENIZER = "openai-community/gpt2"


def load_tokenizer(spec: str) -> Any:
    """A fast tokenizer with an EOS token from a hub id or local folder."""
    from transformers import AutoTokenizer

    from cocomix.storage.safe_load import refuse_custom_code

    if not Path(spec).expanduser().exists():
        log.info("--tokenizer %s is no local path: loading it from the hub (offline, the hub client retries for "
                 "about a minute; HF_HUB_OFFLINE=1 fails at once)", spec)
    if Path(spec).expanduser().exists():
        refuse_custom_code(Path(spec).expanduser(), "--tokenizer")
    try:
        tok = AutoTokenizer.from_pretrained(spec, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - hub/file errors come in many types
        where = "local folder" if Path(spec).exists() else "hub id (offline? pass a local tokenizer folder)"
        raise CocomixError(f"could not load tokenizer {spec!r} as a {where}: {type(err).__name__}: {str(err)[:200]}") from None
    check_tokenizer(tok, spec)
    return tok


def check_tokenizer(tok: Any, spec: str) -> None:
    """Refuse slow tokenizers and tokenizers without EOS: every document must end with EOS."""
    if not hasattr(tok, "backend_tokenizer"):
        raise CocomixError(f"tokenizer {spec!r} is not a fast tokenizer (no tokenizer.json); pass a fast one or use --train-tokenizer")
    if tok.eos_token_id is None:
        raise CocomixError(
            f"tokenizer {spec!r} has no EOS token, and every document must end with one; "
            "set eos_token in its tokenizer_config.json or use --train-tokenizer"
        )


def train_bpe(texts: Iterable[str], vocab_size: int) -> Any:
    """Byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as EOS, trained on ``texts``."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    log.info("trained a byte-level BPE: %d ids (asked for %d)", len(tok), vocab_size)
    return tok


def save_tokenizer(tok: Any, folder: Path) -> None:
    """Save as a stock HF folder (tokenizer.json + tokenizer_config.json)."""
    tok.save_pretrained(str(folder))
