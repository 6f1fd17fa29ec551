"""The shipped Accelerate configs, launched for real with 2 CPU processes (gloo):
``accelerate launch --config_file configs/accelerate/{ddp,fsdp}.yaml --num_processes 2``.

Accelerate enables FSDP only on GPU-like devices, so the FSDP processes run the CLI through
``fsdp_on_cpu.py``, which makes Accelerate take its FSDP path on CPU (see its docstring).
Everything of cocomix's runs unchanged: the transformer-block wrap policy, training on sharded
parameters, the full state dict gathered to rank 0 into a plain HF folder, the FSDP optimizer
save and load, exact resume, evaluation with equal forward passes on every rank.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_processes import ENV, argv, flags, free_port, train_records

from cocomix.core.errors import ConfigError
from cocomix.stage2_pretrain.config import PretrainConfig
from cocomix.stage2_pretrain.train import run_pretrain

ROOT = Path(__file__).resolve().parents[2]
SHIM = Path(__file__).with_name("fsdp_on_cpu.py")
KEYS = ("loss", "ntp_loss", "concept_loss", "grad_norm")


def launch(config: str, script: list[str], args: list[str]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate" / config),
           "--num_processes", "2", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           *script, *args]
    done = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def launch_fsdp(args: list[str]) -> subprocess.CompletedProcess:
    return launch("fsdp.yaml", [str(SHIM)], args)


def launched_as(done: subprocess.CompletedProcess) -> str:
    """What the run logged about its Accelerate set-up (the console may wrap the line)."""
    text = re.sub(r"\s+", " ", done.stderr)
    match = re.search(r"accelerate: (\w+) on (\w+), (\d) process", text)
    assert match, text[-2000:]
    return " ".join(match.groups())


def assert_close_records(got: list[dict], want: list[dict], keys) -> None:
    assert [r["step"] for r in got] == [r["step"] for r in want] and got
    for key in keys:
        torch.testing.assert_close(torch.tensor([r[key] for r in got]), torch.tensor([r[key] for r in want]),
                                   rtol=1e-4, atol=1e-6, msg=key)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, token_store, targets_dir):
    """One CoCoMix FSDP run of 4 steps (checkpoints at 2 and 4) and its 1-process twin."""
    tmp = tmp_path_factory.mktemp("fsdp")
    common = flags(tmp / "fsdp", token_store, targets_dir, max_steps=4, save_every=2, eval_every=2, eval_windows=3)
    one = run_pretrain(PretrainConfig(**(common | {"out": str(tmp / "one")})))
    done = launch_fsdp(["pretrain", *argv(common)])
    return common, Path(common["out"]), Path(one.out), done


def test_fsdp_run_shards_and_matches_one_process(fsdp_run):
    common, fsdp, one, done = fsdp_run
    plan = json.loads((fsdp / "run.json").read_text())["plan"]
    assert (plan["world"], plan["micro_batch"], plan["accum"]) == (2, 2, 1)
    assert launched_as(done) == "FSDP cpu 2"  # the launch really took Accelerate's FSDP path
    assert_close_records(train_records(fsdp), train_records(one), KEYS)
    assert_close_records(train_records(fsdp, "eval"), train_records(one, "eval"), ("val_loss",))


def test_ddp_config_launch_matches_one_process(tmp_path, token_store, targets_dir):
    common = flags(tmp_path / "ddp", token_store, targets_dir, max_steps=3, save_every=0, eval_every=0)
    one = run_pretrain(PretrainConfig(**(common | {"out": str(tmp_path / "one")})))
    done = launch("ddp.yaml", ["-m", "cocomix.pipeline.cli"], ["pretrain", *argv(common)])
    assert launched_as(done) == "MULTI_CPU cpu 2"
    assert_close_records(train_records(tmp_path / "ddp"), train_records(one.out), KEYS)


def test_fsdp_checkpoint_is_a_full_hf_folder(fsdp_run):
    from cocomix.stage2_pretrain.model import CoCoMixForCausalLM

    _, fsdp, one, _ = fsdp_run
    ckpt = fsdp / "checkpoints" / "step-0000004"
    assert (ckpt / "complete").exists() and (ckpt / "optimizer").is_dir()
    got = CoCoMixForCausalLM.from_pretrained(ckpt).state_dict()
    want = CoCoMixForCausalLM.from_pretrained(one / "checkpoints" / "step-0000004").state_dict()
    assert got.keys() == want.keys()
    for name in want:  # full (gathered) tensors, not rank 0's shard
        assert got[name].shape == want[name].shape, name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_fsdp_resume_from_a_checkpoint_continues_exactly(fsdp_run, tmp_path):
    """The run folder as a crash after the step-2 checkpoint leaves it; ``--resume`` reloads the
    FSDP optimizer and must reproduce steps 3-4 of the uninterrupted FSDP run."""
    common, fsdp, _, _ = fsdp_run
    crashed = tmp_path / "crashed"
    shutil.copytree(fsdp, crashed)
    shutil.rmtree(crashed / "checkpoints" / "step-0000004")
    done = launch_fsdp(["pretrain", *argv(common | {"out": str(crashed)}), "--resume"])
    assert "resuming from step-0000002" in done.stderr.replace("\n", " ")
    got, want = train_records(crashed), train_records(fsdp)
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for key in KEYS:
        assert [r[key] for r in got] == [r[key] for r in want], key  # same world and shards: exact


def test_fsdp_ntp_checkpoint_is_a_stock_gpt2_folder(tmp_path, token_store):
    from transformers import GPT2LMHeadModel

    common = dict(method="ntp", size="tiny", tokens=str(token_store), out=str(tmp_path / "ntp"), batch_tokens=512,
                  log_every=1, max_steps=2, save_every=0, eval_every=0)
    one = run_pretrain(PretrainConfig(**(common | {"out": str(tmp_path / "one")})))
    launch_fsdp(["pretrain", *argv(common)])
    assert_close_records(train_records(tmp_path / "ntp"), train_records(one.out), ("loss", "grad_norm"))
    model = GPT2LMHeadModel.from_pretrained(tmp_path / "ntp" / "checkpoints" / "step-0000002")
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # still tied


def test_fsdp_without_a_gpu_is_refused_with_the_way_out(monkeypatch):
    from cocomix.stage2_pretrain.run_setup import check_fsdp_device

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs GPUs.*ddp.yaml"):
        check_fsdp_device()
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    check_fsdp_device()
