"""``cocomix sae train``: a TopK SAE on a teacher's residual stream (Gao et al. 2024).

The recipe of openai/sparse_autoencoder ``train.py`` (docs/ARCHITECTURE.md, SAE training):

1. inputs: unbiased-LayerNorm'd output of block ``layer``, streamed from the token store;
2. init: ``b_pre`` = geometric median of a sample, decoder = encoderᵀ with unit-norm
   columns, encoder rescaled so random unit inputs reconstruct to norm ≈ 1;
3. loss: MSE / variance of the sample + ``auxk_coef`` · normalised MSE of the AuxK
   reconstruction of the residual ``x - recons.detach()`` from the top ``auxk``
   pre-activations among latents dead (not fired > 1e-3) for ``dead_tokens`` tokens;
   the AuxK decode leaves out ``b_pre`` (the residual has none: sparsify PR #134);
4. step: project out the gradient component parallel to each decoder column, Adam
   (eps 6.25e-10), renormalise decoder columns to unit norm.

Every ``--save-every`` steps the whole training state (weights, Adam, dead counters, data
position with the shuffle buffer's rows, generator) goes atomically to ``<out>/.resume/``; a
re-run with the same flags continues from it to the same bytes (CPU) and removes it at the end.

Shape legend: ``N`` activations in a batch, ``D`` width, ``L`` latents, ``K`` TopK k.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from cocomix.pipeline.configs import flag_name
from cocomix.pipeline.errors import CocomixError
from cocomix.stage1_extract.config import SaeTrainConfig
from cocomix.stage1_extract.sae import TopKSAE
from cocomix.stage1_extract.sae_grad import gathered_pre_activations
from cocomix.stage1_extract.sae_io import COCOMIX_WEIGHTS, save_sae
from cocomix.stage1_extract.sae_progress import SaeTrainProgress, print_summary
from cocomix.stage1_extract.sae_setup import open_inputs
from cocomix.stage1_extract.sae_stream import (ShuffledBatches, WindowBatches, collect, normalized_activations,
                                               shuffled_batches, window_batches)
from cocomix.storage.files import (atomic_replace, atomic_write_json, complete_step_dirs, publish_step_dir, sha256_file,
                                  step_dir_name)
from cocomix.storage.safe_load import torch_load
from cocomix.storage.token_store import content_identity

log = logging.getLogger(__name__)

FIRE_THRESHOLD = 1e-3  # a latent "fires" when its activation exceeds this (OpenAI train.py)
ADAM_EPS = 6.25e-10
INIT_SAMPLE = 32768  # activations for b_pre and the MSE scale, as OpenAI's init_from_data_


@dataclass
class SaeTrainResult:
    """What ``run_sae_train`` produced; the metrics are also in ``<out>/cfg.json``."""

    out: Path  #: the cocomix SAE folder (load with ``load_sae``)
    fvu: float  #: fraction of variance unexplained on held-out activations (normalised space)
    l0: float  #: mean number of non-zero latents per token on the same activations
    dead_fraction: float  #: latents that did not fire during the last ``dead_tokens`` training tokens (or the whole run)
    steps: int
    tokens: int  #: training activations seen
    seconds: float
    sha256: str  #: of ``sae.safetensors``


class StepStats(NamedTuple):
    loss: float
    fvu: float  #: this batch's FVU (batch-centred)
    auxk_loss: float
    l0: float


class EvalStats(NamedTuple):
    fvu: float
    l0: float
    tokens: int


class DeadTracker:
    """Tokens since each latent last fired (OpenAI's ``stats_last_nonzero``, counted in tokens)."""

    def __init__(self, n_latents: int, device: torch.device) -> None:
        self.since_L = torch.zeros(n_latents, dtype=torch.long, device=device)
        self.seen = 0

    def update(self, top_idx_NK: torch.Tensor, top_val_NK: torch.Tensor) -> None:
        fired_L = torch.zeros_like(self.since_L, dtype=torch.bool)
        fired_L[top_idx_NK[top_val_NK > FIRE_THRESHOLD]] = True
        self.since_L += len(top_idx_NK)
        self.since_L[fired_L] = 0
        self.seen += len(top_idx_NK)

    def dead(self, dead_tokens: int) -> torch.Tensor:
        return self.since_L > dead_tokens

    def dead_fraction(self, dead_tokens: int) -> float:
        """Share of latents silent for ``dead_tokens`` tokens, or for the whole run when it was shorter."""
        return (self.since_L >= min(dead_tokens, self.seen)).float().mean().item()


def geometric_median(x_ND: torch.Tensor, iters: int = 50, tol: float = 1e-6) -> torch.Tensor:
    """Weiszfeld's algorithm (OpenAI initialises ``pre_bias`` with the geometric median)."""
    x_ND = x_ND.double()
    median_D = x_ND.mean(0)
    for _ in range(iters):
        weights_N = 1.0 / (x_ND - median_D).norm(dim=-1).clamp_min(1e-8)
        new_D = (weights_N[:, None] * x_ND).sum(0) / weights_N.sum()
        if (new_D - median_D).norm() <= tol * median_D.norm().clamp_min(1.0):
            return new_D.float()
        median_D = new_D
    return median_D.float()


def init_sae(sample_ND: torch.Tensor, n_latents: int, k: int, generator: torch.Generator) -> TopKSAE:
    """Tied unit-norm init from a data sample (OpenAI ``FastAutoencoder.__init__`` + ``init_from_data_``)."""
    d_in = sample_ND.shape[1]
    sae = TopKSAE(d_in, n_latents, k, normalize=True).to(sample_ND.device)
    bound = 1.0 / math.sqrt(d_in)  # nn.Linear's default init
    with torch.no_grad():
        sae.W_enc.copy_(torch.empty(n_latents, d_in).uniform_(-bound, bound, generator=generator))
        sae.W_dec.copy_(sae.W_enc.T)
        normalize_decoder_(sae)
        sae.b_pre.copy_(geometric_median(sample_ND))
        unit_ND = torch.randn(256, d_in, generator=generator).to(sample_ND.device)
        unit_ND = unit_ND / unit_ND.norm(dim=-1, keepdim=True) + sae.b_pre
        enc = sae.encode_normalized(unit_ND)
        recons_norm = (sae.decode_normalized(enc.top_idx, enc.top_val) - sae.b_pre).norm(dim=-1).mean()
        sae.W_enc /= recons_norm.clamp_min(1e-8)
    return sae


def normalize_decoder_(sae: TopKSAE) -> None:
    with torch.no_grad():
        sae.W_dec /= sae.W_dec.norm(dim=0, keepdim=True).clamp_min(1e-12)


def project_decoder_grad_(sae: TopKSAE) -> None:
    """Remove the gradient component parallel to each (unit) decoder column: the norm stays put."""
    grad_DL, w_DL = sae.W_dec.grad, sae.W_dec.detach()
    grad_DL -= (w_DL * grad_DL).sum(0, keepdim=True) * w_DL


def normalized_mse(recons_ND: torch.Tensor, target_ND: torch.Tensor) -> torch.Tensor:
    """MSE over the variance of ``target`` around its batch mean (= FVU of the batch)."""
    return (recons_ND - target_ND).pow(2).sum() / (target_ND - target_ND.mean(0)).pow(2).sum()


class Losses(NamedTuple):
    """Output of :func:`sae_losses` (tensors keep their graph for ``backward``)."""

    loss: torch.Tensor  #: main + auxk_coef * auxk
    main: torch.Tensor  #: MSE / variance of the init sample
    auxk: torch.Tensor  #: normalised MSE of the AuxK reconstruction of the residual (0 when no latent is dead)
    recons_ND: torch.Tensor
    top_val_NK: torch.Tensor


def auxk_indices(pre_NL: torch.Tensor, dead_L: torch.Tensor, auxk: int) -> torch.Tensor:
    """``[N, A]``: the top pre-activations among dead latents, ``A = min(auxk, dead)`` (may be 0)."""
    n_aux = min(auxk, int(dead_L.sum()))
    if n_aux == 0:
        return pre_NL.new_zeros(len(pre_NL), 0, dtype=torch.long)
    return pre_NL.masked_fill(~dead_L, -math.inf).topk(n_aux, dim=-1).indices


def sae_losses(sae: TopKSAE, x_ND: torch.Tensor, tracker: DeadTracker, cfg: SaeTrainConfig, mse_scale: float) -> Losses:
    """Forward of one step: dense ``pre`` without autograd, then gradients through the selected latents only."""
    with torch.no_grad():
        pre_NL = sae.pre_activations(x_ND)
        top_idx_NK = pre_NL.topk(sae.k, dim=-1).indices
        tracker.update(top_idx_NK, pre_NL.gather(-1, top_idx_NK))  # before AuxK, as OpenAI
        aux_idx_NA = auxk_indices(pre_NL, tracker.dead(cfg.dead_tokens), cfg.auxk if cfg.auxk_coef > 0 else 0)
    vals_NS = torch.relu(gathered_pre_activations(sae, x_ND, pre_NL, torch.cat([top_idx_NK, aux_idx_NA], -1)))
    top_val_NK, aux_val_NA = vals_NS.split([sae.k, aux_idx_NA.shape[1]], dim=-1)
    recons_ND = sae.decode_normalized(top_idx_NK, top_val_NK)
    main = (recons_ND - x_ND).pow(2).mean() * mse_scale
    aux = auxk_loss(sae, x_ND, recons_ND, aux_idx_NA, aux_val_NA)
    return Losses(main + cfg.auxk_coef * aux, main, aux, recons_ND, top_val_NK)


def auxk_loss(sae: TopKSAE, x_ND, recons_ND, aux_idx_NA, aux_val_NA) -> torch.Tensor:
    """Normalised MSE of the AuxK latents reconstructing the main residual; their decode has no ``b_pre``."""
    if aux_idx_NA.shape[1] == 0:
        return x_ND.new_zeros(())
    aux_recons_ND = sae.decode_normalized(aux_idx_NA, aux_val_NA) - sae.b_pre
    return normalized_mse(aux_recons_ND, x_ND - recons_ND.detach()).nan_to_num(0.0)


def train_step(sae: TopKSAE, opt, x_ND: torch.Tensor, tracker: DeadTracker, cfg: SaeTrainConfig,
               mse_scale: float) -> StepStats:
    """One Adam step on a batch of normalised activations."""
    losses = sae_losses(sae, x_ND, tracker, cfg, mse_scale)
    if not torch.isfinite(losses.loss):
        raise CocomixError(f"non-finite SAE loss after {tracker.seen:,} tokens; lower --lr (now {cfg.lr})")
    opt.zero_grad(set_to_none=True)
    losses.loss.backward()
    project_decoder_grad_(sae)
    opt.step()
    normalize_decoder_(sae)
    with torch.no_grad():
        fvu = normalized_mse(losses.recons_ND, x_ND).item()
        l0 = (losses.top_val_NK > 0).float().sum(-1).mean().item()
    return StepStats(losses.loss.item(), fvu, losses.auxk.item(), l0)


@torch.no_grad()
def evaluate(sae: TopKSAE, x_ND: torch.Tensor, batch: int = 4096) -> EvalStats:
    """FVU (variance around the mean of all of ``x``) and L0 of the SAE on held-out activations."""
    err, l0 = 0.0, 0.0
    for chunk_ND in x_ND.split(batch):
        enc = sae.encode_normalized(chunk_ND)
        err += (sae.decode_normalized(enc.top_idx, enc.top_val) - chunk_ND).double().pow(2).sum().item()
        l0 += (enc.top_val > 0).sum().item()
    var = (x_ND.double() - x_ND.double().mean(0)).pow(2).sum().item()
    return EvalStats(err / max(var, 1e-30), l0 / len(x_ND), len(x_ND))


def prepare_out(cfg: SaeTrainConfig) -> Path:
    """``--out`` must be new, empty or hold only our own files next to a ``.resume`` state; with
    ``--overwrite`` only our own two files are replaced (``.resume`` is judged by :func:`open_resume`)."""
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise CocomixError(f"--out {out} is a file; pass a folder")
    entries = list(out.iterdir()) if out.exists() else []
    resumable = (out / RESUME_DIR).is_dir() and all(_is_ours(p) for p in entries)
    if entries and not cfg.overwrite and not resumable:
        raise CocomixError(f"--out {out} is not empty; pass --overwrite to replace the SAE in it, or another folder")
    out.mkdir(parents=True, exist_ok=True)
    for name in ("cfg.json", COCOMIX_WEIGHTS):
        (out / name).unlink(missing_ok=True)  # never a stale cfg.json beside new weights
    return out


def _is_ours(path: Path) -> bool:
    """What ``sae train`` itself writes into ``--out`` (the SAE, its temp files, the resume state)."""
    name = path.name
    return name in (RESUME_DIR, "cfg.json", COCOMIX_WEIGHTS) or (
        name.startswith((f".{COCOMIX_WEIGHTS}", ".cfg.json")) and name.endswith(".tmp"))


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
    differs = _first_difference(saved, identity)
    if differs is None:
        return states[-1]
    if cfg.overwrite:
        log.warning("--out %s: discarding an unfinished run made with other settings (%s)", out, differs)
        shutil.rmtree(Path(out) / RESUME_DIR)
        return None
    raise CocomixError(f"--out {out} holds an unfinished sae train run with {differs}; re-run with the same flags "
                       "to continue it, or pass --overwrite to start over")


def _first_difference(saved: dict, now: dict) -> str | None:
    now = json.loads(json.dumps(now))  # same JSON types as the saved copy
    for name, value in now["flags"].items():
        if saved["flags"].get(name, "<unset>") != value:
            return f"{flag_name(name)} {saved['flags'].get(name, '<unset>')} (now {value})"
    if saved["teacher"] != now["teacher"]:
        return f"another --teacher (weights {_short(saved['teacher'])}, now {_short(now['teacher'])})"
    if saved["tokens"] != now["tokens"]:
        return "another --tokens store (different tokenizer or corpus)"
    return None


def _short(info: dict) -> str:
    return str(info.get("sha256") or info.get("revision"))[:12]


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


def run_sae_train(cfg: SaeTrainConfig) -> SaeTrainResult:
    """Load teacher and tokens → init from a sample (or load the saved state) → train on streamed batches
    (saving a resumable state every ``save_every`` steps) → evaluate → save."""
    t0 = time.monotonic()
    out = prepare_out(cfg)
    inputs = open_inputs(cfg)
    identity = run_identity(cfg, inputs)
    run = build_run(cfg, inputs, identity, open_resume(out, cfg, identity))
    steps = max(1, math.ceil(cfg.train_tokens / cfg.batch_tokens))
    train_loop(run, cfg, steps, out)
    sae, tracker = run.sae, run.tracker
    held_out = evaluate(sae, collect(normalized_activations(inputs.teacher, cfg.layer, inputs.eval_windows()), cfg.eval_tokens))
    result = SaeTrainResult(out, held_out.fvu, held_out.l0, tracker.dead_fraction(cfg.dead_tokens), steps,
                            tracker.seen, time.monotonic() - t0, "")
    save_sae(sae.cpu(), out, inputs.meta(cfg, result, held_out))
    shutil.rmtree(out / RESUME_DIR, ignore_errors=True)  # after the SAE: a kill in between only retrains
    result.sha256 = sha256_file(out / COCOMIX_WEIGHTS)
    print_summary(result)
    return result


def train_loop(run: TrainRun, cfg: SaeTrainConfig, steps: int, out: Path | None = None) -> None:
    """Steps ``run.step + 1 .. steps``; a state is saved after every ``cfg.save_every``-th (not the last)."""
    with SaeTrainProgress(steps * cfg.batch_tokens, done_tokens=run.step * cfg.batch_tokens) as progress:
        while run.step < steps:
            x_ND = next(run.batches, None)
            if x_ND is None:
                break
            stats = train_step(run.sae, run.opt, x_ND, run.tracker, cfg, run.mse_scale)
            run.step += 1
            progress.advance(len(x_ND), stats, run.tracker.dead_fraction(cfg.dead_tokens))
            if out is not None and cfg.save_every and run.step % cfg.save_every == 0 and run.step < steps:
                save_state(out, run)


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
