"""Console output and run statistics of ``extract``: a progress bar and a summary table.

The bar counts this run's tokens (tokens/s, shards done, ETA). The summary (tokens,
shards, label coverage, throughput, peak memory) is also what goes into the manifest
through ``TargetWriter.finalize(extra=...)``. Coverage is counted from each shard's
labels as they are computed, plus the shard files that earlier (interrupted) runs left, and is
summed over ranks.
"""
from __future__ import annotations

import resource
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.progress import TextColumn
from rich.table import Table

from cocomix.core.logs import console
from cocomix.core.progress import CommandProgress


class ExtractProgress(CommandProgress):
    """The extract bar (plain lines when not on a terminal) over this process's pending tokens."""

    def __init__(self, total_tokens: int, total_shards: int, enabled: bool) -> None:
        super().__init__("extract", TextColumn("{task.fields[shards]}"), TextColumn("{task.fields[rate]}"), unit="tok",
                         total=max(total_tokens, 1), plain_extra="{task.fields[shards]}", enabled=enabled,
                         shards="", rate="")
        self.total_shards, self.shards = total_shards, 0

    def __enter__(self) -> "ExtractProgress":
        super().__enter__()
        self._refresh()
        return self

    def tokens_done(self, n: int) -> None:
        self.step(n)
        self._refresh()

    def shard_done(self) -> None:
        self.shards += 1
        self._refresh()

    def _refresh(self) -> None:
        self.progress.update(self.task, shards=f"{self.shards}/{self.total_shards} shards",
                             rate=f"{self.rate(self.done):,.0f} tok/s")


def peak_memory_bytes(device: torch.device) -> int:
    """Peak CUDA memory allocated on ``device``, or this process's peak resident set on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


@dataclass
class Coverage:
    """Label counts over some tokens (summed over shards and ranks)."""

    tokens: int = 0
    labelled: int = 0  #: tokens with at least one label
    labels: int = 0  #: label slots that hold a latent (not ``ignore_id``)

    def add_ids(self, ids_NK: np.ndarray, ignore_id: int) -> None:
        valid_N = (ids_NK != ignore_id).sum(1)
        self.tokens += len(valid_N)
        self.labelled += int(np.count_nonzero(valid_N))
        self.labels += int(valid_N.sum())

    def as_stats(self) -> dict:
        return {
            "tokens": self.tokens,
            "tokens_with_label": self.labelled / self.tokens if self.tokens else 0.0,
            "labels_per_token": self.labels / self.tokens if self.tokens else 0.0,
        }


def read_coverage(shard_paths: list[Path], ignore_id: int) -> Coverage:
    """Coverage of finished shard files (those an earlier, interrupted run wrote)."""
    import pyarrow as pa

    cov = Coverage()
    for path in shard_paths:
        with pa.memory_map(str(path)) as source:
            column = pa.ipc.open_file(source).read_all().column("concept_ids").combine_chunks()
            ids = column.flatten().to_numpy(zero_copy_only=False)
            cov.add_ids(ids.reshape(-1, column.type.list_size), ignore_id)
    return cov


def print_summary(stats: dict, out: Path) -> None:
    """One table with the numbers recorded in the manifest."""
    table = Table(title=f"concept targets {out}", show_edge=False, show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    cov = stats["coverage"]
    rows = [
        ("tokens labelled", f"{cov['tokens']:,}"),
        ("shards", f"{stats['shards_total']:,} ({stats['shards_computed']:,} computed by this run)"),
        ("tokens with >= 1 label", f"{100 * cov['tokens_with_label']:.2f} %"),
        ("labels per token", f"{cov['labels_per_token']:.3f} of {stats['k_attr']}"),
        ("throughput", f"{stats['tokens_per_s']:,.0f} tok/s over {stats['world_size']} process(es)"),
        ("time", f"{stats['seconds']:,.1f} s"),
        ("peak memory", f"{stats['peak_memory_bytes'] / 2**20:,.0f} MiB ({stats['device']})"),
    ]
    for row in rows:
        table.add_row(*row)
    console.print(table)
