"""Console output of ``sae train``: a progress bar (tokens/s, ETA, FVU, L0, dead) and a summary."""
from __future__ import annotations

from typing import Any

from rich.progress import MofNCompleteColumn, TextColumn

from cocomix.core.logs import console, process_rank
from cocomix.core.progress import CommandProgress


class SaeTrainProgress(CommandProgress):
    """The sae train bar (plain lines when not on a terminal) counting training activations (tokens)."""

    def __init__(self, total_tokens: int, done_tokens: int = 0) -> None:
        super().__init__("sae train", MofNCompleteColumn(), TextColumn("{task.fields[info]}"), unit="tok",
                         total=total_tokens, completed=done_tokens, plain_extra="{task.fields[stats]}",
                         enabled=process_rank() == 0, info="", stats="")
        self.fvu_ema: float | None = None

    def advance(self, tokens: int, stats: Any, dead_fraction: float) -> None:
        self.fvu_ema = stats.fvu if self.fvu_ema is None else 0.9 * self.fvu_ema + 0.1 * stats.fvu
        quality = f"fvu {self.fvu_ema:.3f}  l0 {stats.l0:.1f}  dead {dead_fraction:.1%}"
        self.step(tokens, info=f"{self.rate(self.done + tokens):,.0f} tok/s  {quality}", stats=quality)


def print_summary(result: Any) -> None:
    if process_rank() != 0:
        return
    console.print(
        f"SAE saved to {result.out}: held-out FVU {result.fvu:.4f}, L0 {result.l0:.1f}, "
        f"dead {result.dead_fraction:.1%} ({result.tokens:,} tokens, {result.steps:,} steps, {result.seconds:,.1f} s)",
        highlight=False,
    )
