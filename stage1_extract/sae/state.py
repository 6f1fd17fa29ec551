"""The resume state of ``cocomix sae train``: what is saved, what a re-run must match, how a run is rebuilt.

Every ``--save-every`` steps the whole training state (weights, Adam, dead counters, data
position with the shuffle buffer's rows, generator) goes atomically to ``<out>/.resume/``; a
re-run with the same flags continues from it to the same bytes (CPU).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from cocomix.core.configs import flag_name
from cocomix.core.errors import CocomixError
from cocomix.stage1_extract.config import SaeTrainConfig
from cocomix.stage1_extract.sae.model import TopKSAE
from cocomix.stage1_extract.sae.recipe import ADAM_EPS, DeadTracker, init_sae
from cocomix.stage1_extract.sae.stream import (
    ShuffledBatches,
    WindowBatches,
    collect,
    normalized_activations,
    shuffled_batches,
    window_batches,
)
from cocomix.storage.files import atomic_replace, atomic_write_json, complete_step_dirs, publish_step_dir, step_dir_name
from cocomix.storage.identity import content_identity, describe_diff
from cocomix.storage.safe_load import torch_load

log = logging.getLogger(__name__)


INIT_SAMPLE = 32768  # activations for b_pre and the MSE scale, as OpenAI's init_from_data_


# ---------------------------------------------------------------- resume state
#
#   <out>/.resume/step-0001000/
#     state.pt    SAE, Adam, dead-latent counters, MSE scale, the data position (generator state,
#                 window order and position, shuffle buffer rows, unreplayed init-sample rows)
#     run.json    step and the run's identity (flags, teacher, tokens) a re-run must match
#     complete    written last; the folder is filled as .step-NNNNNNN.tmp and then renamed

RESUME_DIR = ".resume"
STATE_FILE = "state.pt"
RUN_FILE = "run.json"
NOT_COMPARED = ("out", "overwrite", "save_every")  #: flags that do not change what is computed


def run_identity(cfg: SaeTrainConfig, inputs) -> dict:
    """What a saved state must have been trained with for a re-run to continue it."""
    flags = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in NOT_COMPARED}
    tokens = content_identity(inputs.store.provenance())
    return {"flags": flags, "teacher": dict(inputs.teacher.info), "tokens": tokens}


def saved_states(out: Path) -> list[Path]:
    """Complete resume states, oldest first."""
    return complete_step_dirs(Path(out) / RESUME_DIR)


def open_resume(out: Path, cfg: SaeTrainConfig, identity: dict) -> Path | None:
    """The newest state to continue from, or None; refuses (one line) a state of a run with other flags."""
    states = saved_states(out)
    if not states:
        shutil.rmtree(Path(out) / RESUME_DIR, ignore_errors=True)  # only unfinished temp folders: start over
        return None
    saved = json.loads((states[-1] / RUN_FILE).read_text())["identity"]
    differs = describe_diff(saved, identity, names=_shown)
    if not differs:
        return states[-1]
    if cfg.overwrite:
        log.warning("--out %s: discarding an unfinished run made with other settings (%s)", out, differs)
        shutil.rmtree(Path(out) / RESUME_DIR)
        return None
    raise CocomixError(f"--out {out} holds an unfinished sae train run with {differs}; re-run with the same flags "
                       "to continue it, or pass --overwrite to start over")


def _shown(path: str) -> str | None:
    return flag_name(path.split(".", 1)[1]) if path.startswith("flags.") else None


def save_state(out: Path, run: "TrainRun") -> Path:
    """Write the state after ``run.step`` steps atomically, then drop older ones."""
    base = Path(out) / RESUME_DIR
    final = base / step_dir_name(run.step)
    tmp = base / f".{final.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(run.state_dict(), tmp / f".{STATE_FILE}.tmp")
    atomic_replace(tmp / f".{STATE_FILE}.tmp", tmp / STATE_FILE)
    atomic_write_json(tmp / RUN_FILE, {"step": run.step, "identity": run.identity})
    publish_step_dir(tmp, final)
    for old in base.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    log.info("sae train: resumable state saved at step %d", run.step)
    return final


@dataclass
class TrainRun:
    """Everything that changes while training; ``state_dict`` is what a re-run needs to continue exactly."""

    sae: TopKSAE
    opt: torch.optim.Optimizer
    tracker: DeadTracker
    mse_scale: float
    gen: torch.Generator  #: shared by window order, shuffle buffer (and init)
    windows: WindowBatches
    stream: ShuffledBatches
    batches: "Replay"
    identity: dict
    step: int = 0

    def state_dict(self) -> dict:
        return {
            "step": self.step, "mse_scale": self.mse_scale,
            "sae": {k: v.detach().clone() for k, v in self.sae.state_dict().items()},
            "adam": self.opt.state_dict(),
            "dead": {"since": self.tracker.since_L.clone(), "seen": self.tracker.seen},
            "generator": self.gen.get_state(),
            "windows": self.windows.state_dict(), "buffer": self.stream.state_dict(),
            "head": self.batches.head.clone(),
        }


def build_run(cfg: SaeTrainConfig, inputs, identity: dict, saved: Path | None) -> TrainRun:
    """A fresh run (init from a sample of the stream) or one continued from ``saved``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    windows = window_batches(inputs.train, cfg.window, cfg.teacher_batch, gen)
    stream = shuffled_batches(normalized_activations(inputs.teacher, cfg.layer, windows), cfg.batch_tokens,
                              cfg.buffer_tokens, gen)
    if saved is None:
        sample_ND = collect(stream, min(INIT_SAMPLE, max(cfg.batch_tokens, cfg.train_tokens)))
        sae = init_sae(sample_ND, cfg.latents, cfg.k, gen)
        mse_scale = 1.0 / (sample_ND - sample_ND.mean(0)).pow(2).mean().item()
        tracker = DeadTracker(cfg.latents, sample_ND.device)
        opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, eps=ADAM_EPS)
        return TrainRun(sae, opt, tracker, mse_scale, gen, windows, stream, Replay(sample_ND, cfg.batch_tokens, stream), identity)
    device = inputs.teacher.device
    state = torch_load(saved / STATE_FILE, "sae train resume state")
    sae = TopKSAE(state["sae"]["b_pre"].shape[0], cfg.latents, cfg.k, normalize=True).to(device)
    sae.load_state_dict(state["sae"])
    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, eps=ADAM_EPS)
    opt.load_state_dict(state["adam"])
    tracker = DeadTracker(cfg.latents, device)
    tracker.since_L.copy_(state["dead"]["since"])
    tracker.seen = int(state["dead"]["seen"])
    gen.set_state(state["generator"].cpu())
    windows.load_state_dict(state["windows"])
    buffer = state["buffer"]  # activations live where the teacher computes them
    stream.load_state_dict({**buffer, "pool": [x.to(device) for x in buffer["pool"]],
                            "ready": None if buffer["ready"] is None else buffer["ready"].to(device)})
    log.info("sae train: continuing from %s (step %d)", saved, state["step"])
    return TrainRun(sae, opt, tracker, float(state["mse_scale"]), gen, windows, stream,
                    Replay(state["head"].to(device), cfg.batch_tokens, stream), identity, int(state["step"]))


class Replay:
    """The init sample is trained on first (it was taken from the stream), in whole batches, then the rest."""

    def __init__(self, sample_ND: torch.Tensor, batch: int, rest) -> None:
        self.head, self.batch, self.rest = sample_ND[: len(sample_ND) // batch * batch], batch, rest

    def __iter__(self) -> "Replay":
        return self

    def __next__(self) -> torch.Tensor:
        if len(self.head):
            x_ND, self.head = self.head[: self.batch], self.head[self.batch:]
            return x_ND
        return next(self.rest)
