"""Where a run's numbers go: a rich console line, ``<out>/metrics.jsonl`` and Accelerate trackers.

Only rank 0 writes. ``metrics.jsonl`` holds one JSON object per log step
(``{"kind": "train", "step", "loss", "ntp_loss", "concept_loss", "lr", "grad_norm", "tokens_per_s", ...}``)
and one per evaluation (``{"kind": "eval", "step", "val_loss", "val_ppl", ...}``). On resume
the records after the checkpoint's step are dropped, so the file reads as one clean run.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

from cocomix.core.errors import ConfigError
from cocomix.core.logs import console
from cocomix.storage.files import atomic_write_bytes

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_tracker(name: str | None) -> str | None:
    """The tracker name if it is known and installed; otherwise one line naming --tracker."""
    if name is None:
        return None
    if name not in TRACKERS:
        raise ConfigError(f"--tracker must be one of {', '.join(TRACKERS)}, got {name!r}")
    import importlib.util

    if importlib.util.find_spec(TRACKERS[name]) is None:
        raise ConfigError(f"--tracker {name} needs the `{TRACKERS[name]}` package (pip install {TRACKERS[name]}), or drop --tracker")
    return name


def truncate_metrics(out: Path, step: int) -> None:
    """Keep only records up to ``step`` (those after it belong to the part of a killed run being redone)."""
    path = Path(out) / METRICS
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    atomic_write_bytes(path, "".join(line + "\n" for line in kept).encode())


@dataclass
class Window:
    """Sums since the last log line."""

    steps: int = 0
    tokens: int = 0
    sums: dict = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add(self, values: dict, tokens: int) -> None:
        self.steps += 1
        self.tokens += tokens
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v


class RunLog:
    """Console, metrics.jsonl and trackers for one run (no-ops on ranks other than 0)."""

    def __init__(self, accelerator, out: Path, max_steps: int, log_every: int):
        self.acc, self.main = accelerator, accelerator.is_main_process
        self.path, self.max_steps, self.log_every = Path(out) / METRICS, max_steps, max(1, log_every)
        self.window = Window()

    def train_step(self, step: int, values: dict, tokens: int, lr: float) -> dict | None:
        """Record one optimizer step (1-based ``step``); every ``log_every`` steps write a line."""
        self.window.add(values, tokens)
        if step % self.log_every and step != self.max_steps:
            return None
        w, self.window = self.window, Window()
        seconds = max(time.perf_counter() - w.started, 1e-9)
        record = {"kind": "train", "step": step, "lr": lr, "tokens_per_s": w.tokens / seconds}
        record.update({k: v / w.steps for k, v in w.sums.items()})
        self._emit(record)
        self._console_train(record, eta_s=(self.max_steps - step) * seconds / w.steps)
        return record

    def eval(self, step: int, result) -> None:
        record = {"kind": "eval", "step": step, "val_loss": result.loss, "val_ppl": result.ppl, "val_tokens": result.tokens}
        self._emit(record)
        if self.main:
            console.print(f"[bold cyan]eval[/] step {step:>7d}  val loss {result.loss:.4f}  val ppl {result.ppl:.2f}", highlight=False)

    def _emit(self, record: dict) -> None:
        if not self.main:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.acc.log({k: v for k, v in record.items() if k not in ("kind", "step")}, step=record["step"])

    def _console_train(self, r: dict, eta_s: float) -> None:
        if not self.main:
            return
        concept = f" concept {r['concept_loss']:.4f}" if "concept_loss" in r else ""
        concept += f" kd {r['kd_loss']:.4f}" if "kd_loss" in r else ""
        console.print(
            f"step {r['step']}/{self.max_steps}  loss {r['loss']:.4f}  ntp {r['ntp_loss']:.4f}{concept}  "
            f"lr {r['lr']:.2e}  grad {r['grad_norm']:.2f}  {r['tokens_per_s']:,.0f} tok/s  eta {_hms(eta_s)}",
            highlight=False,
        )


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}"


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")
