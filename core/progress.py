"""Progress displays shared by every long command (tokenize, extract, sae train, SAE download).

On a terminal a command shows rich's live bar. When the console is not a terminal (a batch
job whose output goes to a file: ``cocomix extract ... > log 2>&1``) a live bar prints
nothing until it stops, so :func:`progress_display` returns a :class:`PlainProgress`
instead: the same rich ``Progress`` API (``add_task``, ``update``, ``advance``, context
manager), fed by the same calls, that prints one plain line per task every
``COCOMIX_PROGRESS_EVERY`` seconds (default 30; 0 = on every update) and once when it stops::

    tokenize  12,000/60,000 docs  400 docs/s  elapsed 0:00:30  ETA 0:02:00  95,000 tok/s

The rate counts only what this run did (a resumed run starts from the completed count it was
given), the ETA is the remaining count at that rate and is left out when the total is unknown
(``12,000/? docs``).
"""
from __future__ import annotations

import math
import os
import time
from datetime import timedelta
from typing import Any

from rich import filesize
from rich.console import Console
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from cocomix.core.errors import ConfigError
from cocomix.core.logs import console as default_console

EVERY_ENV = "COCOMIX_PROGRESS_EVERY"
DEFAULT_EVERY_S = 30.0
BYTES = "bytes"  #: unit whose counts and rates are printed as file sizes (kB, MB/s)


def progress_every() -> float:
    """Seconds between plain progress lines, from ``COCOMIX_PROGRESS_EVERY`` (default 30)."""
    raw = os.environ.get(EVERY_ENV, "").strip()
    if not raw:
        return DEFAULT_EVERY_S
    try:
        every = float(raw)
    except ValueError:
        raise ConfigError(f"{EVERY_ENV}={raw!r} is not a number of seconds (e.g. 30; 0 prints on every update)") from None
    if not math.isfinite(every) or every < 0:
        raise ConfigError(f"{EVERY_ENV}={raw!r} must be a finite number of seconds >= 0")
    return every


def progress_display(*columns: str | ProgressColumn, unit: str, plain_extra: str = "",
                     console: Console | None = None, **kwargs: Any) -> Progress:
    """A rich ``Progress`` with ``columns`` on a terminal, else a :class:`PlainProgress`.

    ``unit`` names what a task counts (``docs``, ``tok``, or :data:`BYTES`); ``plain_extra`` is a
    template like a ``TextColumn``'s (``"{task.fields[shards]}"``) appended to each plain line.
    """
    console = console or default_console
    if console.is_terminal or console.is_jupyter:
        return Progress(*columns, console=console, **kwargs)
    return PlainProgress(*columns, unit=unit, extra=plain_extra, console=console, **kwargs)


class PlainProgress(Progress):
    """rich ``Progress`` without the live display: it logs plain lines instead (see the module doc)."""

    def __init__(self, *columns: str | ProgressColumn, unit: str, extra: str = "", every: float | None = None,
                 disable: bool = False, **kwargs: Any) -> None:
        kwargs.pop("transient", None)  # nothing to clear: lines are the log
        super().__init__(*columns, disable=True, **kwargs)  # never start rich's live display
        self.quiet = disable
        self.unit, self.extra = unit, extra
        self.every = progress_every() if every is None else every
        self._base: dict[TaskID, float] = {}  # completed when the task was added (earlier runs' work)
        self._last: dict[TaskID, float] = {}  # time of the task's last line
        self._stopped = False

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields: Any) -> TaskID:
        task_id = super().add_task(description, start, total, completed, visible, **fields)
        self._base[task_id] = completed
        self._last[task_id] = self.get_time()
        return task_id

    def update(self, task_id: TaskID, **kwargs: Any) -> None:
        super().update(task_id, **kwargs)
        self._tick(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._tick(task_id)

    def start(self) -> None:
        self._stopped = False

    def stop(self) -> None:
        """One last line per task (also when the command is interrupted: it shows how far it got)."""
        if self._stopped:
            return
        self._stopped = True
        for task_id in self.task_ids:
            self._emit(task_id)

    def _tick(self, task_id: TaskID) -> None:
        if self.get_time() - self._last[task_id] >= self.every:
            self._emit(task_id)

    def _emit(self, task_id: TaskID) -> None:
        self._last[task_id] = self.get_time()
        task = self._tasks[task_id]
        if self.quiet or not task.visible:
            return
        self.console.print(self.line(task), markup=False, highlight=False, soft_wrap=True)

    def line(self, task: Task) -> str:
        """``<description>  <done>/<total|?> <unit>  <rate> <unit>/s  elapsed H:MM:SS  [ETA H:MM:SS]  [extra]``."""
        elapsed = task.elapsed or 0.0
        done = task.completed - self._base.get(task.id, 0)
        rate = done / elapsed if elapsed > 0 else 0.0
        if self.unit == BYTES:
            total = "?" if task.total is None else filesize.decimal(int(task.total))
            parts = [f"{filesize.decimal(int(task.completed))}/{total}", f"{filesize.decimal(int(rate))}/s"]
        else:
            total = "?" if task.total is None else f"{task.total:,.0f}"
            parts = [f"{task.completed:,.0f}/{total} {self.unit}", f"{_number(rate)} {self.unit}/s"]
        parts.append(f"elapsed {_hms(int(elapsed))}")
        if task.total is not None:
            remaining = max(task.total - task.completed, 0)
            parts.append(f"ETA {_hms(math.ceil(remaining / rate)) if rate > 0 else '-:--:--'}" if remaining else f"ETA {_hms(0)}")
        extra = self.extra.format(task=task).strip() if self.extra else ""
        return "  ".join([task.description, *parts, *([extra] if extra else [])])


class CommandProgress:
    """The progress of a long command: ``[bold]name``, a bar, the subclass's columns, elapsed, ETA.

    A live bar on a terminal, plain lines otherwise (:func:`progress_display`); counts only this run's
    work for its rate (``completed`` is what earlier runs did). Subclasses say what a step advances.
    """

    def __init__(self, name: str, *columns: str | ProgressColumn, unit: str, total: float | None,
                 completed: float = 0, plain_extra: str = "", enabled: bool = True, **fields: Any) -> None:
        self.progress = progress_display(
            TextColumn(f"[bold]{name}"), BarColumn(), *columns, TimeElapsedColumn(), TextColumn("ETA"),
            TimeRemainingColumn(), unit=unit, plain_extra=plain_extra, console=default_console,
            disable=not enabled, transient=False)
        self.task = self.progress.add_task(name, total=total, completed=completed, **fields)
        self.t0 = time.monotonic()
        self.done = 0  #: what this run advanced

    def __enter__(self):
        self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.progress.stop()

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.t0

    def rate(self, amount: float) -> float:
        """``amount`` per second of this run."""
        return amount / max(self.seconds, 1e-9)

    def step(self, n: float, **fields: Any) -> None:
        self.done += n
        self.progress.update(self.task, advance=n, **fields)


def _number(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:,.3g}"


def _hms(seconds: int) -> str:
    """Like rich's time columns: ``0:01:05``, ``1 day, 2:00:00``."""
    return str(timedelta(seconds=max(seconds, 0)))
