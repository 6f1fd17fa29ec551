"""Crash-safe training checkpoints that other tools can load as plain HF model folders.

::

    <out>/checkpoints/step-0001000/
      config.json, model.safetensors    save_pretrained: GPT2LMHeadModel / CoCoMixForCausalLM.from_pretrained(dir)
      tokenizer.json, ...               the token store's tokenizer (so an NTP checkpoint is a stock GPT-2 folder)
      optimizer.pt, scheduler.pt        (FSDP: optimizer saved by accelerate's FSDP helper)
      rng/rank-00000.pt                 python, numpy, torch (and CUDA) RNG states of every rank, as plain
                                        tensors and lists (every .pt here loads with weights_only=True)
      trainer_state.json                step, data position, world size
      complete                          written last: a folder without it is ignored

Every rank writes into ``.step-NNNNNNN.tmp``; rank 0 then writes ``complete`` and
renames the folder, so a kill at any moment leaves either no checkpoint or a whole one.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cocomix.core.errors import CocomixError
from cocomix.stage2_pretrain.data import DataState
from cocomix.storage.files import MARKER, atomic_write_json, complete_step_dirs, publish_step_dir, step_dir_name  # noqa: F401 (MARKER: part of this module's layout)
from cocomix.storage.safe_load import torch_load

log = logging.getLogger(__name__)

CKPT_DIR = "checkpoints"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    """What a checkpoint says about the loop: optimizer steps done and where the data stands."""

    step: int
    data: DataState


def step_dir(out: Path, step: int) -> Path:
    return Path(out) / CKPT_DIR / step_dir_name(step)


def complete_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temp and unmarked folders skipped)."""
    return complete_step_dirs(Path(out) / CKPT_DIR)


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1] if found else None


def read_trainer_state(ckpt: Path) -> TrainerState:
    d = json.loads((Path(ckpt) / STATE_FILE).read_text())
    return TrainerState(step=int(d["step"]), data=DataState.from_dict(d["data"]))


def _rng_state() -> dict:
    """Every RNG of this rank as tensors, ints, strings and lists: a ``weights_only`` load restores it."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": [version, list(mt), gauss],
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)  # older checkpoints: a numpy array
    np.random.set_state((name, keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _is_fsdp(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


def weights_finite(accelerator, model) -> bool:
    """True when every (local shard of every) parameter is finite on every rank."""
    bad = sum(int((~torch.isfinite(p.detach())).any()) for p in model.parameters())
    flag = torch.tensor([float(bad)], device=accelerator.device)
    return float(accelerator.reduce(flag, reduction="sum").item()) == 0.0


def _save_model(accelerator, model, tmp: Path, tokenizer) -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would break the one-line-per-step log
    state_dict = accelerator.get_state_dict(model)  # gathers FSDP shards to rank 0
    if accelerator.is_main_process:
        accelerator.unwrap_model(model).save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)


def _save_optimizer(accelerator, model, optimizer, tmp: Path) -> None:
    if _is_fsdp(accelerator):
        from accelerate.utils import save_fsdp_optimizer

        save_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(tmp / "optimizer"))
    elif accelerator.is_main_process:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")


def save_checkpoint(accelerator, model, optimizer, scheduler, *, out: Path, state: TrainerState, tokenizer, keep_last: int) -> Path:
    """Write checkpoint ``state.step`` atomically (all ranks call this), then prune old ones."""
    if not weights_finite(accelerator, model):
        raise CocomixError(f"weights are not finite at step {state.step}; no checkpoint written (the last good one is kept)")
    final = step_dir(out, state.step)
    tmp = final.with_name(f".{final.name}.tmp")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _write_errors(tmp, state.step, out):
        _save_model(accelerator, model, tmp, tokenizer)
        _save_optimizer(accelerator, model, optimizer, tmp)
        torch.save(_rng_state(), tmp / "rng" / f"rank-{accelerator.process_index:05d}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        with _write_errors(tmp, state.step, out):
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            atomic_write_json(tmp / STATE_FILE, {"step": state.step, "data": state.data.to_dict(), "world_size": accelerator.num_processes})
            publish_step_dir(tmp, final)
        prune(out, keep_last)
    accelerator.wait_for_everyone()
    return final


@contextmanager
def _write_errors(tmp: Path, step: int, out: Path):
    """A failed write (disk full: torch.save raises RuntimeError, safetensors its own error, the rest
    OSError) is one line; the half-written folder is removed, the last complete checkpoint kept."""
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as err:  # what a full disk raises in torch.save / save_pretrained
        shutil.rmtree(tmp, ignore_errors=True)
        text = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise CocomixError(f"could not write checkpoint step {step} in {Path(out) / CKPT_DIR} (disk full? {type(err).__name__}: "
                           f"{text}); the last complete checkpoint is kept: free space and re-run with --resume") from None


def prune(out: Path, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints, and stale temp folders."""
    for old in complete_checkpoints(out)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in (Path(out) / CKPT_DIR).glob(".step-*.tmp"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)


def load_training_state(accelerator, model, optimizer, scheduler, ckpt: Path) -> TrainerState:
    """Restore optimizer, scheduler and this rank's RNG (the model itself is loaded with from_pretrained)."""
    ckpt = Path(ckpt)
    if _is_fsdp(accelerator):
        from accelerate.utils import load_fsdp_optimizer

        load_fsdp_optimizer(accelerator.state.fsdp_plugin, accelerator, optimizer, model, str(ckpt / "optimizer"))
    else:
        optimizer.load_state_dict(torch_load(ckpt / "optimizer.pt", "optimizer state", map_location=accelerator.device))
    scheduler.load_state_dict(torch_load(ckpt / "scheduler.pt", "scheduler state"))
    rng = ckpt / "rng" / f"rank-{accelerator.process_index:05d}.pt"
    if rng.exists():
        _set_rng_state(torch_load(rng, "RNG state", legacy_numpy=True))
    else:
        log.warning("checkpoint %s has no RNG state for rank %d (world size changed); keeping a fresh one", ckpt, accelerator.process_index)
    return read_trainer_state(ckpt)
