"""Helpers of the storage tests (imported by the test modules of this folder)."""
from __future__ import annotations

import numpy as np


def tokenize(corpus, tokenizer, out, **kw):
    """run_tokenize with the suite's small defaults."""
    from cocomix.storage.config import TokenizeConfig
    from cocomix.storage.tokenize import run_tokenize

    kw.setdefault("val_fraction", 0.1)
    kw.setdefault("chunk_tokens", 512)
    return run_tokenize(TokenizeConfig(corpus=str(corpus), tokenizer=None if tokenizer is None else str(tokenizer), out=str(out), **kw))


def read_store(path) -> dict:
    """{split: (tokens, doc_offsets)} of a finished store."""
    from cocomix.storage.token_store import TokenStore

    store = TokenStore.open(path)
    return {s: (store.split(s).read(0, len(store.split(s))), store.split(s).doc_offsets()) for s in store.splits}


def reference_store(docs: list[str], tokenizer_dir, val_fraction: float, seed: int = 0) -> dict:
    """Plain reference: tokenize each document alone, append EOS, route by the split rule."""
    from transformers import AutoTokenizer

    from cocomix.storage.tokenize import val_mask

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    is_val = val_mask(np.arange(len(docs)), val_fraction, seed)
    out = {}
    for split, want in (("train", False), ("val", True)):
        ids = [tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d, v in zip(docs, is_val) if v == want]
        lens = [len(x) for x in ids]
        out[split] = (np.array([t for x in ids for t in x], dtype=np.int64), np.concatenate([[0], np.cumsum(lens)]).astype(np.int64))
    return out
