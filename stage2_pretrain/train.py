"""``cocomix pretrain``: train a CoCoMix student or its NTP baseline with HuggingFace Accelerate.

One process, or ``accelerate launch --config_file configs/accelerate/{ddp,fsdp}.yaml -m
cocomix.pipeline.cli pretrain ...``. The loop reads like its table of contents::

    run_pretrain: set up (inputs, plan, run folder, model, optimizer; resume) -> train -> export final/
    train:        for each step: train_step; log; maybe evaluate; maybe checkpoint

Losses of a step are exactly those of the global batch, whatever the process count:
the NTP term is a mean over equal-sized windows, and each micro-batch's concept term is
weighted by its share of the global batch's valid label slots (an all-reduced count).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from cocomix.pipeline.errors import CocomixError, ConfigError
from cocomix.pipeline.workspace import run_dir, workspace_root

from . import checkpoint as ckpt_io
from . import rundir
from .config import PretrainConfig
from .data import DataState, StepBatch, TargetSource, TokenSource, TrainStream, val_starts
from .evaluate import PplResult, evaluate_split
from .inputs import TrainInputs, check_model_matches_targets, open_inputs, spot_check_alignment
from .metrics import RunLog, check_tracker, truncate_metrics
from .optim import CLIP, make_optimizer, make_scheduler
from .plan import RunPlan, make_plan
from .presets import Preset, build_model, count_params, get_preset, match_ntp_width
from .prefetch import prefetch

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


class Run(NamedTuple):
    """Everything the loop touches, built once by :func:`setup`."""

    cfg: PretrainConfig
    plan: RunPlan
    out: Path
    acc: object
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object
    stream: TrainStream
    inputs: TrainInputs
    tokenizer: object
    runlog: RunLog
    record: dict               #: what run.json holds
    val: object | None         #: the store's `val` split, None when evaluation is off or impossible


class StepValues(NamedTuple):
    loss: float
    ntp_loss: float
    concept_loss: float | None
    grad_norm: float


# ----------------------------------------------------------------------------- set-up
def make_accelerator(cfg: PretrainConfig, accum: int, out: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # A second run in one process (quickstart, tests) must not inherit the first one's
    # accumulation steps or precision from accelerate's process-wide singletons.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=accum,
        mixed_precision="bf16" if torch.cuda.is_available() else "no",
        log_with=check_tracker(cfg.tracker),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "trackers")),
    )


def world_size() -> int:
    from accelerate import PartialState

    # cpu=True is what makes accelerate use gloo for a CPU-only torchrun/accelerate launch
    return PartialState(cpu=not torch.cuda.is_available()).num_processes


def model_preset(cfg: PretrainConfig, inputs: TrainInputs) -> Preset:
    """The size preset, with --width, or for NTP with --targets the width matching CoCoMix on them."""
    preset = get_preset(cfg.size)
    if cfg.width is not None:
        if cfg.width % preset.n_head:
            raise ConfigError(f"--width {cfg.width} is not a multiple of the {preset.n_head} heads of --size {cfg.size}")
        return dataclasses.replace(preset, **{"ntp_d" if cfg.method == "ntp" else "cocomix_d": cfg.width})
    if cfg.method == "ntp" and inputs.targets is not None:
        return match_ntp_width(preset, inputs.store.vocab_size, inputs.targets.n_latents, inputs.targets.k_attr).preset
    return preset


def new_model(cfg: PretrainConfig, plan: RunPlan, inputs: TrainInputs):
    """A freshly initialised student (seeded, so every rank builds the same weights)."""
    preset, store, reader = model_preset(cfg, inputs), inputs.store, inputs.targets
    torch.manual_seed(cfg.seed)
    if plan.method == "ntp":
        model = build_model("ntp", preset, vocab_size=store.vocab_size, eos_id=store.eos_id)
        model.config.cocomix_tokens = store.provenance()
        return model
    model = build_model("cocomix", preset, vocab_size=store.vocab_size, n_latents=reader.n_latents,
                        k_attr=reader.k_attr, ignore_id=reader.ignore_id, eos_id=store.eos_id)
    model.config.lam = cfg.lam
    model.config.concept_provenance = {**reader.meta, "targets_path": str(inputs.targets_path)}
    return model


def resumed_model(ckpt: Path, inputs: TrainInputs, lam: float):
    from .evaluate import load_checkpoint_model

    model = load_checkpoint_model(ckpt)
    if getattr(model.config, "model_type", "") == "cocomix":
        check_model_matches_targets(model.config, inputs.targets, inputs.targets_path, f"checkpoint {ckpt}")
        model.config.lam = lam
    return model


def prepare_for_accelerate(model) -> None:
    """Small fixes before ``prepare``: name the HF loss (HF 5 cannot map ``GPT2LMHeadModel`` to
    one and warns), and tell FSDP's transformer wrap policy which module is a block."""
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    if not getattr(model, "_no_split_modules", None):
        model._no_split_modules = [type(model.transformer.h[0]).__name__]


def make_stream(cfg: PretrainConfig, plan: RunPlan, inputs: TrainInputs, rank: int) -> TrainStream:
    if plan.method == "ntp":
        source = TokenSource(inputs.store, "train")
    else:
        source = TargetSource(inputs.targets, "train")
    return TrainStream(source, context=plan.context, micro=plan.micro_batch, accum=plan.accum,
                       world=plan.world, rank=rank, seed=cfg.seed)


def run_record(cfg: PretrainConfig, plan: RunPlan, model, inputs: TrainInputs) -> dict:
    counts = count_params(model)
    return {
        "config": asdict(cfg),
        "plan": {**plan.to_dict(), "seed": cfg.seed},
        "params": {"total": counts.total, "active": counts.active},
        "tokens": {"path": str(inputs.tokens_path), "provenance": inputs.store.provenance()},
        "targets": None if inputs.targets is None else {"path": str(inputs.targets_path), "meta": inputs.targets.meta},
        "argv": sys.argv,
    }


def setup(cfg: PretrainConfig) -> tuple[Run, ckpt_io.TrainerState]:
    """Inputs, plan, run folder, model, optimizer and (with --resume) the restored state."""
    out = Path(cfg.out) if cfg.out else run_dir(workspace_root(cfg.workspace), cfg.method, cfg.size)
    plan = make_plan(cfg, world_size())
    acc = make_accelerator(cfg, plan.accum, out)
    inputs = open_inputs(cfg.method, cfg.tokens, cfg.targets, cfg.workspace)
    if cfg.method == "cocomix":
        spot_check_alignment(inputs.targets, inputs.store, seed=cfg.seed)
    if acc.is_main_process:
        rundir.prepare_out(out, resume=cfg.resume, overwrite=cfg.overwrite)
    acc.wait_for_everyone()
    ckpt = ckpt_io.latest_checkpoint(out) if cfg.resume else None
    if cfg.resume and ckpt is None:
        log.warning("--resume: no complete checkpoint in %s yet; starting from step 0", out)
    model = resumed_model(ckpt, inputs, cfg.lam) if ckpt else new_model(cfg, plan, inputs)
    prepare_for_accelerate(model)
    record = run_record(cfg, plan, model, inputs)
    announce(acc, out, record, ckpt)
    optimizer = make_optimizer(model, plan.lr, on_cuda=acc.device.type == "cuda")
    scheduler = make_scheduler(optimizer, plan.schedule)
    model, optimizer = acc.prepare(model, optimizer)
    state = ckpt_io.TrainerState(0, DataState())
    if ckpt:
        state = ckpt_io.load_training_state(acc, model, optimizer, scheduler, ckpt)
    if acc.is_main_process:
        truncate_metrics(out, state.step)
    acc.init_trackers("cocomix", config={k: v for k, v in plan.to_dict().items()})
    run = Run(cfg, plan, out, acc, model, optimizer, scheduler, make_stream(cfg, plan, inputs, acc.process_index),
              inputs, inputs.store.load_tokenizer(), RunLog(acc, out, plan.max_steps, cfg.log_every), record,
              val_split(inputs.store, cfg.eval_every))
    return run, state


def val_split(store, eval_every: int):
    if not eval_every:
        return None
    if "val" not in store.splits or len(store.split("val")) < 2:
        log.warning("token store %s has no `val` tokens; validation is off (make the store with --val-fraction > 0)", store.path)
        return None
    return store.split("val")


def announce(acc, out: Path, record: dict, ckpt: Path | None) -> None:
    """Print and store the parameter counts, the plan and the targets' provenance (rank 0)."""
    if not acc.is_main_process:
        return
    if ckpt:
        rundir.check_resume_matches(out, record)
    rundir.write_run_json(out, record)
    p, plan = record["params"], record["plan"]
    log.info("%s %s: %s parameters, %s active", plan["method"], plan["size"], f"{p['total']:,}", f"{p['active']:,}")
    log.info("batch %s tokens = micro-batch %d x accumulation %d x %d process(es) x context %d; %d steps, lr %.2e -> %.2e",
             f"{plan['batch_tokens']:,}", plan["micro_batch"], plan["accum"], plan["world"], plan["context"],
             plan["max_steps"], plan["lr"], plan["min_lr"])
    if record["targets"]:
        meta = record["targets"]["meta"]
        log.info("targets %s: teacher %s, SAE %s", record["targets"]["path"], meta.get("teacher"), meta.get("sae"))
    log.info("config %s", json.dumps(record["config"], sort_keys=True))
    log.info("run folder %s%s", out, f" (resuming from {ckpt.name})" if ckpt else "")


# ----------------------------------------------------------------------------- the loop
def global_valid_slots(acc, batch: StepBatch, ignore_id: int) -> torch.Tensor:
    """Valid concept-label slots in the whole global batch (all ranks)."""
    local = sum(int((mb.concept_ids != ignore_id).sum()) for mb in batch.micro_batches)
    return acc.reduce(torch.tensor([float(local)], device=acc.device), reduction="sum")


def forward_backward(run: Run, batch: StepBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Accumulate gradients of one global batch; returns this rank's mean NTP and concept losses."""
    acc, model, plan = run.acc, run.model, run.plan
    cocomix = batch.micro_batches[0].concept_ids is not None
    n_micro = plan.accum * plan.world
    total_valid = global_valid_slots(acc, batch, run.inputs.targets.ignore_id) if cocomix else None
    ntp_sum = torch.zeros((), device=acc.device)
    concept_sum = torch.zeros((), device=acc.device)
    for mb in batch.micro_batches:
        ids_BT = mb.input_ids.to(acc.device)
        with acc.accumulate(model):
            if cocomix:
                ids_BTK = mb.concept_ids.to(acc.device)
                out = model(input_ids=ids_BT, labels=ids_BT, concept_ids=ids_BTK)
                share = (ids_BTK != run.inputs.targets.ignore_id).sum() * n_micro / total_valid.clamp(min=1)
                concept = out.concept_loss * share.squeeze()
                loss = out.ntp_loss + run.cfg.lam * concept
                concept_sum += concept.detach()
                ntp_sum += out.ntp_loss.detach()
            else:
                loss = model(input_ids=ids_BT, labels=ids_BT).loss
                ntp_sum += loss.detach()
            acc.backward(loss)
    ntp = ntp_sum / plan.accum
    return ntp, (concept_sum / plan.accum if cocomix else None)


def train_step(run: Run, step: int, batch: StepBatch) -> StepValues:
    """One optimizer step on one global batch (``step`` is 0-based); raises before stepping on NaN/inf."""
    acc = run.acc
    ntp, concept = forward_backward(run, batch)
    parts = torch.stack([ntp, concept if concept is not None else torch.zeros_like(ntp)])
    ntp_v, concept_v = acc.reduce(parts, reduction="mean").tolist()
    grad_norm = float(acc.clip_grad_norm_(run.model.parameters(), CLIP))
    loss_v = ntp_v + (run.cfg.lam * concept_v if concept is not None else 0.0)
    if not (math.isfinite(loss_v) and math.isfinite(grad_norm)):
        raise CocomixError(
            f"non-finite {'loss' if not math.isfinite(loss_v) else 'gradient norm'} at step {step + 1} "
            f"(loss {loss_v}, grad norm {grad_norm}); weights not updated, last good checkpoint kept in "
            f"{run.out / ckpt_io.CKPT_DIR}; lower --lr and --resume"
        )
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return StepValues(loss_v, ntp_v, concept_v if concept is not None else None, grad_norm)


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


def train(run: Run, state: ckpt_io.TrainerState) -> tuple[ckpt_io.TrainerState, dict | None, PplResult | None]:
    """Steps from ``state`` to ``max_steps``: step, log, maybe evaluate, maybe checkpoint."""
    plan, record, ppl = run.plan, None, None
    tokens_per_step = plan.global_windows * plan.context
    run.model.train()
    batches = prefetch(run.stream.steps(state.data), depth=2)
    try:
        while state.step < plan.max_steps:
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
