"""``sae train`` resumes: a killed run continues from its last saved state to the same SAE bytes."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cocomix.core.errors import CocomixError
from cocomix.stage1_extract.config import SaeTrainConfig
from cocomix.stage1_extract.sae import recipe as sae_recipe
from cocomix.stage1_extract.sae import state as sae_state
from cocomix.stage1_extract.sae import train as st

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
# 32 steps of 256 activations; AuxK active (dead after 512 tokens); a small buffer so its rows are saved mid-fill
SMALL = dict(layer=1, latents=64, k=4, train_tokens=8192, batch_tokens=256, lr=3e-3, window=64, teacher_batch=4,
             dead_tokens=512, auxk=16, buffer_tokens=1024, eval_tokens=256, device="cpu", save_every=3)


def small_config(token_store, teacher_dir, out, **kw) -> SaeTrainConfig:
    return SaeTrainConfig(**{**SMALL, "teacher": str(teacher_dir), "tokens": str(token_store), "out": str(out), **kw})


def argv(cfg: SaeTrainConfig) -> list[str]:
    args = []
    for name in ("teacher", "tokens", "out", *SMALL):
        args += [f"--{name.replace('_', '-')}", str(getattr(cfg, name))]
    return args


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


DEFAULT_INIT_SAMPLE = sae_state.INIT_SAMPLE


@pytest.fixture(scope="module", autouse=True)
def small_sample():
    """A short init sample (the default 32k would be the whole run): most steps then come from the buffer."""
    sae_state.INIT_SAMPLE = 1024
    yield
    sae_state.INIT_SAMPLE = DEFAULT_INIT_SAMPLE


@pytest.fixture(scope="module")
def reference(tmp_path_factory, token_store, teacher_dir):
    return st.run_sae_train(small_config(token_store, teacher_dir, tmp_path_factory.mktemp("ref") / "sae", save_every=0))


class Killed(BaseException):
    pass


def run_until(cfg: SaeTrainConfig, stop_at: int, monkeypatch) -> None:
    """Run in-process and die (no cleanup) just before step ``stop_at`` would be taken."""
    real = sae_recipe.train_step
    taken = {"n": first_step(cfg)}

    def step(*args, **kw):
        if taken["n"] == stop_at:
            raise Killed
        taken["n"] += 1
        return real(*args, **kw)

    monkeypatch.setattr(st, "train_step", step)
    with pytest.raises(Killed):
        st.run_sae_train(cfg)
    monkeypatch.setattr(st, "train_step", real)


def first_step(cfg: SaeTrainConfig) -> int:
    states = sae_state.saved_states(Path(cfg.out))
    return int(states[-1].name.split("-")[1]) if states else 0


@pytest.mark.parametrize("stop_at", [2, 5, 11, 31])  # before any save, saved inside the init sample, mid-run, last step
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, token_store, teacher_dir, reference, monkeypatch, stop_at):
    cfg = small_config(token_store, teacher_dir, tmp_path / "sae")
    run_until(cfg, stop_at, monkeypatch)
    saved = sae_state.saved_states(tmp_path / "sae")
    assert [p.name for p in saved] == ([f"step-{stop_at // 3 * 3:07d}"] if stop_at >= 3 else [])
    done = st.run_sae_train(cfg)
    assert done.sha256 == reference.sha256 and done.steps == reference.steps and done.tokens == reference.tokens
    assert done.fvu == reference.fvu and done.dead_fraction == reference.dead_fraction
    assert not (tmp_path / "sae" / ".resume").exists()
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]


def test_twice_interrupted_run_resumes_to_the_same_bytes(tmp_path, token_store, teacher_dir, reference, monkeypatch):
    cfg = small_config(token_store, teacher_dir, tmp_path / "sae")
    run_until(cfg, 8, monkeypatch)
    run_until(cfg, 20, monkeypatch)  # continues from step 6, killed after saving 18
    assert [p.name for p in sae_state.saved_states(tmp_path / "sae")] == ["step-0000018"]
    assert st.run_sae_train(cfg).sha256 == reference.sha256


def test_sigkill_then_rerun_gives_the_same_sae_bytes(tmp_path, token_store, teacher_dir, monkeypatch):
    """Real process, real SIGKILL, plain CLI (default init sample: the kill lands inside it or just after)."""
    monkeypatch.setattr(sae_state, "INIT_SAMPLE", DEFAULT_INIT_SAMPLE)  # as the CLI process has it
    cfg = small_config(token_store, teacher_dir, tmp_path / "run", train_tokens=16384, save_every=2)
    with threads(1):
        reference = st.run_sae_train(small_config(token_store, teacher_dir, tmp_path / "ref", train_tokens=16384, save_every=0))
    cmd = [sys.executable, "-m", "cocomix.pipeline.cli", "sae", "train", *argv(cfg)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not sae_state.saved_states(tmp_path / "run"):
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before a state was saved: {proc.stderr.read()}"
        assert time.monotonic() < deadline, "no state was saved"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert (tmp_path / "run" / ".resume").is_dir() and not (tmp_path / "run" / "sae.safetensors").exists()
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "run" / "sae.safetensors").read_bytes() == (reference.out / "sae.safetensors").read_bytes()
    assert not (tmp_path / "run" / ".resume").exists()


def interrupted(tmp_path, token_store, teacher_dir, monkeypatch, **kw) -> SaeTrainConfig:
    cfg = small_config(token_store, teacher_dir, tmp_path / "sae", train_tokens=2048, **kw)
    run_until(cfg, 4, monkeypatch)
    assert sae_state.saved_states(tmp_path / "sae")
    return cfg


def test_rerun_with_other_flags_is_refused_in_one_line(tmp_path, token_store, teacher_dir, monkeypatch):
    from cocomix.pipeline.cli import app

    cfg = interrupted(tmp_path, token_store, teacher_dir, monkeypatch)
    args = argv(cfg)
    args[args.index("--lr") + 1] = "0.001"
    args[args.index("--save-every") + 1] = "5"  # saving more or less often changes nothing: not compared
    result = CliRunner().invoke(app, ["sae", "train", *args])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "--lr was 0.003, now 0.001" in message and "--overwrite" in message and "save-every" not in message
    assert sae_state.saved_states(tmp_path / "sae")  # the unfinished run is kept


def test_overwrite_discards_a_state_with_other_flags(tmp_path, token_store, teacher_dir, monkeypatch):
    cfg = interrupted(tmp_path, token_store, teacher_dir, monkeypatch)
    other = small_config(token_store, teacher_dir, tmp_path / "sae", train_tokens=2048, seed=1, overwrite=True)
    fresh = st.run_sae_train(small_config(token_store, teacher_dir, tmp_path / "fresh", train_tokens=2048, seed=1))
    assert st.run_sae_train(other).sha256 == fresh.sha256
    with pytest.raises(CocomixError, match="--overwrite"):  # a finished SAE is not resumed over
        st.run_sae_train(cfg)


def test_out_with_a_state_is_accepted_but_other_files_are_refused(tmp_path, token_store, teacher_dir, monkeypatch):
    cfg = interrupted(tmp_path, token_store, teacher_dir, monkeypatch)
    st.prepare_out(cfg)  # only .resume: fine
    (tmp_path / "sae" / "notes.txt").write_text("mine")
    with pytest.raises(CocomixError, match="not empty"):
        st.prepare_out(cfg)
    (tmp_path / "sae" / "notes.txt").unlink()
    stale = tmp_path / "sae" / ".resume" / ".step-0000009.tmp"  # a save that was cut short
    stale.mkdir()
    st.run_sae_train(cfg)
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]


def test_unfinished_first_save_starts_over(tmp_path, token_store, teacher_dir, reference):
    out = tmp_path / "sae"
    (out / ".resume" / ".step-0000003.tmp").mkdir(parents=True)  # killed while writing the first state
    assert st.run_sae_train(small_config(token_store, teacher_dir, out)).sha256 == reference.sha256


def test_save_every_validation(tmp_path):
    from cocomix.core.errors import ConfigError

    with pytest.raises(ConfigError, match="--save-every"):
        SaeTrainConfig(**{**SMALL, "teacher": "t", "tokens": "s", "out": str(tmp_path), "save_every": -1})
