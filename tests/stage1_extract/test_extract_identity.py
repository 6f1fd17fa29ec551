"""``extract`` resumes by content, not by path, and never keeps a manifest readers would refuse.

- Teacher folder, SAE file and token store copied elsewhere (same sha256 / fingerprint) and
  given as other spellings: the run resumes, recomputes only the missing shard, same bytes.
- Every shard verified but manifest.json emptied, truncated or inconsistent with plan.json:
  the run rewrites it (``verify`` and ``extract`` agree), instead of "already complete".
"""
from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
from test_extract import config, shard_bytes

from cocomix.stage1_extract.extract import run_extract
from cocomix.storage.targets import TargetReader
from cocomix.storage.verify import verify_targets


@pytest.fixture(scope="module")
def finished(tmp_path_factory, token_store, teacher_dir, openai_sae_file):
    out = tmp_path_factory.mktemp("targets") / "val"
    run_extract(config(token_store, teacher_dir, openai_sae_file, out, splits="val"))
    return out


def test_moved_inputs_resume_with_the_same_bytes(tmp_path, monkeypatch, finished, token_store, teacher_dir, openai_sae_file):
    out = tmp_path / "t"
    shutil.copytree(finished, out)
    victim = out / "val" / "shard-00001.arrow"
    victim.unlink()
    victim.with_suffix(".json").unlink()
    (out / "manifest.json").unlink()
    plan_before = (out / "plan.json").read_bytes()
    moved = tmp_path / "moved"
    teacher = shutil.copytree(teacher_dir, moved / "teacher")
    tokens = shutil.copytree(token_store, moved / "tokens")
    sae = shutil.copy(openai_sae_file, moved / "sae.pt")
    monkeypatch.chdir(moved)
    result = run_extract(config(str(tokens) + "/", os.path.relpath(teacher), os.path.relpath(sae), out, splits="val"))
    assert result.shards_computed == 1
    assert shard_bytes(out) == shard_bytes(finished)
    assert (out / "plan.json").read_bytes() == plan_before
    meta = TargetReader.open(out, verify=True).meta
    assert meta["tokens"]["path"] == str(tokens.resolve()) and meta["sae"]["source"] == "sae.pt"  # where this run found them
    manifest = (out / "manifest.json").read_bytes()
    again = run_extract(config(str(token_store), str(teacher_dir), str(openai_sae_file), out, splits="val"))
    assert again.shards_computed == 0 and (out / "manifest.json").read_bytes() == manifest


def _truncate_shards(manifest: dict) -> dict:
    return {**manifest, "shards": manifest["shards"][:-1]}


def _other_sae_k(manifest: dict) -> dict:
    return {**manifest, "meta": {**manifest["meta"], "sae": {**manifest["meta"]["sae"], "k": 16}}}


@pytest.mark.parametrize("damage", ["", "[]", "{}", _truncate_shards, _other_sae_k, lambda m: {**m, "k_attr": 5}])
def test_complete_folder_with_broken_manifest_rewrites_it(tmp_path, caplog, finished, token_store, teacher_dir, openai_sae_file, damage):
    out = tmp_path / "t"
    shutil.copytree(finished, out)
    manifest = out / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text(damage if isinstance(damage, str) else json.dumps(damage(good)))
    with caplog.at_level(logging.WARNING, logger="cocomix"):
        result = run_extract(config(token_store, teacher_dir, openai_sae_file, out, splits="val"))
    assert result.shards_computed == 0
    assert "rewriting it" in caplog.text and "manifest kept" not in caplog.text
    rewritten = json.loads(manifest.read_text())
    assert {k: v for k, v in rewritten.items() if k != "extra"} == {k: v for k, v in good.items() if k != "extra"}
    assert rewritten["extra"]["coverage"] == good["extra"]["coverage"]
    verify_targets(out)
    TargetReader.open(out, verify=True)
