"""Checkpoints: complete-or-absent folders, full training state round trip, never non-finite weights."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from cocomix.core.errors import CocomixError
from cocomix.stage2_pretrain import checkpoint as ck
from cocomix.stage2_pretrain.data import DataState
from cocomix.stage2_pretrain.optim import Schedule, make_optimizer, make_scheduler


def make_complete(out, step):
    folder = ck.step_dir(out, step)
    folder.mkdir(parents=True)
    (folder / ck.MARKER).write_bytes(b"")
    return folder


def test_incomplete_and_temp_folders_are_ignored_and_pruned(tmp_path):
    make_complete(tmp_path, 2)
    make_complete(tmp_path, 5)
    ck.step_dir(tmp_path, 9).mkdir(parents=True)  # killed before its marker
    (tmp_path / ck.CKPT_DIR / ".step-0000011.tmp").mkdir()  # killed mid-write
    assert ck.latest_checkpoint(tmp_path).name == "step-0000005"
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step-0000002", "step-0000005"]
    ck.prune(tmp_path, keep_last=1)
    left = sorted(p.name for p in (tmp_path / ck.CKPT_DIR).iterdir())
    assert left == ["step-0000005", "step-0000009"]
    assert ck.latest_checkpoint(tmp_path / "nothing") is None


@pytest.fixture
def setup_state(tokenizer_dir):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from transformers import AutoTokenizer

    from cocomix.stage2_pretrain.presets import build_model, get_preset

    AcceleratorState._reset_state()
    GradientState._reset_state()
    acc = Accelerator(cpu=True)
    torch.manual_seed(0)
    model = build_model("cocomix", get_preset("tiny"), vocab_size=384, n_latents=96)
    opt = make_optimizer(model, 1e-3, on_cuda=False)
    sched = make_scheduler(opt, Schedule(1e-3, 1e-4, 10))
    model, opt = acc.prepare(model, opt)
    ids = torch.randint(0, 384, (2, 16))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return acc, model, opt, sched, AutoTokenizer.from_pretrained(tokenizer_dir)


def test_round_trip_restores_optimizer_scheduler_rng_and_data(tmp_path, setup_state):
    from cocomix.stage2_pretrain.model import CoCoMixForCausalLM

    acc, model, opt, sched, tok = setup_state
    state = ck.TrainerState(7, DataState(epoch=1, position=5, offset=33))
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    path = ck.save_checkpoint(acc, model, opt, sched, out=tmp_path, state=state, tokenizer=tok, keep_last=2)
    expect_rng = (random.random(), np.random.rand(), torch.rand(1))
    for name in ("model.safetensors", "config.json", "tokenizer.json", "optimizer.pt", "scheduler.pt", "rng/rank-00000.pt", "complete"):
        assert (path / name).exists(), name
    reloaded = CoCoMixForCausalLM.from_pretrained(path)
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k
    opt2 = make_optimizer(reloaded, 1e-3, on_cuda=False)
    sched2 = make_scheduler(opt2, Schedule(1e-3, 1e-4, 10))
    got = ck.load_training_state(acc, reloaded, opt2, sched2, path)
    assert got == state
    assert sched2.last_epoch == sched.last_epoch and sched2.get_last_lr() == sched.get_last_lr()
    for s1, s2 in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values()):
        assert torch.equal(s1["exp_avg"], s2["exp_avg"]) and torch.equal(s1["exp_avg_sq"], s2["exp_avg_sq"])
    assert (random.random(), np.random.rand()) == expect_rng[:2] and torch.equal(torch.rand(1), expect_rng[2])


def test_non_finite_weights_are_never_saved(tmp_path, setup_state):
    acc, model, opt, sched, tok = setup_state
    with torch.no_grad():
        next(model.parameters())[0] = float("nan")
    with pytest.raises(CocomixError, match="not finite at step 3"):
        ck.save_checkpoint(acc, model, opt, sched, out=tmp_path, state=ck.TrainerState(3, DataState()), tokenizer=tok, keep_last=2)
    assert ck.latest_checkpoint(tmp_path) is None and not ck.step_dir(tmp_path, 3).exists()
