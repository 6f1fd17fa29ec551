"""``cocomix study SPEC``: many students from one extraction — a grid of methods × seeds, run or planned.

::

    run_study: load + validate the spec (all configs built first)
               -> --plan: print one launch command per run, stop
               -> prepare inputs (quickstart chain; missing target folders extracted)
               -> each seed, each run: skip if finished, else resume or start; study.json after each
               -> report: study.json, results.md, curves.png

A run is finished when ``final/`` exists and its newest checkpoint is at its ``max_steps`` with the
same config; a run with checkpoints is resumed (``pretrain --resume``); a folder without one is
started over. So a killed study re-run continues where it stopped. Spec format: :mod:`.study_spec`;
statistics: :mod:`.study_stats`; the report: :mod:`.study_report`.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shlex
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from cocomix.core.configs import arg, flag, flag_name
from cocomix.core.errors import CocomixError, ConfigError
from cocomix.core.logs import console
from cocomix.core.workspace import workspace_root
from cocomix.pipeline import study_report as report
from cocomix.pipeline.study_spec import (
    Spec,
    extract_config,
    load_spec,
    pretrain_config,
    run_dir,
    task_eval_config,
    validate,
)

log = logging.getLogger(__name__)

STUDY_JSON = "study.json"
DEFAULT_LAUNCH = "accelerate launch --config_file configs/accelerate/ddp.yaml"


@dataclass
class StudyConfig:
    """Run a study (methods x seeds from one extraction) from a TOML spec or a built-in (`paper-69m`, `mini`)."""

    RESUME = "re-run the same command: finished runs are skipped, the interrupted one resumes from its last checkpoint"  #: printed after Ctrl-C (no annotation: not a flag)

    spec: str = arg(help="A study spec: a TOML file, or a built-in name (`paper-69m`: the paper's 69m grid, 3 seeds; `mini`: the same grid at `tiny` on a CPU in about 30 min).")
    workspace: str | None = flag(None, help="Workspace folder ({workspace} in the spec). Default: $COCOMIX_WORKSPACE or ./cocomix-workspace.")
    out: str | None = flag(None, help="Study folder (runs/, study.json, results.md, curves.png). Default: <workspace>/studies/<name>.")
    plan: bool = flag(False, help="Print one launch command per run (and per missing target folder) for a cluster scheduler instead of running.")
    launch: str = flag(DEFAULT_LAUNCH, help="Command prefix of every --plan line (e.g. `accelerate launch --config_file configs/accelerate/fsdp.yaml`).")
    only: str | None = flag(None, help="Comma-separated run names: run (or plan) only these; the report still covers every finished run.")
    seeds: str | None = flag(None, help="Comma-separated seeds instead of the spec's (e.g. 0,1).")
    report: bool = flag(False, help="Train nothing: rebuild study.json, results.md and curves.png from the runs finished so far (e.g. after a cluster ran the --plan).")

    def __post_init__(self) -> None:
        if self.plan and self.report:
            raise ConfigError("--plan and --report exclude each other")
        if self.seeds is not None:
            try:
                seeds = [int(s) for s in self.seeds.split(",") if s.strip()]
            except ValueError:
                raise ConfigError(f"--seeds must be comma-separated integers, got {self.seeds!r}") from None
            if not seeds or len(set(seeds)) != len(seeds):
                raise ConfigError(f"--seeds must name at least one seed, each once, got {self.seeds!r}")


@dataclass
class StudyResult:
    """Where the study went and what it found."""

    out: Path
    statuses: dict[str, str]                #: "<run>/seed-<s>" -> done | trained | failed: ... | pending
    summaries: list[report.MethodSummary]
    plan_lines: list[str]                   #: with --plan: the printed commands


class Study(typing.NamedTuple):
    """A loaded, validated study: its spec and what this invocation covers."""

    spec: Spec
    out: Path
    workspace: Path
    seeds: tuple[int, ...]
    runs: tuple[str, ...]                   #: run names this invocation trains (--only)


def open_study(cfg: StudyConfig) -> Study:
    """Load the spec, apply --seeds/--only, and validate every config before anything runs."""
    workspace = workspace_root(cfg.workspace)
    out = Path(cfg.out) if cfg.out else None
    spec = load_spec(cfg.spec, workspace, out)
    out = out or workspace / "studies" / spec.name
    seeds = tuple(int(s) for s in cfg.seeds.split(",") if s.strip()) if cfg.seeds else spec.seeds
    names = tuple(r.name for r in spec.runs)
    only = tuple(n.strip() for n in cfg.only.split(",") if n.strip()) if cfg.only else names
    unknown = [n for n in only if n not in names]
    if unknown:
        raise ConfigError(f"--only {unknown[0]!r} is not a run of study {spec.name} ({', '.join(names)})")
    validate(spec, seeds, out, workspace)
    return Study(spec, out, workspace, seeds, only)


def run_study(cfg: StudyConfig) -> StudyResult:
    study = open_study(cfg)
    if cfg.plan:
        lines = plan_lines(study, cfg.launch)
        for line in lines:
            print(line)
        return StudyResult(study.out, {}, [], lines)
    study.out.mkdir(parents=True, exist_ok=True)
    statuses = {key: "pending" for key in _keys(study)}
    if not cfg.report:
        prepare_inputs(study)
        for seed in study.seeds:
            for name in study.runs:
                statuses[f"{name}/seed-{seed}"] = train_one(study, name, seed, statuses)
    summaries = write_report(study, statuses)
    failed = [k for k, v in statuses.items() if v.startswith("failed")]
    if failed:
        raise CocomixError(f"{len(failed)} run(s) failed ({'; '.join(f'{k}: {statuses[k][8:]}' for k in failed)}); "
                           f"the report in {study.out} covers the finished ones; fix and re-run to continue")
    return StudyResult(study.out, statuses, summaries, [])


# ----------------------------------------------------------------------------- inputs
def prepare_inputs(study: Study) -> None:
    """The quickstart chain when the spec asks for it, then every missing target folder, in spec order."""
    spec = study.spec
    if spec.prepare == "quickstart":
        from cocomix.pipeline.quickstart import QuickstartConfig, build_teacher_chain, quickstart_paths

        recorded = study.workspace / "quickstart" / "quickstart.json"  # a quickstart run there: reuse it as it was made
        settings = json.loads(recorded.read_text()) if recorded.exists() else {}
        known = {f.name for f in dataclasses.fields(QuickstartConfig)}
        settings = {k: v for k, v in settings.items() if k in known} | {"workspace": str(study.workspace), "fresh": False}
        qcfg = QuickstartConfig(**settings)
        log.info("study %s: tokens, teacher and SAE of the quickstart in %s (built once, then reused)",
                 spec.name, study.workspace / "quickstart")
        build_teacher_chain(quickstart_paths(str(study.workspace)), qcfg)
    for target in needed_targets(study):
        if (target.path / "manifest.json").exists():
            continue
        if not target.extract:
            raise CocomixError(f"study {spec.name}: target folder {target.path} (targets.{target.name}) is missing "
                               "or unfinished and the spec has no `extract` table to make it")
        from cocomix.pipeline.chain import run_extract_chain  # tokenizes a `corpus` first, as `cocomix extract` does

        log.info("study %s: extracting targets.%s into %s", spec.name, target.name, target.path)
        run_extract_chain(extract_config(spec, target, study.workspace))


def needed_targets(study: Study) -> list:
    """The target folders the selected runs read, in spec order (the first may tokenize for the others)."""
    used = {study.spec.run(name).targets for name in study.runs}
    return [t for t in study.spec.targets.values() if t.name in used]


# ----------------------------------------------------------------------------- runs
def run_state(out: Path, cfg) -> str:
    """``done`` (finished with this config), ``resume`` (has a checkpoint), ``restart`` (a folder without
    one) or ``new``."""
    from cocomix.stage2_pretrain import checkpoint as ckpt_io

    ckpt = ckpt_io.latest_checkpoint(out) if out.exists() else None
    if ckpt is None:
        return "restart" if out.exists() and any(out.iterdir()) else "new"
    record = json.loads((out / "run.json").read_text()) if (out / "run.json").exists() else None
    if record and (out / "final").exists() and ckpt_io.read_trainer_state(ckpt).step == record["plan"]["max_steps"] \
            and same_config(record["config"], cfg):
        return "done"
    return "resume"


def same_config(recorded: dict, cfg) -> bool:
    """The recorded pretrain config equals ``cfg`` in every flag but --resume/--overwrite."""
    now = dataclasses.asdict(cfg)
    return all(recorded.get(k) == v for k, v in now.items() if k not in ("resume", "overwrite"))


def train_one(study: Study, name: str, seed: int, statuses: dict[str, str]) -> str:
    """Train (or skip, or resume) one run; its status; study.json updated before and after."""
    from cocomix.stage2_pretrain.train import run_pretrain

    spec, key = study.spec, f"{name}/seed-{seed}"
    out = run_dir(study.out, name, seed)
    state = run_state(out, pretrain_config(spec, spec.run(name), seed, study.out, study.workspace))
    if state == "done":
        console.print(f"[bold]study[/] {key}: finished, skipped", highlight=False)
        return "done"
    console.print(f"[bold]study[/] {key}: {'resuming' if state == 'resume' else 'training'} in {out}", highlight=False)
    cfg = pretrain_config(spec, spec.run(name), seed, study.out, study.workspace, resume=state == "resume",
                          overwrite=state == "restart")
    write_study_json(study, {**statuses, key: "running"}, None)
    t0 = time.monotonic()
    try:
        result = run_pretrain(cfg)
        if spec.tasks:
            from cocomix.stage2_pretrain.evaluate import run_eval

            run_eval(task_eval_config(spec, result.final))
    except CocomixError as err:
        log.error("study %s: %s", key, err)
        return f"failed: {err}"
    log.info("study %s: trained in %.1f min", key, (time.monotonic() - t0) / 60)
    return "trained"


# ----------------------------------------------------------------------------- --plan
ALWAYS = ("method", "size", "seed")  #: flags a --plan line spells out even at their default (easier to read)


def config_argv(cfg, command: str) -> list[str]:
    """The CLI arguments that rebuild ``cfg`` (positionals first, then ALWAYS and every flag off its default)."""
    argv = [command]
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.metadata.get("positional"):
            argv.insert(1, str(value))
        elif value != f.default or (f.name in ALWAYS and value is not None):
            if isinstance(value, bool):
                argv.append(flag_name(f.name) if value else f"--no-{f.name.replace('_', '-')}")
            elif value is not None:
                argv += [flag_name(f.name), str(value)]
    return argv


def plan_lines(study: Study, launch: str) -> list[str]:
    """Comment lines, then: extract commands for missing target folders (run these first, in order),
    one pretrain command per run and seed (each with --resume: a preempted job re-submitted continues),
    and with tasks one eval command per run."""
    spec, cli = study.spec, f"{launch} -m cocomix.pipeline.cli"
    lines = [f"# study {spec.name}: {len(study.runs)} runs x {len(study.seeds)} seeds = "
             f"{len(study.runs) * len(study.seeds)} pretrain jobs ({spec.source})"]
    if spec.prepare == "quickstart":
        lines.append(f"# first: cocomix quickstart --workspace {shlex.quote(str(study.workspace))} "
                     "(or `cocomix study` itself) builds the tokens, teacher and SAE this spec reads")
    missing = [t for t in needed_targets(study) if not (t.path / "manifest.json").exists()]
    if missing:
        lines.append("# stage 1 first (in this order): target folders not finished yet")
        for t in missing:
            lines.append(f"{cli} {shlex.join(config_argv(extract_config(spec, t, study.workspace), 'extract'))}")
    lines.append("# stage 2: independent jobs (any order, any number at once)")
    for seed in study.seeds:
        for name in study.runs:
            cfg = pretrain_config(spec, spec.run(name), seed, study.out, study.workspace, resume=True)
            lines.append(f"{cli} {shlex.join(config_argv(cfg, 'pretrain'))}")
    if spec.tasks:
        lines.append("# after each run: task scores")
        for seed in study.seeds:
            for name in study.runs:
                final = run_dir(study.out, name, seed) / "final"
                lines.append(f"cocomix {shlex.join(config_argv(task_eval_config(spec, final), 'eval'))}")
    ws = f" --workspace {shlex.quote(str(study.workspace))}"
    lines.append(f"# then the report: cocomix study {shlex.quote(spec.source.removeprefix('built-in '))}{ws} --report")
    return lines


# ----------------------------------------------------------------------------- report
def _keys(study: Study) -> list[str]:
    return [f"{r.name}/seed-{s}" for s in study.seeds for r in study.spec.runs]


def write_report(study: Study, statuses: dict[str, str]) -> list[report.MethodSummary]:
    """Read every run folder of the spec (all runs, not only --only's) and write the three outputs."""
    spec = study.spec
    results = [r for s in study.seeds for run in spec.runs
               if (r := report.read_run(run_dir(study.out, run.name, s), run.name, s)) is not None]
    for r in results:
        key = f"{r.run}/seed-{r.seed}"
        if statuses.get(key) == "pending":
            statuses[key] = "done" if r.final_ppl is not None else "partial"
    summaries = report.summarize(results, [r.name for r in spec.runs], spec.baseline)
    write_study_json(study, statuses, summaries)
    md = report.results_markdown(spec.name, spec.description, summaries, spec.baseline, list(study.seeds))
    (study.out / "results.md").write_text(md)
    plot = report.plot_curves(summaries, spec.baseline, study.out / "curves.png", f"study {spec.name}: validation perplexity")
    console.print(md, markup=False, highlight=False)
    console.print(f"[bold]study[/] {spec.name}: {study.out / 'results.md'}"
                  f"{', ' + str(plot) if plot else ''}, {study.out / STUDY_JSON}", highlight=False)
    return summaries


def write_study_json(study: Study, statuses: dict[str, str], summaries: list | None) -> None:
    from cocomix.storage.files import atomic_write_json

    spec = study.spec
    runs = [{"run": r.name, "seed": s, "targets": r.targets, "out": str(run_dir(study.out, r.name, s)),
             "status": statuses.get(f"{r.name}/seed-{s}", "pending"),
             "config": dataclasses.asdict(pretrain_config(spec, r, s, study.out, study.workspace))}
            for s in study.seeds for r in spec.runs]
    record = {"name": spec.name, "source": spec.source, "spec": spec.raw, "seeds": list(study.seeds),
              "baseline": spec.baseline, "targets": {t.name: str(t.path) for t in spec.targets.values()},
              "tokens": str(spec.tokens), "runs": runs}
    if summaries is not None:
        record["results"] = {s.run: _summary_json(s) for s in summaries}
        record["tokens_to_match"] = {s.run: (s.reach.tokens if s.reach else None) for s in summaries}
    elif (study.out / STUDY_JSON).exists():  # keep the last results while runs are in progress
        before = json.loads((study.out / STUDY_JSON).read_text())
        record.update({k: before[k] for k in ("results", "tokens_to_match") if k in before})
    atomic_write_json(study.out / STUDY_JSON, record)


def _summary_json(s: report.MethodSummary) -> dict:
    return {
        "method": s.method, "seeds": s.seeds, "val_ppl": s.ppl._asdict() if s.ppl else None,
        "diff_to_baseline": s.diff._asdict() if s.diff else None, "active_params": s.active_params,
        "step_time_s": s.step_time, "tokens": s.tokens,
        "curve": [{"tokens": t, "val_ppl": m, "std": sd} for t, m, sd in s.curve],
        "tokens_to_match": s.reach._asdict() if s.reach else None,
        "tasks": {t: v._asdict() for t, v in s.tasks.items()},
    }
