"""``pretrain --method kd|pause|pause-kd`` and the CoCoMix ablation flags, end to end on the tiny preset:
exact resume, what run.json records, checkpoints other tools load, one-line refusals."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cocomix.core.errors import CocomixError, ConfigError, MismatchError
from cocomix.stage2_pretrain import train as train_mod
from cocomix.stage2_pretrain.config import PretrainConfig
from cocomix.stage2_pretrain.train import run_pretrain

METHODS = {
    "kd": dict(method="kd", kd_alpha=0.3),
    "pause": dict(method="pause"),
    "pause-kd": dict(method="pause-kd"),
    "add": dict(mix="add"),
    "none": dict(mix="none", k_concept=4),
    "hidden": dict(concept_target="hidden", hidden_loss="l2", insert_layer=2),
}


def flags(out: Path, tokens: Path, targets: Path, **kw) -> dict:
    return dict(size="tiny", tokens=str(tokens), targets=str(targets), out=str(out), max_steps=4, batch_tokens=256,
                save_every=2, eval_every=0, log_every=1) | kw


def records(out: Path) -> list[dict]:
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


class Killed(Exception):
    pass


@pytest.mark.parametrize("name", METHODS)
def test_interrupted_run_resumes_to_the_same_losses(tmp_path, monkeypatch, token_store, full_targets_dir, name):
    ref = run_pretrain(PretrainConfig(**flags(tmp_path / "ref", token_store, full_targets_dir, **METHODS[name])))
    real_save = train_mod.maybe_save

    def save_then_die(run, state, force):
        saved = real_save(run, state, force)
        if state.step == 2:
            raise Killed
        return saved

    monkeypatch.setattr(train_mod, "maybe_save", save_then_die)
    with pytest.raises(Killed):
        run_pretrain(PretrainConfig(**flags(tmp_path / "run", token_store, full_targets_dir, **METHODS[name])))
    monkeypatch.setattr(train_mod, "maybe_save", real_save)
    run_pretrain(PretrainConfig(**flags(tmp_path / "run", token_store, full_targets_dir, resume=True, **METHODS[name])))
    got, want = records(tmp_path / "run"), records(ref.out)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    keys = {"loss", "ntp_loss", "grad_norm", "lr"} | ({"kd_loss"} & set(want[0])) | ({"concept_loss"} & set(want[0]))
    for key in keys:
        assert [r[key] for r in got] == [r[key] for r in want], key  # exact on CPU
    if "kd" in name:
        assert all(r["loss"] == pytest.approx((1 - 0.3 if name == "kd" else 0.5) * r["ntp_loss"]
                                              + (0.3 if name == "kd" else 0.5) * r["kd_loss"]) for r in want)


def test_run_json_records_the_method_and_its_match(tmp_path, token_store, full_targets_dir):
    res = run_pretrain(PretrainConfig(**flags(tmp_path / "p", token_store, full_targets_dir, method="pause", max_steps=1)))
    run = json.loads((res.out / "run.json").read_text())
    assert run["method"] == {"method": "pause", "insert_layer": None, "columns": []}
    m = run["matched"]
    assert m["reference"] == "cocomix" and m["active"] == res.params_active and abs(m["ratio"] - 1) < 0.03
    assert json.loads((res.final / "config.json").read_text())["n_embd"] == m["width"]


def test_kd_checkpoint_is_a_stock_gpt2(tmp_path, token_store, full_targets_dir):
    from transformers import AutoModelForCausalLM, GPT2LMHeadModel

    res = run_pretrain(PretrainConfig(**flags(tmp_path / "kd", token_store, full_targets_dir, method="kd", max_steps=2)))
    model = GPT2LMHeadModel.from_pretrained(res.final)
    assert type(AutoModelForCausalLM.from_pretrained(res.final)) is GPT2LMHeadModel
    assert model.config.cocomix_kd["samples"] == 5 and model.config.cocomix_kd["kd_alpha"] == 0.5


def test_pause_checkpoint_loads_for_eval(tmp_path, token_store, full_targets_dir):
    from cocomix.stage2_pretrain.config import EvalConfig
    from cocomix.stage2_pretrain.evaluate import run_eval

    res = run_pretrain(PretrainConfig(**flags(tmp_path / "p", token_store, full_targets_dir, method="pause", max_steps=2,
                                              eval_every=2, eval_windows=2)))
    out = run_eval(EvalConfig(ckpt=str(res.final), tokens=str(token_store), max_windows=2, device="cpu"))
    assert out.val_ppl == pytest.approx(res.val_ppl, rel=1e-4)


def test_resume_refuses_other_method_flags(tmp_path, token_store, full_targets_dir):
    run_pretrain(PretrainConfig(**flags(tmp_path / "r", token_store, full_targets_dir, mix="add", max_steps=2)))
    with pytest.raises(ConfigError, match="method flags"):
        run_pretrain(PretrainConfig(**flags(tmp_path / "r", token_store, full_targets_dir, mix="none", resume=True)))


@pytest.mark.parametrize("kw, error, match", [
    (dict(method="kd"), ConfigError, "--kd-samples"),
    (dict(method="pause-kd"), ConfigError, "--kd-samples"),
    (dict(concept_target="hidden"), ConfigError, "--store-hidden"),
    (dict(insert_layer=9), ConfigError, "--insert-layer 9"),
])
def test_targets_without_the_column_are_refused_before_anything_is_written(tmp_path, token_store, targets_dir, kw, error, match):
    with pytest.raises(error, match=match):
        run_pretrain(PretrainConfig(**flags(tmp_path / "out", token_store, targets_dir, **kw)))
    assert not (tmp_path / "out").exists()


def test_kd_with_another_teacher_vocabulary_is_refused(tmp_path, token_store, make_targets):
    targets = make_targets(token_store, tmp_path / "t", kd_samples=3,
                           meta_update={"teacher": {"id": "big", "sha256": "0" * 64, "vocab_size": 50257}})
    with pytest.raises(MismatchError, match="same vocabulary"):
        run_pretrain(PretrainConfig(**flags(tmp_path / "out", token_store, targets, method="kd")))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kw, name", [(dict(method="distill"), "--method"), (dict(mix="concat"), "--mix"),
                                      (dict(kd_alpha=1.5), "--kd-alpha"), (dict(kd_alpha=-0.1), "--kd-alpha"),
                                      (dict(concept_target="logits"), "--concept-target"),
                                      (dict(hidden_loss="huber"), "--hidden-loss"), (dict(k_concept=0), "--k-concept")])
def test_bad_method_flags_name_the_flag(kw, name):
    with pytest.raises(ConfigError, match=name):
        PretrainConfig(**kw)
    assert issubclass(ConfigError, CocomixError)


def test_kd_alpha_zero_is_plain_ntp(tmp_path, token_store, full_targets_dir):
    """alpha = 0 trains exactly the NTP student of the same width (same data order, same init)."""
    kd = run_pretrain(PretrainConfig(**flags(tmp_path / "kd", token_store, full_targets_dir, method="kd", kd_alpha=0.0,
                                             max_steps=2, save_every=0)))
    ntp = run_pretrain(PretrainConfig(**flags(tmp_path / "ntp", token_store, full_targets_dir, method="ntp", max_steps=2,
                                              save_every=0)))
    a, b = records(kd.out), records(ntp.out)
    torch.testing.assert_close(torch.tensor([r["ntp_loss"] for r in a]), torch.tensor([r["ntp_loss"] for r in b]))
