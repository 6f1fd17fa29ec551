"""``cocomix pretrain``: train a CoCoMix student or its NTP baseline with HuggingFace Accelerate.

One process, or ``accelerate launch --config_file configs/accelerate/{ddp,fsdp}.yaml -m
cocomix.pipeline.cli pretrain ...`` (on CPU: ``torchrun --nproc_per_node N -m cocomix.pipeline.cli
pretrain ...``, gloo). The loop reads like its table of contents::

    run_pretrain: setup (see .run_setup) -> train -> export final/
    train:        for each step: train_step; log; maybe evaluate; maybe checkpoint

Losses of a step are exactly those of the global batch, whatever the process count:
the NTP and KD terms are means over equal-sized windows, and each micro-batch's concept term
is weighted by its share of the global batch's valid label slots (an all-reduced count).
What a micro-batch's loss is depends on the method (:mod:`.methods`); the loop does not.
"""
from __future__ import annotations

import logging
import math
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import torch

from cocomix.core.errors import CocomixError
from cocomix.stage2_pretrain import checkpoint as ckpt_io
from cocomix.stage2_pretrain import rundir
from cocomix.stage2_pretrain.config import PretrainConfig
from cocomix.stage2_pretrain.data import StepBatch, val_starts
from cocomix.stage2_pretrain.evaluate import PplResult, evaluate_split
from cocomix.stage2_pretrain.methods import micro_loss
from cocomix.stage2_pretrain.optim import CLIP
from cocomix.stage2_pretrain.prefetch import prefetch
from cocomix.stage2_pretrain.run_setup import Run, setup

log = logging.getLogger(__name__)


@dataclass
class PretrainResult:
    """What a finished ``run_pretrain`` produced."""

    out: Path
    final: Path                #: plain HF folder of the last model
    checkpoint: Path           #: newest complete checkpoint
    steps: int                 #: optimizer steps done (== max_steps)
    params_total: int
    params_active: int
    last_loss: float | None    #: mean training loss of the last log window (None if resumed at the end)
    val_ppl: float | None      #: last validation perplexity (None if never evaluated)


class StepValues(NamedTuple):
    loss: float
    ntp_loss: float
    concept_loss: float | None
    grad_norm: float
    kd_loss: float | None = None


# ----------------------------------------------------------------------------- the loop
def global_valid_slots(acc, batch: StepBatch, ignore_id: int) -> torch.Tensor:
    """Valid concept-label slots in the whole global batch (all ranks)."""
    local = sum(int((mb.concept_ids != ignore_id).sum()) for mb in batch.micro_batches)
    return acc.reduce(torch.tensor([float(local)], device=acc.device), reduction="sum")


def concept_shares(run: Run, batch: StepBatch) -> list:
    """Per micro-batch, the factor that turns its mean concept loss into its share of the global batch's:
    label slots differ in validity (ignore_id), so a micro-batch counts by its valid slots. 1 for the
    other losses (means over equal-sized windows)."""
    if batch.micro_batches[0].concept_ids is None:
        return [1.0] * len(batch.micro_batches)
    ignore_id, n_micro = run.inputs.targets.ignore_id, run.plan.accum * run.plan.world
    total_valid = global_valid_slots(run.acc, batch, ignore_id).clamp(min=1)
    return [((mb.concept_ids != ignore_id).sum().to(run.acc.device) * n_micro / total_valid).squeeze()
            for mb in batch.micro_batches]


def forward_backward(run: Run, batch: StepBatch) -> dict:
    """Accumulate gradients of one global batch; returns this rank's mean loss parts (``ntp_loss``, ...)."""
    acc, model = run.acc, run.model
    sums: dict = {}
    for mb, share in zip(batch.micro_batches, concept_shares(run, batch)):
        with acc.accumulate(model):
            out = micro_loss(run.spec, model, mb, acc.device, share)
            acc.backward(out.loss)
        for name, value in out.parts.items():
            sums[name] = sums.get(name, 0.0) + value.detach()
    return {name: value / run.plan.accum for name, value in sums.items()}


def train_step(run: Run, step: int, batch: StepBatch) -> StepValues:
    """One optimizer step on one global batch (``step`` is 0-based); raises before stepping on NaN/inf."""
    acc = run.acc
    parts = forward_backward(run, batch)
    names = sorted(parts)
    reduced = acc.reduce(torch.stack([parts[n] for n in names]), reduction="mean").tolist()
    values = dict(zip(names, reduced))
    grad_norm = float(acc.clip_grad_norm_(run.model.parameters(), CLIP))
    loss_v = float(run.spec.combine(values))
    if not (math.isfinite(loss_v) and math.isfinite(grad_norm)):
        raise CocomixError(
            f"non-finite {'loss' if not math.isfinite(loss_v) else 'gradient norm'} at step {step + 1} "
            f"(loss {loss_v}, grad norm {grad_norm}); weights not updated, last good checkpoint kept in "
            f"{run.out / ckpt_io.CKPT_DIR}; lower the learning rate: re-run the command with --resume --override-lr "
            f"--lr {run.plan.lr / 2:.3g}"
        )
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepValues(loss_v, values["ntp_loss"], values.get("concept_loss"), grad_norm, values.get("kd_loss"))


def maybe_evaluate(run: Run, step: int, force: bool) -> PplResult | None:
    cfg, acc = run.cfg, run.acc
    if run.val is None or not (step % cfg.eval_every == 0 or force):
        return None
    spans = val_starts(len(run.val), run.plan.context, cfg.eval_windows)
    result = evaluate_split(run.model, run.val, spans, batch_size=run.plan.micro_batch, device=acc.device,
                            rank=acc.process_index, world=acc.num_processes, autocast=acc.autocast,
                            reduce=lambda t: acc.reduce(t, reduction="sum"))
    run.runlog.eval(step, result)
    return result


def maybe_save(run: Run, state: ckpt_io.TrainerState, force: bool) -> Path | None:
    every = run.cfg.save_every
    if not (force or (every and state.step % every == 0)):
        return None
    return ckpt_io.save_checkpoint(run.acc, run.model, run.optimizer, run.scheduler, out=run.out, state=state,
                                   tokenizer=run.tokenizer, keep_last=run.cfg.keep_last)


@contextmanager
def interrupts_between_steps() -> Iterator[Callable[[], bool]]:
    """Ctrl-C stops the run between steps: the first one is noted and the loop raises KeyboardInterrupt
    before its next step, so the interrupt is never lost (raised inside a finalizer, it would be printed
    as "Exception ignored" and the run would go on) nor cuts a checkpoint short; a second Ctrl-C
    interrupts at once. Outside the main thread (where handlers cannot be set) nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda: False
        return
    noted: list[int] = []

    def note(signum, frame) -> None:
        if noted:
            raise KeyboardInterrupt
        noted.append(signum)

    previous = signal.signal(signal.SIGINT, note)
    try:
        yield lambda: bool(noted)
    finally:
        signal.signal(signal.SIGINT, previous)


def train(run: Run, state: ckpt_io.TrainerState) -> tuple[ckpt_io.TrainerState, dict | None, PplResult | None]:
    """Steps from ``state`` to ``max_steps``: step, log, maybe evaluate, maybe checkpoint."""
    plan, record, ppl = run.plan, None, None
    tokens_per_step = plan.global_windows * plan.context
    run.model.train()
    batches = prefetch(run.stream.steps(state.data), depth=2)
    with interrupts_between_steps() as interrupted:
        try:
            while state.step < plan.max_steps:
                if interrupted():
                    raise KeyboardInterrupt
                batch = next(batches)
                lr = run.scheduler.get_last_lr()[0]
                values = train_step(run, state.step, batch)
                state = ckpt_io.TrainerState(state.step + 1, batch.state)
                logged = {k: v for k, v in values._asdict().items() if v is not None}
                record = run.runlog.train_step(state.step, logged, tokens_per_step, lr) or record
                last = state.step == plan.max_steps
                ppl = maybe_evaluate(run, state.step, force=last) or ppl
                maybe_save(run, state, force=last)
        finally:
            batches.close()
    return state, record, ppl


def run_pretrain(cfg: PretrainConfig) -> PretrainResult:
    """Train (or resume) a run to ``max_steps``, export ``<out>/final/`` and return what was made."""
    run, state = setup(cfg)
    start = state.step
    state, record, ppl = train(run, state)
    newest = ckpt_io.latest_checkpoint(run.out)
    if newest is None or ckpt_io.read_trainer_state(newest).step != state.step:
        newest = maybe_save(run, state, force=True)
    final = rundir.export_final(newest, run.out) if run.acc.is_main_process else run.out / rundir.FINAL
    run.acc.wait_for_everyone()
    run.acc.end_training()
    counts = run.record["params"]
    if run.acc.is_main_process:
        log.info("done: steps %d -> %d, final model in %s", start, state.step, final)
    return PretrainResult(run.out, final, newest, state.step, counts["total"], counts["active"],
                          record["loss"] if record else None, ppl.ppl if ppl else None)
