"""Stage 2's bad inputs through the real CLI: one ``error:`` line each, no traceback, nothing
written; no pickle in a checkpoint ever runs; the advice printed on a non-finite loss works."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from catalogue import assert_one_line_error, corrupt, plant_pickle, run_cli


BASE = ["--size", "tiny", "--batch-tokens", "512", "--eval-every", "0", "--log-every", "1"]


def pretrain(out, tokens, *extra, method="ntp", targets=None):
    more = ["--targets", targets] if targets else []
    return run_cli("pretrain", "--method", method, "--tokens", tokens, *more, "--out", out, *BASE, *extra)


@pytest.fixture(scope="module")
def ntp_run(tmp_path_factory, token_store):
    """A finished 2-step NTP run with a checkpoint at each step (copied by the tests that damage it)."""
    out = tmp_path_factory.mktemp("ntp") / "run"
    result = pretrain(out, token_store, "--max-steps", "2", "--save-every", "1")
    assert result.exit_code == 0, result.output
    return out


def copy_run(ntp_run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(ntp_run, tmp_path / "run"))


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng/rank-00000.pt"])
def test_planted_pickle_in_a_checkpoint_never_runs(name, tmp_path, ntp_run, token_store):
    run, marker = copy_run(ntp_run, tmp_path), tmp_path / "ran"
    plant_pickle(run / "checkpoints" / "step-0000002" / name, marker)
    before = (run / "run.json").read_text()
    assert_one_line_error(pretrain(run, token_store, "--max-steps", "3", "--resume"), name, "step-0000001")
    assert not marker.exists()
    assert json.loads((run / "run.json").read_text())["plan"] == json.loads(before)["plan"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-0000001", "step-0000002"]


@pytest.mark.parametrize("damage", ["truncated weights", "config names more layers", "invalid config.json"])
def test_damaged_checkpoint_is_refused_by_eval_naming_the_folder(damage, tmp_path, ntp_run, token_store):
    run = copy_run(ntp_run, tmp_path)
    ckpt = run / "checkpoints" / "step-0000002"
    damage_model(ckpt, damage)
    assert_one_line_error(run_cli("eval", ckpt, "--tokens", token_store, "--max-windows", "2"), str(ckpt))
    assert not (ckpt / "eval.json").exists()


def damage_model(ckpt: Path, damage: str) -> None:
    if damage == "truncated weights":
        corrupt(ckpt / "model.safetensors", truncate_to=(ckpt / "model.safetensors").stat().st_size - 100)
    elif damage == "config names more layers":
        config = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**config, "n_layer": config["n_layer"] + 1}))
    else:
        (ckpt / "config.json").write_text("{\"model_type\": ")


def test_checkpoint_naming_custom_code_is_refused_with_stdin_closed_or_yes_piped(tmp_path, ntp_run, token_store):
    """eval of a checkpoint whose config asks for custom code: refused before transformers could ask or import."""
    import os
    import subprocess
    import sys

    run, marker = copy_run(ntp_run, tmp_path), tmp_path / "imported"
    ckpt = run / "checkpoints" / "step-0000002"
    (ckpt / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "custom.Model"}}))
    cmd = [sys.executable, "-m", "cocomix.pipeline.cli", "eval", str(ckpt), "--tokens", str(token_store), "--max-windows", "2"]
    for stdin in (subprocess.DEVNULL, None):
        proc = subprocess.run(cmd, stdin=stdin, input=None if stdin is not None else "y\n", capture_output=True,
                              text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
        assert proc.returncode == 2 and "auto_map" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not marker.exists() and not (ckpt / "eval.json").exists()


def test_resume_falls_back_from_a_damaged_newest_checkpoint(tmp_path, ntp_run, token_store):
    run = copy_run(ntp_run, tmp_path)
    damage_model(run / "checkpoints" / "step-0000002", "truncated weights")
    result = pretrain(run, token_store, "--max-steps", "3", "--resume")
    assert result.exit_code == 0, result.output
    assert "step-0000002 is damaged" in result.output and "previous complete one, step-0000001" in result.output
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # steps 2 and 3 redone from step 1


@pytest.mark.parametrize("flag", ["--lr", "--lam"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_floats_are_refused_before_anything_is_written(flag, value, tmp_path, token_store):
    out = tmp_path / "run"
    assert_one_line_error(pretrain(out, token_store, "--max-steps", "1", f"{flag}={value}"), flag)
    assert not out.exists()


def test_leftovers_of_a_failed_start_do_not_block_a_plain_retry(tmp_path, token_store):
    out = tmp_path / "run"
    assert_one_line_error(pretrain(out, token_store, "--max-steps", "1", "--tracker", "nope"), "--tracker")
    result = pretrain(out, token_store, "--max-steps", "1")
    assert result.exit_code == 0, result.output


def test_disk_full_while_checkpointing_is_one_line_and_keeps_the_last_checkpoint(tmp_path, token_store, monkeypatch):
    import torch

    real, calls = torch.save, []

    def full_disk(obj, f, *a, **k):  # what torch.save raises when the disk fills mid-write
        calls.append(f)
        if len(calls) > 3:  # the second checkpoint's first torch.save
            raise RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/0: file write failed")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "run"
    assert_one_line_error(pretrain(out, token_store, "--max-steps", "2", "--save-every", "1"), "disk full", "step 2")
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000001"]


def test_non_finite_loss_advice_is_a_command_that_works(tmp_path, token_store, nan_loss_at_call):
    nan_loss_at_call(3)
    out = tmp_path / "run"
    line = assert_one_line_error(pretrain(out, token_store, "--max-steps", "4", "--save-every", "2", "--lr", "1e-3"),
                                 "non-finite loss at step 3")
    advice = re.search(r"re-run the command with (--resume --override-lr --lr \S+)", line).group(1).split()
    assert float(advice[-1]) == pytest.approx(5e-4)
    plain = pretrain(out, token_store, "--max-steps", "4", "--save-every", "2", "--resume", "--lr", advice[-1])
    assert_one_line_error(plain, "--override-lr")  # a changed lr is refused unless asked for
    result = pretrain(out, token_store, "--max-steps", "4", "--save-every", "2", *advice)
    assert result.exit_code == 0, result.output
    run = json.loads((out / "run.json").read_text())
    assert run["lr_changes"] == [{"step": 2, "from": 1e-3, "to": pytest.approx(5e-4)}]
    lrs = {json.loads(r)["step"]: json.loads(r)["lr"] for r in (out / "metrics.jsonl").read_text().splitlines()}
    from cocomix.stage2_pretrain.optim import lr_ratio

    # step 3 (0-based 2) ran at the new peak times the schedule's ratio there
    assert lrs[3] == pytest.approx(5e-4 * lr_ratio(2, warmup=1, total=4, min_ratio=0.1))


def test_label_ids_at_or_above_the_latents_are_refused_naming_the_targets(tmp_path, token_store, make_targets):
    """A tampered shard whose ids pass the checksum (rewritten with its sidecar) still cannot reach the model."""
    targets = make_targets(token_store, tmp_path / "targets")
    for shard in sorted((targets / "train").glob("shard-*.arrow")):
        tamper_ids(targets, f"train/{shard.name}", 200)
    out = tmp_path / "run"
    result = pretrain(out, token_store, "--max-steps", "1", method="cocomix", targets=targets)
    assert_one_line_error(result, str(targets), "200")


def tamper_ids(targets: Path, relpath: str, value: int) -> None:
    """Rewrite one shard with an out-of-range first label in every row and make every record (sidecar with
    its block checksums, manifest, stamp) agree, as a careful tamperer would."""
    import pyarrow as pa

    from cocomix.storage.files import sha256_file
    from cocomix.storage.target_schema import shard_column_views

    file = targets / relpath
    table = pa.ipc.open_file(pa.memory_map(str(file))).read_all()
    batch = table.to_batches()[0]
    k = batch.schema.field("concept_ids").type.list_size
    tokens, ids, scores = (a.copy() for a in shard_column_views(batch, k))
    ids[:, 0] = value
    columns = [pa.array(tokens), pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1)), k),
               pa.FixedSizeListArray.from_arrays(pa.array(scores.reshape(-1)), k)]
    new = pa.RecordBatch.from_arrays(columns, schema=batch.schema)
    with pa.OSFile(str(file), "wb") as sink, pa.ipc.new_file(sink, batch.schema) as writer:
        writer.write_batch(new)
    from cocomix.storage import block_check
    from cocomix.storage.target_schema import sidecar_path

    sha = sha256_file(file)
    manifest = json.loads((targets / "manifest.json").read_text())
    for entry in manifest["shards"]:
        if entry["path"] == relpath:
            entry.update(sha256=sha, bytes=file.stat().st_size)
            entry[block_check.KEY] = block_check.block_crcs(block_check.column_rows(new))
            sidecar_path(file).write_text(json.dumps(entry))
    (targets / "manifest.json").write_text(json.dumps(manifest))
    for stamp in (targets / ".locks").glob("*.stamp"):
        stamp.unlink()
