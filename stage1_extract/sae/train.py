"""``cocomix sae train``: a TopK SAE on a teacher's residual stream (Gao et al. 2024).

Table of contents of :func:`run_sae_train`: prepare ``--out`` -> open teacher and tokens -> build
the run (fresh from a data sample, or from the saved state: :mod:`.state`) -> train
(:mod:`.recipe`), saving a resumable state every ``--save-every`` steps -> evaluate on held-out
activations -> save the SAE -> drop the resume state.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from cocomix.core.errors import CocomixError
from cocomix.stage1_extract.config import SaeTrainConfig
from cocomix.stage1_extract.sae.io import COCOMIX_WEIGHTS, save_sae
from cocomix.stage1_extract.sae.progress import SaeTrainProgress, print_summary
from cocomix.stage1_extract.sae.recipe import evaluate, train_step
from cocomix.stage1_extract.sae.setup import open_inputs
from cocomix.stage1_extract.sae.state import RESUME_DIR, TrainRun, build_run, open_resume, run_identity, save_state
from cocomix.stage1_extract.sae.stream import collect, normalized_activations
from cocomix.storage.files import sha256_file


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
