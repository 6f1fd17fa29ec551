"""Console output of ``sae train``: a progress bar (tokens/s, ETA, FVU, L0, dead) and a summary."""
from __future__ import annotations

import time
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from cocomix.core.logs import console, process_rank
from cocomix.core.progress import progress_display


class SaeTrainProgress:
    """Context manager around a rich bar (plain lines when not on a terminal) counting training activations (tokens)."""

    def __init__(self, total_tokens: int, done_tokens: int = 0) -> None:
        self.progress = progress_display(
            TextColumn("[bold]sae train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            unit="tok", plain_extra="{task.fields[stats]}",
            console=console, disable=process_rank() != 0,
        )
        self.task = self.progress.add_task("sae train", total=total_tokens, completed=done_tokens, info="", stats="")
        self.t0 = time.monotonic()
        self.tokens = 0
        self.fvu_ema: float | None = None

    def __enter__(self) -> "SaeTrainProgress":
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    def advance(self, tokens: int, stats: Any, dead_fraction: float) -> None:
        self.tokens += tokens
        self.fvu_ema = stats.fvu if self.fvu_ema is None else 0.9 * self.fvu_ema + 0.1 * stats.fvu
        rate = self.tokens / max(time.monotonic() - self.t0, 1e-9)
        quality = f"fvu {self.fvu_ema:.3f}  l0 {stats.l0:.1f}  dead {dead_fraction:.1%}"
        self.progress.update(self.task, advance=tokens, info=f"{rate:,.0f} tok/s  {quality}", stats=quality)


def print_summary(result: Any) -> None:
    if process_rank() != 0:
        return
    console.print(
        f"SAE saved to {result.out}: held-out FVU {result.fvu:.4f}, L0 {result.l0:.1f}, "
        f"dead {result.dead_fraction:.1%} ({result.tokens:,} tokens, {result.steps:,} steps, {result.seconds:,.1f} s)",
        highlight=False,
    )
