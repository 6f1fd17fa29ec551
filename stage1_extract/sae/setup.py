"""Inputs of ``sae train``: the teacher, the token store (checked against each other) and the
provenance that goes into the SAE's ``cfg.json``."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from cocomix.core.device import resolve_device
from cocomix.stage1_extract.config import SaeTrainConfig
from cocomix.stage1_extract.sae.stream import window_batches
from cocomix.stage1_extract.teacher import Teacher, check_layer, check_tokenizer, load_teacher

log = logging.getLogger(__name__)

LOCATION = "resid_post"  # output of block `layer` (TransformerLens blocks.L.hook_resid_post)
EVAL_SEED = 1234  # held-out windows are visited in a fixed order, independent of --seed


@dataclass
class SaeInputs:
    teacher: Teacher
    store: Any  #: TokenStore
    train: Any  #: TokenSplit the SAE trains on
    held_out: Any  #: TokenSplit for the final FVU/L0 (`val` when present)
    cfg: SaeTrainConfig

    def eval_windows(self) -> Iterator[torch.Tensor]:
        """One pass over the held-out split's windows."""
        gen = torch.Generator().manual_seed(EVAL_SEED)
        return window_batches(self.held_out, self.cfg.window, self.cfg.teacher_batch, gen, passes=1)

    def meta(self, cfg: SaeTrainConfig, result: Any, held_out: Any) -> dict:
        """Everything ``cfg.json`` records besides the shapes: what the SAE was trained on, how, how well."""
        training = {name: getattr(cfg, name) for name in (
            "train_tokens", "batch_tokens", "lr", "auxk", "auxk_coef", "dead_tokens", "window", "seed", "buffer_tokens")}
        stats = {"fvu": result.fvu, "l0": result.l0, "dead_fraction": result.dead_fraction, "steps": result.steps,
                 "tokens_seen": result.tokens, "eval_tokens": held_out.tokens, "eval_split": self.held_out.name,
                 "seconds": round(result.seconds, 2)}
        return {"teacher": dict(self.teacher.info), "layer": cfg.layer, "location": LOCATION,
                "tokens": self.store.provenance(), "training": training, "stats": stats}


def open_inputs(cfg: SaeTrainConfig) -> SaeInputs:
    """Load the teacher on ``--device``, open the store, refuse a bad layer or another tokenizer."""
    from cocomix.storage.token_store import TokenStore

    store = TokenStore.open(cfg.tokens)
    teacher = load_teacher(cfg.teacher, resolve_device(cfg.device))
    check_layer(teacher, cfg.layer)
    check_tokenizer(teacher, store)
    train = store.split("train")
    held_out = store.split("val") if "val" in store.splits and len(store.split("val")) >= 2 else train
    if held_out is train:
        log.warning("token store %s has no usable `val` split: FVU is measured on training tokens", store.path)
    log.info("sae train: teacher %s layer %d, %s train tokens", cfg.teacher, cfg.layer, f"{len(train):,}")
    if cfg.train_tokens > len(train):
        log.warning("--train-tokens %s is %.1fx the train split: each token is seen about that many times",
                    f"{cfg.train_tokens:,}", cfg.train_tokens / len(train))
    return SaeInputs(teacher, store, train, held_out, cfg)
