"""Console output of ``tokenize``: a progress bar (documents/s, tokens/s, ETA) and a summary table."""
from __future__ import annotations

import time
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from cocomix.core.logs import console, process_rank
from cocomix.core.progress import progress_display


class TokenizeProgress:
    """Context manager around a rich bar (plain lines when not on a terminal); the rates count only this run's documents."""

    def __init__(self, total_docs: int | None, already_done: int) -> None:
        self.progress = progress_display(
            TextColumn("[bold]tokenize"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rates]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            unit="docs", plain_extra="{task.fields[tok_rate]}",
            console=console, disable=process_rank() != 0, transient=False,
        )
        self.task = self.progress.add_task("tokenize", total=total_docs, completed=already_done, rates="", tok_rate="")
        self.t0 = time.monotonic()
        self.docs = 0
        self.tokens = 0

    def __enter__(self) -> "TokenizeProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def advance(self, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        dt = max(time.monotonic() - self.t0, 1e-9)
        tok_rate = f"{self.tokens / dt:,.0f} tok/s"
        self.progress.update(self.task, advance=docs, rates=f"{self.docs / dt:,.0f} docs/s  {tok_rate}", tok_rate=tok_rate)


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
