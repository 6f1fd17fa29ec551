"""``cocomix extract`` as the CLI runs it: tokenize ``--corpus`` with the teacher's tokenizer when no
``--tokens`` store is given (rank 0; the other ranks wait), then extract."""
from __future__ import annotations

import dataclasses
import logging

from cocomix.core.device import resolve_device
from cocomix.core.workspace import tokens_dir, workspace_root
from cocomix.stage1_extract.config import ExtractConfig
from cocomix.stage1_extract.dist import init_dist
from cocomix.stage1_extract.extract import ExtractResult, run_extract
from cocomix.storage.config import TokenizeConfig
from cocomix.storage.tokenize import run_tokenize

log = logging.getLogger(__name__)


def run_extract_chain(cfg: ExtractConfig) -> ExtractResult:
    if cfg.tokens is not None:
        return run_extract(cfg)
    tokens = tokens_dir(workspace_root(cfg.workspace), cfg.corpus)
    dist = init_dist(resolve_device(cfg.device))
    try:
        if dist.is_main:
            log.info("tokenizing %s with the teacher's tokenizer into %s", cfg.corpus, tokens)
            run_tokenize(TokenizeConfig(corpus=cfg.corpus, tokenizer=cfg.teacher, out=str(tokens),
                                        workspace=cfg.workspace))
        dist.barrier()
        return run_extract(dataclasses.replace(cfg, tokens=str(tokens)), dist=dist)
    finally:
        dist.close()
