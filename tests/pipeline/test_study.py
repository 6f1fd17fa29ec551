"""`cocomix study`: spec parsing and refusals, the statistics against hand computations, --plan."""
from __future__ import annotations

import dataclasses
import math
import shlex
from pathlib import Path

import pytest

from cocomix.core.errors import ConfigError
from cocomix.pipeline.study import StudyConfig, config_argv, open_study, plan_lines, run_study
from cocomix.pipeline.study_spec import builtin_names, load_spec, pretrain_config
from cocomix.pipeline.study_stats import mean_curve, paired_interval, spread, t975, tokens_to_reach

SPEC = """
[study]
name = "two"
seeds = [0, 1]

[inputs]
tokens = "{workspace}/tokens/x"

[targets.main]
path = "{workspace}/targets/x"

[defaults]
size = "tiny"
max-steps = 10

[[runs]]
name = "ntp"
method = "ntp"

[[runs]]
name = "cocomix"
method = "cocomix"
lam = 0.2
"""


def write_spec(tmp_path: Path, text: str = SPEC, **replace: str) -> str:
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / "spec.toml"
    path.write_text(text)
    return str(path)


def test_spec_parses_with_placeholders_and_both_key_spellings(tmp_path):
    spec = load_spec(write_spec(tmp_path), tmp_path)
    assert spec.name == "two" and spec.seeds == (0, 1) and spec.baseline == "ntp"
    assert spec.tokens == tmp_path / "tokens" / "x"
    assert spec.targets["main"].path == tmp_path / "targets" / "x"
    cfg = pretrain_config(spec, spec.run("cocomix"), 1, tmp_path / "s", tmp_path)
    assert (cfg.max_steps, cfg.lam, cfg.seed, cfg.size) == (10, 0.2, 1, "tiny")
    assert cfg.out == str(tmp_path / "s" / "runs" / "cocomix" / "seed-1")
    assert cfg.targets == str(tmp_path / "targets" / "x")


@pytest.mark.parametrize("old,new,message", [
    ('name = "two"', 'name = "two"\ncolour = 1', "study: unknown key 'colour'"),
    ("[defaults]", "[extras]\na = 1\n[defaults]", "unknown key 'extras'"),
    ('lam = 0.2', 'lam = 0.2\nlamb = 1', "run 'cocomix': unknown key 'lamb' (not a flag of `cocomix pretrain`"),
    ('name = "cocomix"', 'name = "ntp"', "run 'ntp': duplicate run name"),
    ('lam = 0.2', 'lam = -1.0', "run 'cocomix': --lam must be >= 0"),
    ('lam = 0.2', 'max_steps = "ten"', "run 'cocomix': max_steps (--max-steps) must be int, got 'ten'"),
    ('lam = 0.2', 'seed = 3', "run 'cocomix': key 'seed' is set by study.seeds"),
    ('method = "cocomix"', 'method = "cocomix"\ntargets = "other"', "run 'cocomix': key 'targets' names 'other'"),
    ('method = "ntp"', 'method = "nope"', "run 'ntp': --method must be one of"),
    ('path = "{workspace}/targets/x"', 'path = "{workspace}/targets/x"\nextract = { layers = 2 }',
     "targets.main.extract: unknown key 'layers'"),
    ('path = "{workspace}/targets/x"', 'path = "{workspace}/targets/x"\nextract = { k_attr = 0 }',
     "targets.main.extract: --k-attr must be >= 1"),
    ("seeds = [0, 1]", "seeds = [0, 0]", "seeds must be a non-empty list without repeats"),
    ("seeds = [0, 1]", 'seeds = [0, 1]\nbaseline = "gpt"', "baseline 'gpt' is not a run name"),
    ("max-steps = 10", "max-steps = 10\nout = 'x'", "defaults: key 'out' is set by the study folder"),
])
def test_bad_spec_is_refused_before_anything_runs(tmp_path, old, new, message):
    cfg = StudyConfig(spec=write_spec(tmp_path, **{old: new}), workspace=str(tmp_path / "ws"))
    with pytest.raises(ConfigError) as err:
        run_study(cfg)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "ws").exists()  # nothing written


def test_unknown_spec_names_the_builtins(tmp_path):
    with pytest.raises(ConfigError, match="neither a TOML file nor a built-in study .*mini.*paper-69m"):
        open_study(StudyConfig(spec="nope", workspace=str(tmp_path)))
    with pytest.raises(ConfigError, match="--only 'gpt' is not a run of study two"):
        open_study(StudyConfig(spec=write_spec(tmp_path), workspace=str(tmp_path), only="gpt"))


def test_builtin_specs_parse_with_the_papers_grid(tmp_path):
    assert {"mini", "paper-69m"} <= set(builtin_names())
    paper = load_spec("paper-69m", tmp_path)
    names = [r.name for r in paper.runs]
    assert {"ntp", "kd", "pause", "pause-kd", "cocomix", "mix-add", "mix-none", "lam-0", "activation-labels",
            "hidden-l1", "k-concept-16", "insert-layer-1"} <= set(names)
    assert paper.seeds == (0, 1, 2) and set(paper.targets) == {"attribution", "activation", "hidden"}
    assert paper.run("activation-labels").targets == "activation"
    mini = load_spec("mini", tmp_path)
    assert [r.name for r in mini.runs] == ["cocomix", "ntp", "kd", "pause", "cocomix-free"]
    assert mini.seeds == (0, 1) and mini.prepare == "quickstart"
    assert mini.tokens == tmp_path / "quickstart" / "tokens"


def test_builtin_specs_validate(tmp_path):
    """Validation builds every config: pretrain and extract know every flag the built-in specs use."""
    from cocomix.stage1_extract.config import ExtractConfig
    from cocomix.stage2_pretrain.config import EvalConfig, PretrainConfig

    needed = {"kd_alpha", "mix", "concept_target", "hidden_loss", "k_concept", "insert_layer", "label_windows",
              "kd_samples", "store_hidden", "offsets"}
    have = {f.name for cls in (PretrainConfig, ExtractConfig) for f in dataclasses.fields(cls)}
    assert needed <= have, f"flags the built-in specs use are missing: {', '.join(sorted(needed - have))}"
    open_study(StudyConfig(spec="mini", workspace=str(tmp_path)))
    if "tasks" in {f.name for f in dataclasses.fields(EvalConfig)}:
        open_study(StudyConfig(spec="paper-69m", workspace=str(tmp_path)))
    else:
        with pytest.raises(ConfigError, match="tasks needs `cocomix eval --tasks`"):
            open_study(StudyConfig(spec="paper-69m", workspace=str(tmp_path)))


# ----------------------------------------------------------------------------- statistics
def test_spread_and_paired_interval_against_hand_computation():
    s = spread([10.0, 12.0, 17.0])
    assert s.mean == pytest.approx(13.0) and s.std == pytest.approx(math.sqrt((9 + 1 + 16) / 2))
    assert spread([5.0]).std is None
    # diffs by seed: -1, -2, -4 -> mean -7/3, sd sqrt(((4/3)^2 + (1/3)^2 + (5/3)^2) / 2) = sqrt(7/3)
    d = paired_interval({0: 10.0, 1: 12.0, 2: 13.0, 9: 1.0}, {0: 11.0, 1: 14.0, 2: 17.0})
    half = 4.303 * math.sqrt(7 / 3) / math.sqrt(3)
    assert d.n == 3 and d.mean == pytest.approx(-7 / 3)
    assert (d.low, d.high) == (pytest.approx(-7 / 3 - half), pytest.approx(-7 / 3 + half))
    assert paired_interval({0: 1.0}, {0: 3.0}) == (-2.0, None, None, 1)
    assert paired_interval({0: 1.0}, {1: 3.0}) is None


def test_t_quantiles():
    assert (t975(1), t975(2), t975(30)) == (12.706, 4.303, 2.042)
    assert t975(60) == pytest.approx(2.0003, abs=1e-3) and t975(120) == pytest.approx(1.9799, abs=1e-3)
    scipy_stats = pytest.importorskip("scipy.stats")
    for df in (1, 3, 7, 31, 45, 200):
        assert t975(df) == pytest.approx(scipy_stats.t.ppf(0.975, df), abs=1e-3)


def test_tokens_to_reach_interpolates_linearly():
    curve = [(100, 50.0), (200, 40.0), (300, 30.0)]
    # 35 lies halfway between 40 (200 tokens) and 30 (300 tokens)
    assert tokens_to_reach(curve, 35.0) == (250.0, False)
    assert tokens_to_reach(curve, 40.0) == (200.0, False)
    assert tokens_to_reach(curve, 60.0) == (100, True)   # already below at the first evaluation
    assert tokens_to_reach(curve, 20.0) == (None, False)  # never reached
    mean = mean_curve([[(100, 50.0), (200, 40.0)], [(100, 54.0), (200, 42.0), (300, 1.0)]])
    assert [(t, m) for t, m, _ in mean] == [(100, 52.0), (200, 41.0)]
    assert mean[0][2] == pytest.approx(math.sqrt(8))


# ----------------------------------------------------------------------------- --plan
def parse_cli(line: str):
    """The config a printed launch line builds, parsed by the real CLI."""
    import typer

    from cocomix.pipeline.cli import COMMANDS, app

    argv = shlex.split(line.split(" -m cocomix.pipeline.cli ", 1)[1])
    command = typer.main.get_command(app).commands[argv[0]]
    params = command.make_context(argv[0], argv[1:]).params
    return COMMANDS[argv[0]][1](**params)


def test_plan_lines_parse_back_to_the_same_configs(tmp_path, capsys):
    text = SPEC.replace('path = "{workspace}/targets/x"',
                        'path = "{workspace}/targets/x"\nextract = { teacher = "t", sae = "s", layer = 1, window = 64 }')
    cfg = StudyConfig(spec=write_spec(tmp_path, text), workspace=str(tmp_path), plan=True, launch="accelerate launch --multi_gpu")
    result = run_study(cfg)
    printed = capsys.readouterr().out.splitlines()
    assert printed == result.plan_lines
    commands = [line for line in printed if not line.startswith("#")]
    assert len(commands) == 1 + 2 * 2 and all(c.startswith("accelerate launch --multi_gpu -m cocomix.pipeline.cli ") for c in commands)
    study = open_study(dataclasses.replace(cfg, plan=False))
    spec = study.spec
    from cocomix.pipeline.study_spec import extract_config

    assert parse_cli(commands[0]) == extract_config(spec, spec.targets["main"], tmp_path)
    expected = [pretrain_config(spec, spec.run(n), s, study.out, tmp_path, resume=True) for s in (0, 1) for n in ("ntp", "cocomix")]
    assert [parse_cli(c) for c in commands[1:]] == expected
    assert not (tmp_path / "studies").exists()  # --plan trains nothing and writes nothing
    # --only and --seeds narrow the plan
    lines = plan_lines(open_study(dataclasses.replace(cfg, only="cocomix", seeds="5")), "L")
    assert [parse_cli(c).seed for c in lines if not c.startswith("#") and " pretrain " in c] == [5]


def test_config_argv_round_trips_bools_and_defaults(tmp_path):
    from cocomix.stage2_pretrain.config import PretrainConfig

    cfg = PretrainConfig(method="ntp", size="tiny", resume=True, lam=0.0, out=str(tmp_path / "a b"))
    assert parse_cli("x -m cocomix.pipeline.cli " + shlex.join(config_argv(cfg, "pretrain"))) == cfg


def test_cli_refuses_a_bad_run_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from cocomix.pipeline.cli import app

    spec = write_spec(tmp_path, **{"lam = 0.2": "lam = 0.2\nkd_alphaa = 0.5"})
    result = CliRunner().invoke(app, ["study", spec, "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "run 'cocomix': unknown key 'kd_alphaa'" in lines[0]
    assert not (tmp_path / "ws").exists()


def test_summaries_and_table_from_run_results(tmp_path):
    """Per-run numbers -> per-method rows: spread, paired interval, tokens to the baseline, task columns."""
    import json

    from cocomix.pipeline.study_report import RunResult, read_task_scores, results_table, summarize

    tasks = {"piqa": {"metrics": {"acc,none": 0.6, "acc_norm,none": 0.62}, "stderr": {"acc,none": 0.01}},
             "lambada_openai": {"metrics": {"acc": 0.3, "perplexity": 90.5}}, "other": 0.4}
    (tmp_path / "eval.json").write_text(json.dumps({"val_ppl": 3.0, "tasks": tasks}))
    assert read_task_scores(tmp_path / "eval.json") == {"piqa": 0.6, "lambada_openai": 90.5, "other": 0.4}
    ntp = [RunResult("ntp", s, "ntp", [(100, 60.0 + s), (200, 40.0 + s)], 40.0 + s, 1000, 0.5, 200, {"piqa": 0.5})
           for s in (0, 1)]
    coco = [RunResult("cocomix", s, "cocomix", [(100, 44.0 + s), (200, 30.0 + 3 * s)], 30.0 + 3 * s, 990, 0.6, 200,
                      {"piqa": 0.6 + s / 10}) for s in (0, 1)]
    rows = summarize(ntp + coco, ["ntp", "cocomix"], "ntp")
    n, c = rows
    assert n.ppl.mean == 40.5 and c.ppl.mean == 31.5 and c.ppl.std == pytest.approx(math.sqrt(4.5))
    # diffs -10 and -8: mean -9, sd sqrt(2), half width 12.706 * sqrt(2) / sqrt(2)
    assert c.diff.mean == -9.0 and c.diff.low == pytest.approx(-9 - 12.706) and c.diff.high == pytest.approx(-9 + 12.706)
    # mean cocomix curve (100, 44.5), (200, 31.5); ntp's final 40.5 is crossed at 100 + (44.5 - 40.5) / 13 * 100
    assert c.reach.tokens == pytest.approx(100 + 4 / 13 * 100) and not c.reach.at_most
    assert n.reach.tokens == pytest.approx(200)
    table = results_table(rows, "ntp")
    assert table.splitlines()[0].endswith("| piqa |")
    assert "-9.00 [-21.71, +3.71]" in table and "0.65 ± 0.07" in table and "-34.6%" in table


def test_readme_spec_example_is_valid(tmp_path):
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    (block,) = re.findall(r"```toml\n(.*?)```", readme, flags=re.S)
    spec = tmp_path / "my-grid.toml"
    spec.write_text(block)
    study = open_study(StudyConfig(spec=str(spec), workspace=str(tmp_path)))
    assert [r.name for r in study.spec.runs] == ["ntp", "lam-0"] and study.spec.run("lam-0").flags["lam"] == 0.0
