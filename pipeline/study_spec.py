"""A study spec: shared inputs, target folders, defaults and runs, read from TOML and checked whole.

::

    [study]                      name, description, seeds, baseline, tasks, prepare
    [inputs]                     tokens = "{workspace}/tokens/openwebtext"
    [targets.<name>]             path = "...", extract = { <extract flags> }  (run first when missing)
    [defaults]                   <pretrain flags> for every run
    [[runs]]                     name = "...", targets = "<name>", <pretrain flags>

Flags are written as the config fields (``max_steps`` or ``max-steps``). String values may use
``{workspace}``, ``{study}`` (the study folder) and ``{quickstart}`` (``<workspace>/quickstart``).
A spec is valid when every pretrain and extract config it describes can be built: validation
builds them all before anything runs, and refuses the first problem in one line naming the run
and the key.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import tomllib

from cocomix.core.configs import flag_name
from cocomix.core.errors import ConfigError

SPEC_DIR = "study_specs"
TOP_KEYS = {"study", "inputs", "targets", "defaults", "runs"}
STUDY_KEYS = {"name", "description", "seeds", "baseline", "tasks", "prepare"}
TARGET_KEYS = {"path", "extract"}
PREPARE = ("quickstart",)  #: inputs a study can build itself
#: pretrain flags the study sets for every run (never in a spec)
PRETRAIN_OWNED = {"tokens": "inputs.tokens", "targets": "a run's `targets` key", "out": "the study folder",
                  "seed": "study.seeds", "resume": "the study (finished runs are skipped, others resumed)",
                  "overwrite": "the study", "workspace": "--workspace of `cocomix study`"}
EXTRACT_OWNED = {"out": "the target's `path`", "overwrite": "the study", "workspace": "--workspace of `cocomix study`"}


@dataclass(frozen=True)
class TargetSpec:
    """One target folder the runs read; ``extract`` (extract flags) makes it when it is missing."""

    name: str
    path: Path
    extract: dict


@dataclass(frozen=True)
class RunSpec:
    """One method of the study: a name, the target folder it reads and its own pretrain flags."""

    name: str
    targets: str
    flags: dict


@dataclass(frozen=True)
class Spec:
    """A parsed, path-resolved study spec (not yet validated against the configs: see :func:`validate`)."""

    name: str
    description: str
    source: str                  #: the TOML file, or `built-in <name>`
    seeds: tuple[int, ...]
    baseline: str                #: the run the differences and the tokens-to-match are measured against
    tasks: tuple[str, ...]       #: lm-evaluation-harness tasks scored on every final checkpoint
    prepare: str | None          #: `quickstart`: build the quickstart's tokens, teacher and SAE first
    tokens: Path
    targets: dict[str, TargetSpec]
    defaults: dict
    runs: tuple[RunSpec, ...]
    raw: dict                    #: the TOML as read (recorded in study.json)

    def run(self, name: str) -> RunSpec:
        return next(r for r in self.runs if r.name == name)


def builtin_names() -> list[str]:
    folder = resources.files("cocomix.pipeline") / SPEC_DIR
    return sorted(p.name.removesuffix(".toml") for p in folder.iterdir() if p.name.endswith(".toml"))


def read_spec_text(spec: str) -> tuple[str, str]:
    """(TOML text, source) of a spec file path or a built-in name."""
    path = Path(spec)
    if path.suffix == ".toml" or path.exists():
        if not path.is_file():
            raise ConfigError(f"SPEC {spec}: no such file; pass a TOML file or a built-in ({', '.join(builtin_names())})")
        return path.read_text(), str(path)
    if spec not in builtin_names():
        raise ConfigError(f"SPEC {spec!r} is neither a TOML file nor a built-in study ({', '.join(builtin_names())})")
    return (resources.files("cocomix.pipeline") / SPEC_DIR / f"{spec}.toml").read_text(), f"built-in {spec}"


def load_spec(spec: str, workspace: Path, study_dir: Path | None = None) -> Spec:
    """Parse a spec (file or built-in); paths resolved against ``workspace`` and the study folder."""
    text, source = read_spec_text(spec)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"SPEC {source}: not valid TOML ({err})") from None
    name = _table(raw, "study", source).get("name") or Path(spec).stem
    study_dir = study_dir or workspace / "studies" / name
    places = {"{workspace}": str(workspace), "{study}": str(study_dir), "{quickstart}": str(workspace / "quickstart")}
    return parse_spec(_expand(raw, places), source=source, name=name, record=raw)


def parse_spec(raw: dict, *, source: str, name: str, record: dict | None = None) -> Spec:
    """Check the structure (known keys, unique names, types of the study's own keys) and build a :class:`Spec`;
    ``record``: the TOML before placeholders were filled in (kept in study.json)."""
    where = f"study {name}"
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{where}: study.name must be a folder-safe string, got {name!r}")
    _known(raw, TOP_KEYS, where)
    study = _table(raw, "study", where)
    _known(study, STUDY_KEYS, f"{where}: study")
    seeds = _int_list(study.get("seeds", [0]), f"{where}: study.seeds")
    if len(set(seeds)) != len(seeds) or not seeds:
        raise ConfigError(f"{where}: study.seeds must be a non-empty list without repeats, got {seeds}")
    prepare = study.get("prepare")
    if prepare is not None and prepare not in PREPARE:
        raise ConfigError(f"{where}: study.prepare must be one of {', '.join(PREPARE)}, got {prepare!r}")
    inputs = _table(raw, "inputs", where)
    _known(inputs, {"tokens"}, f"{where}: inputs")
    if not isinstance(inputs.get("tokens"), str):
        raise ConfigError(f"{where}: inputs.tokens (the token store every run reads) is missing")
    targets = _targets(_table(raw, "targets", where), where)
    runs = _runs(raw.get("runs", []), targets, where)
    baseline = study.get("baseline", "ntp")
    if baseline not in {r.name for r in runs}:
        raise ConfigError(f"{where}: study.baseline {baseline!r} is not a run name ({', '.join(r.name for r in runs)})")
    tasks = study.get("tasks", [])
    if not (isinstance(tasks, list) and all(isinstance(t, str) for t in tasks)):
        raise ConfigError(f"{where}: study.tasks must be a list of task names, got {tasks!r}")
    defaults = {_field(k): v for k, v in _table(raw, "defaults", where).items()}
    return Spec(name, str(study.get("description", "")), source, tuple(seeds), baseline, tuple(tasks), prepare,
                Path(inputs["tokens"]), targets, defaults, tuple(runs), record if record is not None else raw)


# ----------------------------------------------------------------------------- validation
def validate(spec: Spec, seeds: tuple[int, ...], study_dir: Path, workspace: Path) -> None:
    """Build every config the study would run; the first invalid key is refused in one line."""
    from cocomix.stage2_pretrain.config import PretrainConfig

    for target in spec.targets.values():
        if target.extract:
            extract_config(spec, target, workspace)
    _check_flags(PretrainConfig, spec.defaults, PRETRAIN_OWNED, f"study {spec.name}: defaults")
    for run in spec.runs:
        _check_flags(PretrainConfig, run.flags, PRETRAIN_OWNED, f"study {spec.name}: run {run.name!r}")
        for seed in seeds:
            pretrain_config(spec, run, seed, study_dir, workspace)
    if spec.tasks:
        task_eval_config(spec, Path("final"))


def pretrain_config(spec: Spec, run: RunSpec, seed: int, study_dir: Path, workspace: Path, *, resume: bool = False,
                    overwrite: bool = False):
    """The ``PretrainConfig`` of one run and seed (its folder: ``<study>/runs/<run>/seed-<seed>``)."""
    from cocomix.stage2_pretrain.config import PretrainConfig

    kwargs = {**spec.defaults, **run.flags, "tokens": str(spec.tokens), "targets": str(spec.targets[run.targets].path),
              "out": str(run_dir(study_dir, run.name, seed)), "seed": seed, "resume": resume, "overwrite": overwrite,
              "workspace": str(workspace)}
    return _build(PretrainConfig, kwargs, f"study {spec.name}: run {run.name!r}")


def extract_config(spec: Spec, target: TargetSpec, workspace: Path):
    """The ``ExtractConfig`` that makes target folder ``target`` (tokens: the study's unless it names a corpus)."""
    from cocomix.stage1_extract.config import ExtractConfig

    where = f"study {spec.name}: targets.{target.name}.extract"
    _check_flags(ExtractConfig, target.extract, EXTRACT_OWNED, where)
    kwargs = {**target.extract, "out": str(target.path), "workspace": str(workspace)}
    if "corpus" not in kwargs:
        kwargs.setdefault("tokens", str(spec.tokens))
    return _build(ExtractConfig, kwargs, where)


def task_eval_config(spec: Spec, ckpt: Path):
    """``cocomix eval CKPT --tasks ...`` for the spec's tasks (refused when this version's eval has no --tasks)."""
    from cocomix.stage2_pretrain.config import EvalConfig

    if "tasks" not in {f.name for f in dataclasses.fields(EvalConfig)}:
        raise ConfigError(f"study {spec.name}: study.tasks needs `cocomix eval --tasks`, which this version lacks; "
                          "drop `tasks` from the spec")
    return _build(EvalConfig, {"ckpt": str(ckpt), "tokens": str(spec.tokens), "tasks": ",".join(spec.tasks)},
                  f"study {spec.name}: study.tasks")


def run_dir(study_dir: Path, run: str, seed: int) -> Path:
    return study_dir / "runs" / run / f"seed-{seed}"


# ----------------------------------------------------------------------------- helpers
def _build(cls, kwargs: dict, where: str):
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _check_flags(cls, flags: dict, owned: dict, where: str) -> None:
    """Every key a field of ``cls`` not set by the study, every value of the field's type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls) if f.init}
    command = "pretrain" if cls.__name__ == "PretrainConfig" else "extract"
    for key, value in flags.items():
        if key in owned:
            raise ConfigError(f"{where}: key {key!r} is set by {owned[key]}, not in the spec")
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r} (not a flag of `cocomix {command}` in this version)")
        _check_type(hints[key], value, f"{where}: {key} ({flag_name(key)})")


def _check_type(hint, value, where: str) -> None:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool),
          str: isinstance(value, str)}.get(base, True)
    if not ok:
        raise ConfigError(f"{where} must be {getattr(base, '__name__', base)}, got {value!r}")


def _field(key: str) -> str:
    return key.replace("-", "_")


def _known(table: dict, keys: set, where: str) -> None:
    unknown = sorted(set(table) - keys)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(sorted(keys))})")


def _table(raw: dict, key: str, where: str) -> dict:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a table")
    return value


def _int_list(value, where: str) -> list[int]:
    if not (isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)):
        raise ConfigError(f"{where} must be a list of integers, got {value!r}")
    return value


def _targets(table: dict, where: str) -> dict[str, TargetSpec]:
    out = {}
    for name, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: targets.{name} must be a table with `path` (and optionally `extract`)")
        _known(entry, TARGET_KEYS, f"{where}: targets.{name}")
        if not isinstance(entry.get("path"), str):
            raise ConfigError(f"{where}: targets.{name}.path (the target folder) is missing")
        extract = entry.get("extract", {})
        if not isinstance(extract, dict):
            raise ConfigError(f"{where}: targets.{name}.extract must be a table of extract flags")
        out[name] = TargetSpec(name, Path(entry["path"]), {_field(k): v for k, v in extract.items()})
    if not out:
        raise ConfigError(f"{where}: no targets.<name> table; every run reads a target folder")
    return out


def _runs(entries, targets: dict[str, TargetSpec], where: str) -> list[RunSpec]:
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where}: no runs entries; add at least one run (name, method, flags)")
    runs, first = [], next(iter(targets))
    for i, entry in enumerate(entries):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name or "/" in name:
            raise ConfigError(f"{where}: run #{i + 1} needs a `name` (a folder-safe string)")
        if name in {r.name for r in runs}:
            raise ConfigError(f"{where}: run {name!r}: duplicate run name (run names must be unique)")
        target = entry.get("targets", first)
        if target not in targets:
            raise ConfigError(f"{where}: run {name!r}: key 'targets' names {target!r}, not a targets.<name> table "
                              f"({', '.join(targets)})")
        flags = {_field(k): v for k, v in entry.items() if k not in ("name", "targets")}
        runs.append(RunSpec(name, target, flags))
    return runs


def _expand(value, places: dict[str, str]):
    """Replace ``{workspace}``-style placeholders in every string of a parsed TOML value."""
    if isinstance(value, str):
        for key, path in places.items():
            value = value.replace(key, path)
        return value
    if isinstance(value, dict):
        return {k: _expand(v, places) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, places) for v in value]
    return value
