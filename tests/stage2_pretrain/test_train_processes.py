"""Real processes: a SIGKILLed run resumes to exactly the same losses; 2 processes (gloo) match 1."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

from cocomix.stage2_pretrain.config import PretrainConfig
from cocomix.stage2_pretrain.train import run_pretrain

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def flags(out: Path, tokens: Path, targets: Path, **kw) -> dict:
    return dict(method="cocomix", size="tiny", tokens=str(tokens), targets=str(targets), out=str(out),
                batch_tokens=512, log_every=1) | kw


def argv(d: dict) -> list[str]:
    out = []
    for key, value in d.items():
        out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def train_records(out: Path, kind: str = "train") -> list[dict]:
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"run ended (rc {proc.returncode}) before {path} appeared: {proc.stderr.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear"
        time.sleep(0.02)


def test_sigkill_then_resume_gives_the_same_losses_step_by_step(tmp_path, token_store, targets_dir):
    common = flags(tmp_path / "run", token_store, targets_dir, max_steps=8, save_every=3, eval_every=0)
    reference = run_pretrain(PretrainConfig(**(common | {"out": str(tmp_path / "ref")})))
    cmd = [sys.executable, "-m", "cocomix.pipeline.cli", "pretrain", *argv(common)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "run" / "checkpoints" / "step-0000003" / "complete", proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = subprocess.run(cmd + ["--resume"], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resuming from step-0000003" in done.stderr.replace("\n", " ")
    got, want = train_records(tmp_path / "run"), train_records(reference.out)
    assert [r["step"] for r in got] == list(range(1, 9))
    for key in ("loss", "ntp_loss", "concept_loss", "grad_norm", "lr"):
        assert [r[key] for r in got] == [r[key] for r in want], key  # exact on CPU


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_with_the_same_global_batch(tmp_path, token_store, targets_dir):
    common = flags(tmp_path / "two", token_store, targets_dir, max_steps=4, save_every=0, eval_every=2, eval_windows=3)
    one = run_pretrain(PretrainConfig(**(common | {"out": str(tmp_path / "one")})))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "cocomix.pipeline.cli", "pretrain", *argv(common)]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads((tmp_path / "two" / "run.json").read_text())["plan"]
    assert (plan["world"], plan["micro_batch"], plan["accum"]) == (2, 2, 1)
    for kind, keys in (("train", ("loss", "ntp_loss", "concept_loss", "grad_norm")), ("eval", ("val_loss",))):
        a, b = train_records(one.out, kind), train_records(tmp_path / "two", kind)
        assert [r["step"] for r in a] == [r["step"] for r in b] and a
        for key in keys:
            torch.testing.assert_close(torch.tensor([r[key] for r in b]), torch.tensor([r[key] for r in a]), rtol=1e-4, atol=1e-6)
