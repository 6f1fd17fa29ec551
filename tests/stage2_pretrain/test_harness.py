"""``cocomix eval --tasks``: lm-evaluation-harness on stock GPT-2 and CoCoMix checkpoints, offline.

Task folders are written here (YAML configs reading tiny JSON-lines files through the ``json``
builder); every harness score is checked against a hand computation from the model's logits.
"""
from __future__ import annotations

import json
import math
import re
import shutil

import pytest
import torch
import torch.nn.functional as F

from cocomix.core.errors import CocomixError, ConfigError
from cocomix.stage2_pretrain.config import EvalConfig
from cocomix.stage2_pretrain.evaluate import load_checkpoint_model, run_eval

MC_DOCS = [  # question, choices, label
    ("the sparse teacher", ["model token", "gradient attention window"], 0),
    ("python import", ["return class", "dict error"], 1),
    ("the student window", ["shard label", "layer"], 1),
]
LAMBADA_DOCS = ["the model token concept layer sparseteacherstudent", "python import return class gradientattention",
                "the of and to window shard"]
ROLL_DOCS = ["the model token concept layer sparse teacher student window shard label",
             "python import return class def self value list dict error file path"]


def task_yaml(name: str, data, body: str) -> str:
    return f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n{body}"


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """Three local tasks: multiple choice (acc), lambada-style (whole-word continuation: perplexity, acc), rolling (PPL)."""
    root = tmp_path_factory.mktemp("tasks")

    def write(name, rows):
        (root / f"{name}.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    write("mc", [{"q": q, "choices": c, "label": lab} for q, c, lab in MC_DOCS])
    write("lambada", [{"text": t} for t in LAMBADA_DOCS])
    write("roll", [{"text": t} for t in ROLL_DOCS])
    (root / "tiny_mc.yaml").write_text(task_yaml("tiny_mc", root / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: '{{q}}'\ndoc_to_target: label\ndoc_to_choice: choices\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")))
    (root / "tiny_lambada.yaml").write_text(task_yaml("tiny_lambada", root / "lambada.jsonl", (  # as lambada_openai.yaml
        "output_type: loglikelihood\ndoc_to_text: \"{{text.split(' ')[:-1]|join(' ')}}\"\n"
        "doc_to_target: \"{{' '+text.split(' ')[-1]}}\"\nmetric_list:\n"
        "  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")))
    (root / "tiny_roll.yaml").write_text(task_yaml("tiny_roll", root / "roll.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")))
    return root


@pytest.fixture(autouse=True)
def offline_datasets(tmp_path, monkeypatch):
    """No hub, and the ``json`` builder's cache in the test's own folder."""
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("DISABLE_MULTIPROC", "1")  # the harness's bootstrap stderr without a process pool
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")


@pytest.fixture
def gpt2_ckpt(tmp_path, teacher_dir):
    """A stock random GPT-2 folder (what an NTP checkpoint is), copied so eval.json lands in the test's folder."""
    return shutil.copytree(teacher_dir, tmp_path / "gpt2")


@pytest.fixture
def cocomix_ckpt(tmp_path, tokenizer_dir):
    from transformers import AutoTokenizer

    from cocomix.stage2_pretrain.presets import build_model, get_preset

    torch.manual_seed(2)
    model = build_model("cocomix", get_preset("tiny"), vocab_size=384, n_latents=96).eval()
    with torch.no_grad():  # the concept bottleneck's biases start at 0: give them something to do
        model.concept.pre_bias.normal_(0, 0.1)
        model.concept.compress_bias.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "cocomix")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "cocomix")
    return tmp_path / "cocomix"


@pytest.fixture
def pause_ckpt(tmp_path, tokenizer_dir):
    """A pause student (one learned vector interleaved at insert_layer) saved as its own model type."""
    from transformers import AutoTokenizer

    from cocomix.stage2_pretrain.model_pause import PauseConfig, PauseForCausalLM

    torch.manual_seed(3)
    PauseForCausalLM(PauseConfig(vocab_size=384, n_positions=128, n_embd=32, n_layer=3, n_head=2, insert_layer=1)
                     ).save_pretrained(tmp_path / "pause")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "pause")
    return tmp_path / "pause"


def tokenizer_of(ckpt):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ckpt)


def hand_loglik(model, tok, context: str, continuation: str) -> tuple[float, int]:
    """log p(continuation | context) from one forward's logits, and its token count (the harness's split:
    the continuation's tokens are those of context + continuation after the context's own)."""
    ids = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    with torch.no_grad():
        logp_TV = F.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)
    return sum(float(logp_TV[t - 1, ids[t]]) for t in range(n_ctx, len(ids))), len(ids) - n_ctx


def own_forward_loglik(model, tok, context: str, continuation: str) -> float:
    """The same through the model's own loss: labels = the ids, context positions ignored."""
    ids = torch.tensor([tok.encode(context + continuation)])
    labels = ids.clone()
    labels[0, :len(tok.encode(context))] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    loss = out.ntp_loss if hasattr(out, "ntp_loss") else out.loss
    return -float(loss) * int((labels[0, 1:] != -100).sum())


@pytest.mark.parametrize("kind", ["gpt2", "cocomix", "pause"])
def test_harness_loglikelihood_equals_the_models_own(kind, request):
    """HFLM.loglikelihood on a batch of requests of different lengths (right padding) = a hand
    computation from the logits = the model's own loss over the continuation."""
    from lm_eval.api.instance import Instance

    from cocomix.stage2_pretrain.harness import harness_lm

    ckpt = request.getfixturevalue(f"{kind}_ckpt")
    model, tok = load_checkpoint_model(ckpt).eval(), tokenizer_of(ckpt)
    pairs = [("the model token", " concept layer sparse teacher"), ("python", " import"),
             ("the of and to in is that for it as with", " gradientattention window shard")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    got = harness_lm(model, tok, batch_size=3).loglikelihood(requests)
    for (context, continuation), (ll, _greedy) in zip(pairs, got, strict=True):
        want, n_tokens = hand_loglik(model, tok, context, continuation)
        torch.testing.assert_close(ll, want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(ll, own_forward_loglik(model, tok, context, continuation), rtol=1e-5, atol=1e-4)
    assert max(hand_loglik(model, tok, c, x)[1] for c, x in pairs) > 2  # multi-token continuations were scored


def test_tasks_write_scores_equal_to_hand_computations(gpt2_ckpt, task_dir):
    """Multiple-choice accuracy, lambada-style perplexity over the *whole* continuation (the official
    code's extra NLL is 0 there) and rolling word perplexity: numbers in eval.json, equal to the logits'."""
    res = run_eval(EvalConfig(ckpt=str(gpt2_ckpt), tasks="tiny_mc,tiny_lambada,tiny_roll", include_path=str(task_dir),
                              device="cpu", batch_size=2, bootstrap_iters=20))
    saved = json.loads((gpt2_ckpt / "eval.json").read_text())["tasks"]
    assert saved == json.loads(json.dumps(res.tasks)) and "val_ppl" not in json.loads((gpt2_ckpt / "eval.json").read_text())
    model, tok = load_checkpoint_model(gpt2_ckpt).eval(), tokenizer_of(gpt2_ckpt)

    hits = [max(range(len(c)), key=lambda j: hand_loglik(model, tok, q, " " + c[j])[0]) == lab for q, c, lab in MC_DOCS]
    assert saved["tiny_mc"]["metrics"]["acc"] == pytest.approx(sum(hits) / len(hits))
    assert saved["tiny_mc"]["output_type"] == "multiple_choice" and saved["tiny_mc"]["n_samples"] == 3
    assert saved["tiny_mc"]["stderr"]["acc"] > 0 and saved["tiny_lambada"]["stderr"]["perplexity"] > 0

    lls = [hand_loglik(model, tok, t.rsplit(" ", 1)[0], " " + t.rsplit(" ", 1)[1]) for t in LAMBADA_DOCS]
    assert max(n for _, n in lls) > 1  # the last word is several tokens: the whole continuation counts
    torch.testing.assert_close(saved["tiny_lambada"]["metrics"]["perplexity"], math.exp(-sum(ll for ll, _ in lls) / len(lls)), rtol=1e-4, atol=0)

    rolled = [hand_loglik(model, tok, tok.eos_token, t)[0] for t in ROLL_DOCS]  # one window each: eos, then the text
    words = sum(len(re.split(r"\s+", t)) for t in ROLL_DOCS)
    torch.testing.assert_close(saved["tiny_roll"]["metrics"]["word_perplexity"], math.exp(-sum(rolled) / words), rtol=1e-4, atol=0)


def test_cocomix_tasks_and_perplexities_merge_into_eval_json(cocomix_ckpt, task_dir, token_store):
    """--tokens, then --ppl-tokens, then one task, then another: each run keeps what the earlier ones wrote;
    a store given to --ppl-tokens gets the same perplexity as through --tokens (same windows)."""
    common = dict(ckpt=str(cocomix_ckpt), device="cpu", window=64, max_windows=3, bootstrap_iters=0)
    val = run_eval(EvalConfig(**common, tokens=str(token_store)))
    run_eval(EvalConfig(**common, ppl_tokens=[f"{token_store},{token_store}:train"]))
    run_eval(EvalConfig(**common, tasks="tiny_mc", include_path=str(task_dir), limit=2))
    last = run_eval(EvalConfig(**common, tasks="tiny_roll", include_path=str(task_dir)))
    saved = json.loads((cocomix_ckpt / "eval.json").read_text())
    assert saved["val_ppl"] == val.val_ppl and saved["ppl"]["tokens"]["ppl"] == val.val_ppl
    assert saved["ppl"]["tokens:train"]["split"] == "train" and saved["ppl"]["tokens:train"]["windows"] == 3
    assert saved["tasks"]["tiny_mc"]["n_samples"] == 2 and saved["tasks"]["tiny_mc"]["limit"] == 2
    assert math.isfinite(saved["tasks"]["tiny_roll"]["metrics"]["word_perplexity"]) and last.tasks.keys() == {"tiny_roll"}


def test_harness_loads_a_cocomix_folder_by_itself(cocomix_ckpt):
    """The CoCoMix class is an AutoModelForCausalLM: the harness's HFLM loads the folder from its path."""
    from lm_eval.models.huggingface import HFLM

    from cocomix.stage2_pretrain.model import CoCoMixForCausalLM

    lm = HFLM(pretrained=str(cocomix_ckpt), device="cpu", batch_size=1)
    assert isinstance(lm.model, CoCoMixForCausalLM) and lm.max_length == 128


def test_paper_expands_to_the_seven_tasks():
    from cocomix.stage2_pretrain.harness import PAPER_TASKS, parse_tasks

    assert parse_tasks("paper") == list(PAPER_TASKS) and len(PAPER_TASKS) == 7
    assert parse_tasks("piqa, paper,hellaswag") == ["piqa", *[t for t in PAPER_TASKS if t != "piqa"]]


# ----------------------------------------------------------------------------- bad input: one line, eval.json untouched
def cli(*args):
    from typer.testing import CliRunner

    from cocomix.pipeline.cli import app

    return CliRunner().invoke(app, ["eval", *map(str, args)], terminal_width=400, env={"COLUMNS": "400"})


def one_line_refusal(result, *expected):
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert all(e in lines[0] for e in expected), lines[0]


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, gpt2_ckpt, task_dir):
    one_line_refusal(cli(gpt2_ckpt, "--tasks", "tiny_mc", "--include-path", tmp_path / "nope", "--device", "cpu"), "--include-path")
    one_line_refusal(cli(gpt2_ckpt, "--tasks", "tiny_mc", "--include-path", task_dir, "--limit", "0"), "--limit")
    one_line_refusal(cli(tmp_path, "--tasks", "tiny_mc", "--include-path", task_dir), "config.json")
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    one_line_refusal(cli(tmp_path / "bert", "--tasks", "tiny_mc", "--include-path", task_dir), "neither", "t5")
    (tmp_path / "no-weights").mkdir()
    shutil.copy(gpt2_ckpt / "config.json", tmp_path / "no-weights")
    one_line_refusal(cli(tmp_path / "no-weights", "--tasks", "tiny_mc", "--include-path", task_dir), "no weights")
    one_line_refusal(cli(gpt2_ckpt), "--tokens", "--tasks")
    assert not (gpt2_ckpt / "eval.json").exists()


def test_unknown_task_lists_the_known_ones(gpt2_ckpt, task_dir):
    from cocomix.stage2_pretrain.harness import task_manager

    with pytest.raises(ConfigError, match=r"unknown task tiny_mcq \(known tasks: tiny_lambada, tiny_mc, tiny_roll\)"):
        task_manager(["tiny_mc", "tiny_mcq"], str(task_dir), with_defaults=False)
    assert not (gpt2_ckpt / "eval.json").exists()


@pytest.mark.slow
def test_unknown_task_among_the_builtin_ones_names_the_closest(gpt2_ckpt):
    """Indexing the harness's built-in tasks takes seconds to tens of seconds: slow."""
    one_line_refusal(cli(gpt2_ckpt, "--tasks", "hellaswg", "--device", "cpu"), "unknown task hellaswg", "hellaswag")
    assert not (gpt2_ckpt / "eval.json").exists()


def test_missing_lm_eval_says_how_to_install(gpt2_ckpt, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(CocomixError, match=re.escape("pip install -e '.[eval]'")):
        run_eval(EvalConfig(ckpt=str(gpt2_ckpt), tasks="paper", device="cpu"))
    assert not (gpt2_ckpt / "eval.json").exists()


def test_cli_does_not_import_the_harness():
    import subprocess
    import sys

    code = "import sys, cocomix.pipeline.cli; assert 'lm_eval' not in sys.modules, 'lm_eval imported at CLI import'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_ppl_tokens_repeats_and_takes_comma_lists(monkeypatch):
    """--ppl-tokens A --ppl-tokens B,C reaches run_eval as three stores."""
    import cocomix.stage2_pretrain.evaluate as evaluate

    seen = []
    monkeypatch.setattr(evaluate, "run_eval", seen.append)
    result = cli("ckpt", "--ppl-tokens", "a", "--ppl-tokens", "b,c:train")
    assert result.exit_code == 0, result.output
    assert seen[0].ppl_tokens == ["a", "b", "c:train"] and seen[0].tokens is None and seen[0].tasks is None
