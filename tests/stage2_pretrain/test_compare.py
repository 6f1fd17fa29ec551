"""``cocomix compare``: the Table-1-shaped view of several eval.json files (table, JSON, plot)."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from cocomix.pipeline.cli import app
from cocomix.stage2_pretrain.compare import metric_table


def task(metrics: dict, output_type: str, stderr: dict | None = None, lower: tuple = ()) -> dict:
    return {"metrics": metrics, "stderr": stderr or {}, "output_type": output_type,
            "higher_is_better": {m: m not in lower for m in metrics}}


def eval_dict(shift: float = 0.0, *, piqa: bool = True) -> dict:
    tasks = {
        "winogrande": task({"acc": 0.50 + shift}, "multiple_choice", {"acc": 0.01}),
        "lambada_openai": task({"perplexity": 107.6 - shift, "acc": 0.2}, "loglikelihood", lower=("perplexity",)),
        "wikitext": task({"word_perplexity": 52.3, "byte_perplexity": 2.1, "bits_per_byte": 1.07}, "loglikelihood_rolling",
                         lower=("word_perplexity", "byte_perplexity", "bits_per_byte")),
        "hellaswag": task({"acc": 0.27, "acc_norm": 0.28}, "multiple_choice"),
        "piqa": task({"acc": 0.59}, "multiple_choice"),
    }
    if not piqa:
        del tasks["piqa"]
    return {"val_ppl": 25.3 - shift, "ppl": {"owt": {"ppl": 25.0}}, "tasks": tasks}


def test_columns_in_table_1_order_and_the_average_of_the_multiple_choice_accuracies():
    table = metric_table([("ntp", eval_dict()), ("cocomix", eval_dict(0.1)), ("short", eval_dict(piqa=False))])
    assert [c.title for c in table.columns] == [
        "val PPL", "owt PPL", "LAMBADA PPL", "WikiText PPL",  # perplexities
        "LAMBADA", "HellaSwag", "PIQA", "WinoGrande",  # accuracies, in the paper's task order
        "avg",  # over the multiple-choice ones: not LAMBADA's exact-word accuracy
        "WikiText byte_perplexity", "WikiText bits_per_byte", "HellaSwag acc_norm"]
    ntp, coco, short = (r.values for r in table.rows)
    assert ntp["avg"] == pytest.approx((0.27 + 0.59 + 0.50) / 3) and coco["avg"] == pytest.approx((0.27 + 0.59 + 0.60) / 3)
    assert short["piqa/acc"] is None and short["avg"] is None  # not comparable without every task
    assert table.rows[0].stderr["winogrande/acc"] == 0.01 and table.rows[0].stderr["piqa/acc"] is None
    lower = {c.title: c.lower_is_better for c in table.columns}
    assert lower["val PPL"] and lower["WikiText bits_per_byte"] and not lower["avg"] and not lower["HellaSwag acc_norm"]


def write_run(root, name, ev):
    """A run folder whose final/ checkpoint holds ``ev`` as eval.json."""
    (root / name / "final").mkdir(parents=True)
    (root / name / "final" / "eval.json").write_text(json.dumps(ev))
    return root / name


def test_cli_prints_one_table_json_and_a_plot(tmp_path, monkeypatch):
    from cocomix.core.logs import console

    monkeypatch.setattr(console, "width", 300)  # all 13 columns on one line
    ntp, coco = write_run(tmp_path, "ntp-69m", eval_dict()), write_run(tmp_path, "cocomix-69m", eval_dict(0.1))
    runner = CliRunner()
    shown = runner.invoke(app, ["compare", str(ntp), str(coco / "final" / "eval.json")])
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.output.splitlines() if "cocomix-69m" in line)
    assert "ntp-69m" in shown.output and "WinoGrande" in shown.output
    assert [c.strip() for c in row.split("│")[1:7]] == ["cocomix-69m", "25.20", "25.00", "107.50", "52.30", "20.0"] and "60.0" in row
    as_json = runner.invoke(app, ["compare", str(ntp), str(coco), "--json", "--plot", str(tmp_path / "plots" / "t1.png")])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.output[as_json.output.index("{"):])
    assert [r["name"] for r in data["rows"]] == ["ntp-69m", "cocomix-69m"]
    assert data["rows"][1]["values"]["winogrande/acc"] == pytest.approx(0.6)
    png = (tmp_path / "plots" / "t1.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_cli_refusals_are_one_line(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["compare", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    (tmp_path / "run").mkdir()
    empty = runner.invoke(app, ["compare", str(tmp_path / "run")])
    assert empty.exit_code == 2 and "no eval.json" in empty.output
    run = write_run(tmp_path, "ok", eval_dict())
    bad_plot = runner.invoke(app, ["compare", str(run), "--plot", str(tmp_path / "t1.nope")])
    assert bad_plot.exit_code == 2 and "--plot" in bad_plot.output and not (tmp_path / "t1.nope").exists()
