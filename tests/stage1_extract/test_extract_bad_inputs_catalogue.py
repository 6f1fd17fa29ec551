"""Stage 1's bad inputs through the real CLI: one ``error:`` line each, no traceback, nothing written,
and no code from any file ever runs (planted pickles, custom-code teachers)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from catalogue import assert_one_line_error, corrupt, plant_pickle, run_cli


def extract(token_store, teacher, sae, out, *extra):
    return run_cli("extract", "--tokens", token_store, "--teacher", teacher, "--sae", sae, "--out", out,
                   "--layer", "1", "--device", "cpu", "--window", "32", "--splits", "val", *extra)


def copy_teacher(teacher_dir: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(teacher_dir, tmp_path / "teacher"))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def custom_code_teacher(teacher_dir: Path, tmp_path: Path, marker: Path) -> Path:
    """A teacher whose config asks transformers to import ``custom.py`` (which would create ``marker``)."""
    folder = copy_teacher(teacher_dir, tmp_path)
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').close()\nfrom transformers import GPT2Config as Cfg, GPT2LMHeadModel as Model\n")
    edit_config(folder, auto_map={"AutoConfig": "custom.Cfg", "AutoModelForCausalLM": "custom.Model"})
    return folder


def teacher_case(name: str, teacher_dir: Path, tmp_path: Path, tokenizer_dir: Path) -> tuple[Path, str]:
    """(a damaged copy of the teacher, a word its error line must hold)."""
    folder = copy_teacher(teacher_dir, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    if name == "invalid config.json":
        (folder / "config.json").write_text("{\"n_layer\": 3,")
        return folder, "not valid JSON"
    if name == "truncated safetensors":
        corrupt(folder / "model.safetensors", truncate_to=(folder / "model.safetensors").stat().st_size // 2)
        return folder, "does not load"
    if name == "config names more layers than the weights":
        edit_config(folder, n_layer=config["n_layer"] + 1)
        return folder, "missing"
    if name == "config names fewer layers than the weights":
        edit_config(folder, n_layer=config["n_layer"] - 1)
        return folder, "unexpected"
    if name == "tensors of another shape":
        edit_config(folder, n_embd=2 * config["n_embd"])
        return folder, "another shape"
    if name == "vocabulary smaller than the store's":
        from transformers import GPT2LMHeadModel

        model = GPT2LMHeadModel.from_pretrained(folder)
        model.resize_token_embeddings(100)  # consistent weights and config, too few rows for the store's ids
        model.save_pretrained(folder)
        return folder, "vocabulary"
    raise AssertionError(name)


TEACHER_CASES = ["invalid config.json", "truncated safetensors", "config names more layers than the weights",
                 "config names fewer layers than the weights", "tensors of another shape", "vocabulary smaller than the store's"]


@pytest.mark.parametrize("case", TEACHER_CASES)
def test_damaged_teacher_is_one_line_and_writes_nothing(case, tmp_path, token_store, teacher_dir, tokenizer_dir, openai_sae_file):
    teacher, word = teacher_case(case, teacher_dir, tmp_path, tokenizer_dir)
    out = tmp_path / "out"
    line = assert_one_line_error(extract(token_store, teacher, openai_sae_file, out), word)
    assert str(teacher) in line or "vocabulary" in word
    assert not out.exists()


def test_planted_pickle_in_the_sae_file_never_runs(tmp_path, token_store, teacher_dir, openai_sae_state):
    marker = tmp_path / "ran"
    sae = plant_pickle(tmp_path / "sae" / "1.pt", marker, around=openai_sae_state)
    assert_one_line_error(extract(token_store, teacher_dir, sae, tmp_path / "out"), str(sae))
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_teacher_naming_custom_code_is_refused_even_with_yes_piped(tmp_path, token_store, teacher_dir, openai_sae_file):
    """A batch job piping `y` must not make transformers import the folder's code: no prompt, refused."""
    marker = tmp_path / "imported"
    teacher = custom_code_teacher(teacher_dir, tmp_path, marker)
    out = tmp_path / "out"
    args = ["extract", "--tokens", token_store, "--teacher", teacher, "--sae", openai_sae_file, "--out", out,
            "--layer", "1", "--device", "cpu"]
    proc = subprocess.run([sys.executable, "-m", "cocomix.pipeline.cli", *map(str, args)], input="y\ny\n",
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "auto_map" in proc.stderr and "Traceback" not in proc.stderr and "[y/N]" not in proc.stdout + proc.stderr
    assert not marker.exists() and not out.exists()


def test_k_attr_above_the_latents_with_pre_attribution(tmp_path, token_store, teacher_dir, openai_sae_file):
    out = tmp_path / "out"
    assert_one_line_error(extract(token_store, teacher_dir, openai_sae_file, out, "--attribution-input", "pre", "--k-attr", "300"),
                          "--k-attr 300")
    assert not out.exists()


def test_token_store_missing_an_array_zarr_json(tmp_path, token_store, teacher_dir, openai_sae_file):
    store = Path(shutil.copytree(token_store, tmp_path / "tokens"))
    (store / "val" / "tokens" / "zarr.json").unlink()
    out = tmp_path / "out"
    assert_one_line_error(extract(store, teacher_dir, openai_sae_file, out), str(store))
    assert not out.exists()


def test_planted_pickle_in_a_sae_train_resume_state_never_runs(tmp_path, token_store, teacher_dir):
    from cocomix.stage1_extract.config import SaeTrainConfig
    from cocomix.stage1_extract.sae.setup import open_inputs
    from cocomix.stage1_extract.sae.state import RESUME_DIR, RUN_FILE, STATE_FILE, run_identity

    out, marker = tmp_path / "sae", tmp_path / "ran"
    flags = dict(teacher=str(teacher_dir), tokens=str(token_store), layer=1, out=str(out), latents=64, k=4,
                 train_tokens=2048, batch_tokens=256, window=32, device="cpu")
    identity = run_identity(SaeTrainConfig(**flags), open_inputs(SaeTrainConfig(**flags)))
    state = out / RESUME_DIR / "step-0000001"
    plant_pickle(state / STATE_FILE, marker, around={"step": 1})
    (state / RUN_FILE).write_text(json.dumps({"identity": identity}))
    (state / "complete").write_text("")
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    assert_one_line_error(run_cli("sae", "train", *args), STATE_FILE)
    assert not marker.exists() and not (out / "sae.safetensors").exists()


def test_overwrite_refuses_while_another_extract_writes_the_folder(tmp_path, token_store, teacher_dir, openai_sae_file):
    """Two processes: while another one holds the folder as a running extract does (``join_writers``, the
    writer's own code), `--overwrite` with other flags refuses and clears nothing; once it is gone, it works."""
    from cocomix.storage.targets import TargetReader

    out = tmp_path / "out"
    assert extract(token_store, teacher_dir, openai_sae_file, out).exit_code == 0
    before = sorted(p.name for p in (out / "val").iterdir())
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, time; from cocomix.storage.target_writer import join_writers; "
        f"fd, _ = join_writers({str(out)!r}); fcntl.flock(fd, fcntl.LOCK_SH); print('holding', flush=True); time.sleep(120)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        result = extract(token_store, teacher_dir, openai_sae_file, out, "--overwrite", "--k-attr", "2")
        assert_one_line_error(result, "another extract is writing", str(out))
        assert sorted(p.name for p in (out / "val").iterdir()) == before
        assert TargetReader.open(out, verify=True).k_attr == 4
    finally:
        holder.kill()
        holder.wait()
    result = extract(token_store, teacher_dir, openai_sae_file, out, "--overwrite", "--k-attr", "2")
    assert result.exit_code == 0, result.output
    assert TargetReader.open(out, verify=True).k_attr == 2


def test_a_failed_start_with_other_flags_does_not_block_a_corrected_retry(tmp_path, token_store, teacher_dir, openai_sae_file, monkeypatch):
    """plan.json of a run that finished no shard is replaced by a retry with corrected flags (no --overwrite)."""
    from cocomix.stage1_extract import extract as extract_mod

    def crash(*a, **k):
        raise OSError(28, "No space left on device")

    out = tmp_path / "out"
    with monkeypatch.context() as m:
        m.setattr(extract_mod, "label_shard", crash)
        assert_one_line_error(extract(token_store, teacher_dir, openai_sae_file, out, "--k-attr", "8"), "No space left")
    assert (out / "plan.json").exists() and not list(out.glob("*/shard-*.json"))
    result = extract(token_store, teacher_dir, openai_sae_file, out, "--k-attr", "4")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["k_attr"] == 4
