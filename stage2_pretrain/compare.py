"""``cocomix compare RUN_OR_EVAL_JSON...``: every metric of several eval.json files in one table.

The table has the paper's Table 1 shape, one row per run. Columns, in this order:

1. perplexities: the ``--tokens`` validation PPL, each ``--ppl-tokens`` store, each task's
   perplexity (``word_perplexity`` for wikitext, ``perplexity`` for lambada_openai);
2. each task's accuracy (``acc``);
3. ``avg``: the mean accuracy over the multiple-choice tasks (lambada's exact-word accuracy is
   shown but not averaged, as in the paper), for runs that have all of them;
4. every other metric the harness reported (``acc_norm``, ``byte_perplexity``, ``bits_per_byte``, ...).

:func:`metric_table` builds it from ``(name, eval dict)`` pairs (``cocomix study`` reuses it);
:func:`print_table`, :func:`table_json` and :func:`plot_table` show it.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

from cocomix.core.errors import CocomixError, ConfigError
from cocomix.stage2_pretrain.config import CompareConfig
from cocomix.stage2_pretrain.harness import PAPER_TASKS

log = logging.getLogger(__name__)

TASK_TITLES = {"lambada_openai": "LAMBADA", "wikitext": "WikiText", "hellaswag": "HellaSwag", "piqa": "PIQA",
               "social_iqa": "SIQA", "arc_easy": "ARC-E", "winogrande": "WinoGrande"}
PPL_METRICS = ("word_perplexity", "perplexity")  #: a task's perplexity column: the first of these it has
ACC = "acc"
AVG = "avg"


class Column(NamedTuple):
    """One metric column: ``key`` (``val_ppl``, ``ppl/<store>``, ``<task>/<metric>`` or ``avg``)."""

    key: str
    title: str
    group: str  #: "ppl", "acc", "avg" or "other" (the order of the table)
    lower_is_better: bool
    percent: bool  #: shown x100 (accuracies are stored as fractions)


class MetricRow(NamedTuple):
    """One run: column key -> value as stored in eval.json (accuracies as fractions), and stderr."""

    name: str
    values: dict[str, float | None]
    stderr: dict[str, float | None]


class MetricTable(NamedTuple):
    columns: list[Column]
    rows: list[MetricRow]


# ----------------------------------------------------------------------------- building the table
def metric_table(runs: list[tuple[str, dict]]) -> MetricTable:
    """The table of ``runs`` = ``[(name, eval.json dict), ...]``; a metric a run lacks is None."""
    columns = _columns([ev for _, ev in runs])
    mc_acc = [c.key for c in columns if c.group == "acc" and _is_multiple_choice(runs, c.key.split("/")[0])]
    if mc_acc:
        at = max(i for i, c in enumerate(columns) if c.group in ("ppl", "acc")) + 1
        columns.insert(at, Column(AVG, "avg", AVG, False, True))
    rows = []
    for name, ev in runs:
        values, stderr = _values(ev)
        picked = [values.get(k) for k in mc_acc]
        values[AVG] = sum(picked) / len(picked) if mc_acc and None not in picked else None
        rows.append(MetricRow(name, {c.key: values.get(c.key) for c in columns}, {c.key: stderr.get(c.key) for c in columns}))
    return MetricTable(columns, rows)


def _columns(evals: list[dict]) -> list[Column]:
    cols: list[Column] = []
    if any("val_ppl" in ev for ev in evals):
        cols.append(Column("val_ppl", "val PPL", "ppl", True, False))
    for store in _union(sorted(ev.get("ppl", {})) for ev in evals):
        cols.append(Column(f"ppl/{store}", f"{store} PPL", "ppl", True, False))
    tasks = _union(sorted(ev.get("tasks", {})) for ev in evals)
    for task in sorted(tasks, key=lambda t: (PAPER_TASKS.index(t) if t in PAPER_TASKS else len(PAPER_TASKS), tasks.index(t))):
        cols += _task_columns(task, [ev["tasks"][task] for ev in evals if task in ev.get("tasks", {})])
    order = {"ppl": 0, "acc": 1, "other": 2}
    return sorted(cols, key=lambda c: order[c.group])  # stable: keeps the order within a group


def _task_columns(task: str, entries: list[dict]) -> list[Column]:
    title = TASK_TITLES.get(task, task)
    metrics = _union(list(e.get("metrics", {})) for e in entries)
    higher = {m: h for e in entries for m, h in e.get("higher_is_better", {}).items()}
    ppl = next((m for m in PPL_METRICS if m in metrics), None)
    cols = []
    for m in metrics:
        lower = not higher.get(m.split(",")[0], m != ppl)
        if m == ppl:
            cols.append(Column(f"{task}/{m}", f"{title} PPL", "ppl", True, False))
        elif m == ACC:
            cols.append(Column(f"{task}/{m}", title, "acc", False, True))
        else:
            cols.append(Column(f"{task}/{m}", f"{title} {m}", "other", lower, m.startswith("acc")))
    return cols


def _values(ev: dict) -> tuple[dict, dict]:
    values = {"val_ppl": ev.get("val_ppl")}
    values.update({f"ppl/{name}": entry.get("ppl") for name, entry in ev.get("ppl", {}).items()})
    stderr = {}
    for task, entry in ev.get("tasks", {}).items():
        values.update({f"{task}/{m}": v for m, v in entry.get("metrics", {}).items()})
        stderr.update({f"{task}/{m}": v for m, v in entry.get("stderr", {}).items()})
    return values, stderr


def _is_multiple_choice(runs: list[tuple[str, dict]], task: str) -> bool:
    return any(ev.get("tasks", {}).get(task, {}).get("output_type") == "multiple_choice" for _, ev in runs)


def _union(lists) -> list[str]:
    return list(dict.fromkeys(x for xs in lists for x in xs))


# ----------------------------------------------------------------------------- showing it
def fmt(col: Column, value: float | None, digits: int | None = None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if col.percent:
        return f"{100 * value:.{1 if digits is None else digits}f}"
    return f"{value:.{2 if digits is None else digits}f}" if col.group == "ppl" else f"{value:.4g}"


def print_table(table: MetricTable, title: str = "compare") -> None:
    """A rich table; stderr (when the harness gave one) under each value, the best run in bold."""
    from rich.table import Table

    from cocomix.core.logs import console

    out = Table(title=title, caption="accuracies in %, avg: mean over the multiple-choice tasks, ±: stderr")
    out.add_column("run", overflow="fold")
    for col in table.columns:
        out.add_column(f"{col.title} {'↓' if col.lower_is_better else '↑'}", justify="right", overflow="fold")
    for row in table.rows:
        out.add_row(row.name, *(_cell(table, col, row) for col in table.columns))
    console.print(out)


def _cell(table: MetricTable, col: Column, row: MetricRow) -> str:
    value, err = row.values.get(col.key), row.stderr.get(col.key)
    text = fmt(col, value)
    present = [r.values[col.key] for r in table.rows if r.values.get(col.key) is not None]
    if len(table.rows) > 1 and value is not None and value == (min if col.lower_is_better else max)(present):
        text = f"[bold]{text}[/]"
    if err is not None:
        text += f"\n[dim]±{fmt(col, err)}[/]"
    return text


def table_json(table: MetricTable) -> str:
    return json.dumps({"columns": [c._asdict() for c in table.columns], "rows": [r._asdict() for r in table.rows]}, indent=2)


def plot_table(table: MetricTable, path: Path) -> Path:
    """One bar panel per column (runs side by side, value on each bar) into an image file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = table.columns
    ncols = min(4, len(cols))
    nrows = math.ceil(len(cols) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.7 * nrows + 0.8), squeeze=False)
    colors = plt.get_cmap("tab10").colors
    for ax, col in zip(axes.flat, cols, strict=False):  # spare panels stay empty
        values = [row.values.get(col.key) for row in table.rows]
        shown = [(100 if col.percent else 1) * v if v is not None else 0.0 for v in values]
        bars = ax.bar(range(len(values)), shown, color=[colors[i % len(colors)] for i in range(len(values))])
        ax.bar_label(bars, labels=[fmt(col, v) for v in values], fontsize=8)
        ax.set_title(f"{col.title}{' %' if col.percent else ''} ({'lower' if col.lower_is_better else 'higher'} is better)", fontsize=9)
        ax.set_xticks([])
        ax.margins(y=0.2)
    for ax in list(axes.flat)[len(cols):]:
        ax.set_visible(False)
    fig.legend([plt.Rectangle((0, 0), 1, 1, color=colors[i % len(colors)]) for i in range(len(table.rows))],
               [row.name for row in table.rows], loc="upper center", ncol=min(4, len(table.rows)), frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- cocomix compare
def find_eval_json(path: str) -> tuple[str, Path]:
    """``(row name, eval.json file)`` for an eval.json, a checkpoint folder or a run folder
    (its ``final/``, else its newest checkpoint with an eval.json)."""
    from cocomix.stage2_pretrain.checkpoint import complete_checkpoints

    p = Path(path)
    if not p.exists():
        raise CocomixError(f"{path} does not exist; pass run folders, checkpoint folders or eval.json files")
    candidates = [p] if p.is_file() else [p / "eval.json", p / "final" / "eval.json",
                                          *[c / "eval.json" for c in reversed(complete_checkpoints(p))]]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        raise CocomixError(f"{path} holds no eval.json (nor final/eval.json); run `cocomix eval CKPT --tasks paper` on its checkpoint first")
    return run_name(found.parent), found


def run_name(folder: Path) -> str:
    folder = folder.resolve()
    if folder.name == "final":
        return folder.parent.name
    if folder.parent.name == "checkpoints":
        return f"{folder.parent.parent.name}/{folder.name}"
    return folder.name


def load_runs(paths: list[str]) -> list[tuple[str, dict]]:
    from cocomix.stage2_pretrain.evaluate import read_eval_json

    runs, seen = [], {}
    for path in paths:
        name, file = find_eval_json(path)
        seen[name] = seen.get(name, 0) + 1
        runs.append((name if seen[name] == 1 else f"{name} ({seen[name]})", read_eval_json(file)))
    return runs


def run_compare(cfg: CompareConfig) -> MetricTable:
    """Print (or write as JSON, or plot) the table of ``cfg.runs``."""
    if cfg.plot is not None:
        check_plot_suffix(Path(cfg.plot))
    table = metric_table(load_runs(cfg.runs))
    if not table.columns:
        raise CocomixError("none of these eval.json files holds a metric; run `cocomix eval` on the checkpoints first")
    if cfg.json:
        print(table_json(table))
    else:
        print_table(table)
    if cfg.plot is not None:
        log.info("plot written to %s", plot_table(table, Path(cfg.plot)))
    return table


def check_plot_suffix(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    known = Figure().canvas.get_supported_filetypes()
    if path.suffix.lstrip(".").lower() not in known:
        raise ConfigError(f"--plot {path}: unknown image type {path.suffix or '(none)'}; end the name with one of "
                          f"{', '.join('.' + k for k in sorted(known))}")
