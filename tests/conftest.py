"""Tiny fixtures shared by the whole suite, all built here (nothing is downloaded).

- ``corpus_dir``: a folder of small .txt documents (one file = one document).
- ``tokenizer_dir``: a byte-level BPE trained on that corpus, saved as a fast HF tokenizer.
- ``teacher_dir``: a random 3-layer GPT-2 over that tokenizer, saved as a stock HF folder.
- ``token_store``: the corpus tokenized into a token store with the tokenizer above.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "the of and to in is that for it as with was on be by this are from at or an which have not "
    "model token concept layer sparse teacher student window shard label gradient attention "
    "python import return class def self value list dict error file path data train loss"
).split()

EOS = "<|endoftext|>"


def make_docs(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(20, 120))]
        docs.append(f"Document {i}. " + " ".join(words) + ".\n")
    return docs


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(make_docs()):
        (root / f"doc{i:03d}.txt").write_text(text)
    return root


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> Path:
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=[EOS])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token=EOS, bos_token=EOS, unk_token=EOS)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    return train_tokenizer(make_docs(), 384, tmp_path_factory.mktemp("tokenizer"))


def make_gpt2(tokenizer_path: Path, out: Path, *, n_embd: int = 32, n_layer: int = 3, n_head: int = 2, seed: int = 0) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=len(tok), n_positions=256, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id,
    )
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_gpt2(tokenizer_dir, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def token_store(tmp_path_factory, corpus_dir, tokenizer_dir) -> Path:
    from cocomix.storage.config import TokenizeConfig
    from cocomix.storage.tokenize import run_tokenize

    out = tmp_path_factory.mktemp("store") / "tokens"
    run_tokenize(TokenizeConfig(corpus=str(corpus_dir), tokenizer=str(tokenizer_dir), out=str(out), val_fraction=0.1, chunk_tokens=512))
    return out


@pytest.fixture(autouse=True)
def _cocomix_logs_reach_caplog():
    """The CLI's rich handler stops propagation; tests that ran a CLI command must not hide logs from caplog."""
    import logging

    logging.getLogger("cocomix").propagate = True
    yield
