"""``cocomix concepts show CKPT --text TEXT``: the concepts a CoCoMix student predicts, token by token.

For every token the student's concept logits ``z`` at ``insert_layer`` (the head trained to
predict the teacher's labels) are read with :meth:`CoCoMixForCausalLM.predict_concepts`; the
``top`` highest are shown with their probability (softmax over all latents) and whether they are
in the active set that ``forward`` compresses (its top ``k_concept``). With ``--describe`` each
concept gets its entry from the concept dictionary (label frequency, example contexts), after a
check that the dictionary describes the labels this student was trained on. ``--html`` also
writes a self-contained page (:mod:`.concepts_html`).

Shape legend: T tokens, L latents, P concepts shown per token.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch

from cocomix.core.errors import CocomixError, ConfigError
from cocomix.stage2_pretrain.concepts_config import ShowConfig
from cocomix.storage.files import atomic_write_bytes

log = logging.getLogger(__name__)


class TokenConcepts(NamedTuple):
    """Per token of the text: its id and text, and its ``top`` predicted concepts, best first."""

    token_ids: list[int]
    token_texts: list[str]
    concept_ids: list[list[int]]  #: [T][P]
    logits: list[list[float]]  #: [T][P], raw z
    probs: list[list[float]]  #: [T][P], softmax of z over all latents
    k_concept: int  #: the active set's size: concepts ranked below it are not compressed into c


class ShowResult(NamedTuple):
    """What was shown, the dictionary entries used (empty without --describe) and the HTML page written."""

    concepts: TokenConcepts
    descriptions: dict[int, dict]
    html: Path | None


def load_concept_model(ckpt: str, need_compression: bool = False):
    """A CoCoMix checkpoint that predicts SAE concepts (and, with ``need_compression``, mixes them
    in through W_comp), or a one-line error for anything else."""
    from cocomix.stage2_pretrain.evaluate import load_checkpoint_model
    from cocomix.stage2_pretrain.model import CoCoMixForCausalLM

    model = load_checkpoint_model(Path(ckpt))
    kind = model.config.model_type
    if not isinstance(model, CoCoMixForCausalLM):
        what = "an NTP" if kind == "gpt2" else f"a {kind!r}"
        raise CocomixError(f"{ckpt} is {what} checkpoint (model_type {kind!r}): it predicts no concepts; pass a CoCoMix checkpoint")
    if model.config.concept_target != "concepts":
        raise CocomixError(f"{ckpt} was trained with --concept-target {model.config.concept_target}: it predicts the teacher's "
                           "hidden state, not SAE concepts; pass a CoCoMix checkpoint trained on concept labels")
    if need_compression and model.config.mix == "none":
        raise CocomixError(f"{ckpt} was trained with --mix none (prediction only): it has no compression layer W_comp; "
                           "pass a checkpoint trained with --mix interleave or add")
    return model.eval()


def load_tokenizer(ckpt: str, config=None):
    from cocomix.storage.safe_load import load_tokenizer as safe_tokenizer

    if not (Path(ckpt) / "tokenizer.json").is_file():
        raise CocomixError(f"checkpoint {ckpt} has no tokenizer.json to read --text with; pass a checkpoint written by `cocomix pretrain`")
    return safe_tokenizer(ckpt, "checkpoint", config=config)  # no remote code, one line when unreadable


@torch.no_grad()
def token_concepts(model, tokenizer, text: str, top: int) -> TokenConcepts:
    """Encode ``text`` (no special tokens added) and read the student's top concepts per token."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ConfigError("--text encodes to no tokens; pass some text to read")
    if len(ids) > model.config.n_positions:
        raise ConfigError(f"--text is {len(ids)} tokens, the model reads at most {model.config.n_positions}; pass a shorter text")
    z_TL = model.predict_concepts(torch.tensor([ids])).z_BTL[0].float()
    top = min(top, z_TL.shape[-1])
    val_TP, idx_TP = z_TL.topk(top, dim=-1)
    prob_TP = torch.softmax(z_TL, dim=-1).gather(-1, idx_TP)
    texts = [tokenizer.decode([i]) for i in ids]
    return TokenConcepts(ids, texts, idx_TP.tolist(), val_TP.tolist(), prob_TP.tolist(), int(model.config.k_concept))


def descriptions_for(describe: str | None, model, concepts: TokenConcepts, ckpt: str, examples: int) -> dict[int, dict]:
    """Dictionary entries of every concept shown (``examples`` contexts each), provenance-checked."""
    if describe is None:
        return {}
    from cocomix.stage2_pretrain.concepts_describe import load_describe

    dictionary = load_describe(describe)
    dictionary.check_labels(model.config.concept_provenance, f"checkpoint {ckpt}")
    if dictionary.n_latents() != model.config.n_latents:
        raise CocomixError(f"--describe {describe} holds {dictionary.n_latents()} latents, checkpoint {ckpt} predicts {model.config.n_latents}; describe the targets it was trained on")
    total = max(int(dictionary.info["label_slots"]), 1)
    rows = dictionary.rows([c for per_token in concepts.concept_ids for c in per_token])
    return {i: {**r, "share": r["frequency"] / total, "examples": r["examples"][:examples]} for i, r in rows.items()}


def run_show(cfg: ShowConfig) -> ShowResult:
    model = load_concept_model(cfg.ckpt)
    tokenizer = load_tokenizer(cfg.ckpt, model.config)
    concepts = token_concepts(model, tokenizer, cfg.text, cfg.top)
    descriptions = descriptions_for(cfg.describe, model, concepts, cfg.ckpt, cfg.examples)
    print_concepts(concepts, descriptions)
    html = None
    if cfg.html:
        from cocomix.stage2_pretrain.concepts_html import render_page

        html = Path(cfg.html)
        atomic_write_bytes(html, render_page(concepts, descriptions, title=f"cocomix concepts: {cfg.ckpt}").encode())
        log.info("wrote %s (open it in a browser; click or hover a token)", html)
    return ShowResult(concepts, descriptions, html)


# ----------------------------------------------------------------------------- terminal
def print_concepts(c: TokenConcepts, descriptions: dict[int, dict]) -> None:
    """One row per token with its concepts; then one row per concept shown, with its description."""
    from rich.markup import escape
    from rich.table import Table

    from cocomix.core.logs import console

    table = Table(title=f"predicted concepts (top {len(c.concept_ids[0])}; * = outside the active top-{c.k_concept})")
    for col in ("pos", "token", "concepts (id p)"):
        table.add_column(col, justify="right" if col == "pos" else "left")
    for t, (text, ids, probs) in enumerate(zip(c.token_texts, c.concept_ids, c.probs)):
        shown = "  ".join(f"{i}{'*' if r >= c.k_concept else ''} {p:.3f}" for r, (i, p) in enumerate(zip(ids, probs)))
        table.add_row(str(t), escape(repr(text)), shown)
    console.print(table)
    if descriptions:
        console.print(_description_table(descriptions))


def _description_table(descriptions: dict[int, dict]):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="concept dictionary (label frequency in the targets, best-scoring context)")
    for col in ("concept", "labels", "share", "top-1", "example"):
        table.add_column(col, justify="left" if col == "example" else "right")
    for i, d in sorted(descriptions.items(), key=lambda kv: -kv[1]["frequency"]):
        ex = d["examples"][0] if d["examples"] else None
        example = escape(f"{ex['left']}[{ex['token']}]{ex['right']}".replace("\n", " ")) if ex else "(never a label)"
        table.add_row(str(i), f"{d['frequency']:,}", f"{d['share']:.2%}", f"{d['top1_frequency']:,}", example)
    return table
