"""Console output of ``tokenize``: a progress bar (documents/s, tokens/s, ETA) and a summary table."""
from __future__ import annotations

from typing import Any

from rich.progress import MofNCompleteColumn, TextColumn
from rich.table import Table

from cocomix.core.logs import console, process_rank
from cocomix.core.progress import CommandProgress


class TokenizeProgress(CommandProgress):
    """The tokenize bar (plain lines when not on a terminal); the rates count only this run's documents."""

    def __init__(self, total_docs: int | None, already_done: int) -> None:
        super().__init__("tokenize", MofNCompleteColumn(), TextColumn("{task.fields[rates]}"), unit="docs",
                         total=total_docs, completed=already_done, plain_extra="{task.fields[tok_rate]}",
                         enabled=process_rank() == 0, rates="", tok_rate="")
        self.tokens = 0

    def advance(self, docs: int, tokens: int) -> None:
        self.tokens += tokens
        tok_rate = f"{self.rate(self.tokens):,.0f} tok/s"
        self.step(docs, rates=f"{self.rate(self.done + docs):,.0f} docs/s  {tok_rate}", tok_rate=tok_rate)


def print_summary(result: Any, stats: Any) -> None:
    """One table: documents and tokens per split, plus where the store is."""
    if process_rank() != 0:
        return
    table = Table(title=f"token store {result.path}", show_edge=False)
    for col in ("split", "documents", "tokens", "tokens/doc"):
        table.add_column(col, justify="right" if col != "split" else "left")
    for split, c in result.counts.items():
        per_doc = c["n_tokens"] / c["n_docs"] if c["n_docs"] else 0.0
        table.add_row(split, f"{c['n_docs']:,}", f"{c['n_tokens']:,}", f"{per_doc:,.1f}")
    console.print(table)
    note = f"vocab {result.vocab_size:,}, {result.seconds:,.1f} s"
    if result.resumed_after_docs:
        note += f", resumed after {result.resumed_after_docs:,} documents"
    if stats.replaced_bytes:
        note += f", {stats.replaced_bytes:,} non-UTF-8 bytes replaced in {stats.bad_docs:,} documents"
    console.print(note, highlight=False)
