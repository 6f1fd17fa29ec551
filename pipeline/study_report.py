"""What a study reports: per-run numbers read back from run folders, per-method summaries,
``results.md`` and ``curves.png``.

Everything here reads finished files (``run.json``, ``metrics.jsonl``, ``final/eval.json``), so a
report can be rebuilt at any time, also from runs a cluster scheduler trained.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

from cocomix.pipeline.study_stats import Interval, Reach, Spread, mean_curve, paired_interval, spread, tokens_to_reach

log = logging.getLogger(__name__)

#: the one score shown per task, first found wins: a perplexity where the task has one (the paper's
#: LAMBADA and WikiText columns), else accuracy
TASK_METRICS = ("word_perplexity", "perplexity", "acc", "acc_norm")


class RunResult(NamedTuple):
    """One finished (or partly finished) run, as its folder records it."""

    run: str
    seed: int
    method: str
    curve: list[tuple[float, float]]  #: (tokens trained, val PPL) at every evaluation
    final_ppl: float | None           #: val PPL at the last step (None: not finished)
    active_params: int
    step_time: float | None           #: median seconds per optimizer step over the logged windows
    tokens: int                       #: tokens trained at max_steps
    tasks: dict[str, float]           #: task -> score, from final/eval.json


class MethodSummary(NamedTuple):
    """One run name of the study over its seeds."""

    run: str
    method: str
    seeds: list[int]
    ppl: Spread | None                #: final val PPL over the finished seeds
    diff: Interval | None             #: paired difference to the baseline's final val PPL
    active_params: int | None
    step_time: float | None           #: mean over seeds of each seed's median step time
    tokens: int | None                #: tokens trained
    curve: list[tuple[float, float, float | None]]  #: mean curve: tokens, mean PPL, std PPL
    reach: Reach | None               #: tokens to reach the baseline's final val PPL on the mean curve
    tasks: dict[str, Spread]


def read_run(out: Path, run: str, seed: int) -> RunResult | None:
    """The numbers of run folder ``out``; None when it has not started (no run.json)."""
    record_file = out / "run.json"
    if not record_file.exists():
        return None
    record = json.loads(record_file.read_text())
    plan = record["plan"]
    evals, steps = {}, []
    metrics = out / "metrics.jsonl"
    for line in metrics.read_text().splitlines() if metrics.exists() else []:
        r = json.loads(line)
        if r.get("kind") == "eval":
            evals[r["step"]] = r["val_ppl"]
        elif r.get("kind") == "train" and r.get("tokens_per_s"):
            steps.append(plan["batch_tokens"] / r["tokens_per_s"])
    curve = [(step * plan["batch_tokens"], ppl) for step, ppl in sorted(evals.items())]
    final = evals.get(plan["max_steps"]) if (out / "final").exists() else None
    steps.sort()
    return RunResult(run, seed, plan["method"], curve, final, record["params"]["active"],
                     steps[len(steps) // 2] if steps else None, plan["max_steps"] * plan["batch_tokens"],
                     read_task_scores(out / "final" / "eval.json"))


def read_task_scores(path: Path) -> dict[str, float]:
    """Task -> score from an eval.json's ``tasks`` entry: ``{task: {"metrics": {metric: value}}}`` as
    ``cocomix eval --tasks`` writes it (metric names may carry lm-eval's ``,filter`` suffix), or a plain
    number per task; the metric is the first of TASK_METRICS the task has."""
    if not path.exists():
        return {}
    scores = {}
    for task, entry in (json.loads(path.read_text()).get("tasks") or {}).items():
        if isinstance(entry, dict):
            metrics = {k.split(",")[0]: v for k, v in (entry.get("metrics") or entry).items()}
            entry = next((metrics[m] for m in TASK_METRICS if isinstance(metrics.get(m), (int, float))), None)
        if isinstance(entry, (int, float)):
            scores[task] = float(entry)
    return scores


def summarize(results: list[RunResult], order: list[str], baseline: str) -> list[MethodSummary]:
    """One summary per run name (in ``order``): spread, paired difference and tokens to the baseline's PPL."""
    by_run = {name: [r for r in results if r.run == name] for name in order}
    base = {r.seed: r.final_ppl for r in by_run.get(baseline, []) if r.final_ppl is not None}
    target = spread(list(base.values())).mean if base else None
    out = []
    for name in order:
        runs = by_run[name]
        done = [r for r in runs if r.final_ppl is not None]
        finals = {r.seed: r.final_ppl for r in done}
        curve = mean_curve([r.curve for r in done])
        reach = tokens_to_reach([(t, p) for t, p, _ in curve], target) if target is not None and curve else None
        times = [r.step_time for r in done if r.step_time is not None]
        task_names = sorted({t for r in done for t in r.tasks})
        tasks = {t: spread([r.tasks[t] for r in done if t in r.tasks]) for t in task_names}
        out.append(MethodSummary(
            name, runs[0].method if runs else "", sorted(finals), spread(list(finals.values())) if finals else None,
            paired_interval(finals, base) if name != baseline else None,
            runs[0].active_params if runs else None, sum(times) / len(times) if times else None,
            done[0].tokens if done else None, curve, reach, tasks))
    return out


# ----------------------------------------------------------------------------- results.md
def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A GitHub markdown table (the first two columns left-aligned, the others right-aligned)."""
    align = [":---", ":---"] + ["---:"] * (len(headers) - 2)
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines) + "\n"


def results_table(summaries: list[MethodSummary], baseline: str) -> str:
    """The per-method table of results.md (one function, so another table builder can replace it)."""
    tasks = sorted({t for s in summaries for t in s.tasks})
    headers = ["run", "method", "seeds", "val PPL (mean ± std)", f"Δ PPL vs {baseline} [95% CI]", "active params",
               "step time", f"tokens to {baseline}'s PPL", *tasks]
    base = next((s for s in summaries if s.run == baseline), None)
    rows = []
    for s in summaries:
        rows.append([s.run, s.method, str(len(s.seeds)), _ppl(s.ppl), _diff(s.diff) if s.run != baseline else "—",
                     f"{s.active_params:,}" if s.active_params else "—",
                     f"{s.step_time:.3f} s" if s.step_time is not None else "—",
                     _reach(s.reach, base.tokens if base else None), *[_ppl(s.tasks.get(t)) for t in tasks]])
    return markdown_table(headers, rows)


def results_markdown(name: str, description: str, summaries: list[MethodSummary], baseline: str,
                     seeds: list[int]) -> str:
    base = next((s for s in summaries if s.run == baseline), None)
    target = f"{base.ppl.mean:.2f}" if base and base.ppl else "not finished"
    return (
        f"# Study `{name}`\n\n{description}\n\n"
        f"{results_table(summaries, baseline)}\n"
        f"- **val PPL**: validation perplexity at the last step, mean ± sample std over the finished seeds "
        f"(of {', '.join(map(str, seeds))}).\n"
        f"- **Δ PPL vs {baseline}**: method − {baseline}, paired by seed, mean with a two-sided 95% Student-t "
        f"interval (n − 1 degrees of freedom; n = seeds both finished; none below 2). Negative = better.\n"
        f"- **tokens to {baseline}'s PPL**: training tokens at which the method's mean eval curve first reaches "
        f"{baseline}'s final val PPL ({target}), linearly interpolated between evaluations, and the change against "
        f"{baseline}'s own token count (−21.5% = needs 21.5% fewer tokens); `≤` = already at the first evaluation; "
        f"`not reached` = never within its run.\n"
        f"- **step time**: median seconds per optimizer step over the logged windows (mean over seeds).\n"
        f"- Curves: `curves.png` (val PPL against tokens, mean over seeds, band ± 1 std).\n"
    )


def _ppl(s: Spread | None) -> str:
    if s is None:
        return "—"
    return f"{s.mean:.2f} ± {s.std:.2f}" if s.std is not None else f"{s.mean:.2f}"


def _diff(d: Interval | None) -> str:
    if d is None:
        return "—"
    if d.low is None:
        return f"{d.mean:+.2f} (1 seed)"
    return f"{d.mean:+.2f} [{d.low:+.2f}, {d.high:+.2f}]"


def _reach(r: Reach | None, base_tokens: int | None) -> str:
    if r is None:
        return "—"
    if r.tokens is None:
        return "not reached"
    text = f"{'≤ ' if r.at_most else ''}{_si(r.tokens)}"
    if base_tokens:
        text += f" ({(r.tokens / base_tokens - 1) * 100:+.1f}%)"
    return text


def _si(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return f"{n:.0f}"


# ----------------------------------------------------------------------------- curves.png
def plot_curves(summaries: list[MethodSummary], baseline: str, path: Path, title: str) -> Path | None:
    """Val PPL against tokens, one line per run name (mean over seeds, ± 1 std band); None if nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter, FuncFormatter

    drawn = [s for s in summaries if s.curve]
    if not drawn:
        return None
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for s in drawn:
        tokens = [t for t, _, _ in s.curve]
        mean = [m for _, m, _ in s.curve]
        line, = ax.plot(tokens, mean, marker="o", markersize=3, label=f"{s.run} ({len(s.seeds)} seeds)",
                        linewidth=2.2 if s.run == baseline else 1.4)
        if all(sd is not None for _, _, sd in s.curve):
            ax.fill_between(tokens, [m - sd for _, m, sd in s.curve], [m + sd for _, m, sd in s.curve],
                            color=line.get_color(), alpha=0.15, linewidth=0)
    base = next((s for s in summaries if s.run == baseline and s.ppl), None)
    if base:
        ax.axhline(base.ppl.mean, color="grey", linestyle=":", linewidth=1, label=f"{baseline} final ({base.ppl.mean:.2f})")
    ax.set_yscale("log")
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    low, high = ax.get_ylim()
    def some(v, _):  # over more than a decade: label the 2s, 3s and 5s (200, 300, 500) besides the powers of ten
        lead = v / 10 ** math.floor(math.log10(v)) if v > 0 else 0
        return f"{v:g}" if round(lead) in (2, 3, 5) else ""
    ax.yaxis.set_minor_formatter(plain if high / low < 10 else FuncFormatter(some))  # within a decade: every minor tick
    ax.xaxis.set_major_formatter(EngFormatter())
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
