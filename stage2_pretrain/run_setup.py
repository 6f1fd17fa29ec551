"""Set-up of a pretraining run: accelerator, inputs, plan, run folder, model, optimizer, resume.

:func:`setup` returns a :class:`Run` (everything the loop in :mod:`.train` touches) and the
:class:`~.checkpoint.TrainerState` to continue from (step 0, or the newest complete
checkpoint with ``--resume``). Every rank builds the same model from the same seed.
"""
from __future__ import annotations

import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import NamedTuple

import torch

from cocomix.core.errors import CocomixError, ConfigError, IntegrityError, MismatchError
from cocomix.core.workspace import run_dir, workspace_root
from cocomix.stage2_pretrain import checkpoint as ckpt_io
from cocomix.stage2_pretrain import rundir
from cocomix.stage2_pretrain.config import PretrainConfig
from cocomix.stage2_pretrain.data import DataState, TargetSource, TokenSource, TrainStream
from cocomix.stage2_pretrain.inputs import (
    TrainInputs,
    check_label_windows,
    check_model_matches_targets,
    open_inputs,
    spot_check_alignment,
)
from cocomix.stage2_pretrain.methods import (
    MethodSpec,
    StudentShape,
    WidthMatch,
    active_on_meta,
    build_student,
    match_width,
    reference_shape,
    spec_from_config,
)
from cocomix.stage2_pretrain.metrics import RunLog, check_tracker, truncate_metrics
from cocomix.stage2_pretrain.optim import make_optimizer, make_scheduler
from cocomix.stage2_pretrain.plan import RunPlan, make_plan
from cocomix.stage2_pretrain.presets import count_params, get_preset

log = logging.getLogger(__name__)


class Run(NamedTuple):
    """Everything the loop touches, built once by :func:`setup`."""

    cfg: PretrainConfig
    spec: MethodSpec            #: the method and its flags
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


def check_fsdp_device() -> None:
    """Refuse the FSDP config without a GPU: Accelerate shards only on GPU-like devices (on CPU
    it would fail deep inside its FSDP plugin, or quietly fall back to plain data parallel)."""
    import os

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and not torch.cuda.is_available():
        raise ConfigError("FSDP (configs/accelerate/fsdp.yaml) needs GPUs: Accelerate shards models only on GPU-like "
                          "devices. On CPU, launch with --config_file configs/accelerate/ddp.yaml or with torchrun.")


def make_accelerator(cfg: PretrainConfig, accum: int, out: Path):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    from accelerate.utils import ProjectConfiguration

    # A second run in one process (quickstart, tests) must not inherit the first one's
    # accumulation steps or precision from accelerate's process-wide singletons.
    AcceleratorState._reset_state()
    GradientState._reset_state()
    if torch.cuda.is_available():  # as the official code: TF32 for any fp32 matmul left outside autocast
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        gradient_accumulation_steps=accum,
        mixed_precision=mixed_precision(cfg.precision, cuda=torch.cuda.is_available()),
        log_with=check_tracker(cfg.tracker),
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "trackers")),
    )


def mixed_precision(precision: str, *, cuda: bool) -> str:
    """Accelerate's ``mixed_precision`` for ``--precision`` (``auto``: bf16 on GPU, none on CPU)."""
    return "bf16" if precision == "bf16" or (precision == "auto" and cuda) else "no"


def world_size() -> int:
    from accelerate import PartialState

    # cpu=True is what makes accelerate use gloo for a CPU-only torchrun/accelerate launch
    return PartialState(cpu=not torch.cuda.is_available()).num_processes


def student_shape(inputs: TrainInputs) -> StudentShape:
    """Vocabulary, SAE and label settings and teacher width, from the store and the targets."""
    store, reader = inputs.store, inputs.targets
    if reader is None:
        return StudentShape(store.vocab_size, eos_id=store.eos_id)
    hidden = reader.extra_columns.get("hidden") or {}
    return StudentShape(store.vocab_size, reader.n_latents, reader.k_attr, reader.ignore_id, store.eos_id,
                        int(hidden.get("width", 0)))


def resolve_width(cfg: PretrainConfig, spec: MethodSpec, inputs: TrainInputs) -> WidthMatch:
    """The method's width matched to the CoCoMix student on the same targets, or --width as given."""
    preset, shape = get_preset(cfg.size), student_shape(inputs)
    if cfg.width is None:
        return match_width(spec, preset, shape)
    if cfg.width % preset.n_head:
        raise ConfigError(f"--width {cfg.width} is not a multiple of the {preset.n_head} heads of --size {cfg.size}")
    ref_shape = reference_shape(preset, shape)
    reference = active_on_meta(MethodSpec(), preset, preset.cocomix_d, ref_shape)
    return WidthMatch(cfg.width, reference, active_on_meta(spec, preset, cfg.width, shape))


def check_method_inputs(spec: MethodSpec, inputs: TrainInputs) -> None:
    """The targets hold the columns the method reads; KD needs the teacher's vocabulary (one line each)."""
    reader, where = inputs.targets, inputs.targets_path
    have = set(reader.extra_columns) | {"concept_ids"} if reader is not None else set()
    fixes = {"kd_ids": f"--method {spec.method} needs targets with KD samples (column kd_ids); "
                       "re-run `cocomix extract` with --kd-samples N (e.g. 32) into another --out",
             "hidden": "--concept-target hidden needs targets with teacher hidden states (column hidden); "
                       "re-run `cocomix extract` with --store-hidden into another --out"}
    for column in spec.columns:
        if column not in have:
            raise ConfigError(f"{fixes[column]} (--targets {where} have {', '.join(sorted(have)) or 'no targets'})")
    if spec.uses_kd:
        teacher_vocab = (reader.meta.get("teacher") or {}).get("vocab_size") or reader.meta.get("vocab_size")
        if teacher_vocab is not None and int(teacher_vocab) != inputs.store.vocab_size:
            raise MismatchError(f"--method {spec.method}: the teacher's vocabulary has {teacher_vocab} ids, the student's "
                                f"(--tokens {inputs.tokens_path}) {inputs.store.vocab_size}; KD needs the same vocabulary")


def new_model(cfg: PretrainConfig, spec: MethodSpec, match: WidthMatch, inputs: TrainInputs):
    """A freshly initialised student (seeded, so every rank builds the same weights)."""
    store, reader = inputs.store, inputs.targets
    torch.manual_seed(cfg.seed)
    model = build_student(spec, get_preset(cfg.size), match.width, student_shape(inputs))
    if spec.arch == "cocomix":
        model.config.concept_provenance = {**reader.meta, "targets_path": str(inputs.targets_path)}
    else:
        model.config.cocomix_tokens = store.provenance()
    if spec.uses_kd:
        model.config.cocomix_kd = {"targets_path": str(inputs.targets_path), "teacher": reader.meta.get("teacher"),
                                   "kd_alpha": spec.kd_alpha, "samples": reader.extra_columns["kd_ids"]["width"]}
    return model


def resumed_model(ckpt: Path, inputs: TrainInputs, lam: float):
    from cocomix.stage2_pretrain.evaluate import load_checkpoint_model

    model = load_checkpoint_model(ckpt)
    if getattr(model.config, "model_type", "") == "cocomix":
        check_model_matches_targets(model.config, inputs.targets, inputs.targets_path, f"checkpoint {ckpt}")
        model.config.lam = lam
    return model


def resume_point(out: Path, inputs: TrainInputs, lam: float):
    """(checkpoint, its model) to continue from: the newest complete checkpoint whose model loads;
    a damaged newer one (truncated or tampered files) is named and skipped. (None, None) when
    there is no checkpoint."""
    found = ckpt_io.complete_checkpoints(out)
    first_error = None
    for ckpt in reversed(found):
        try:
            return ckpt, resumed_model(ckpt, inputs, lam)
        except IntegrityError as err:
            first_error = first_error or err
            older = [c for c in found if c < ckpt]
            if older:
                log.warning("--resume: checkpoint %s is damaged (%s); falling back to the previous complete one, %s",
                            ckpt.name, err, older[-1].name)
    if first_error is not None:
        raise IntegrityError(f"--resume: no checkpoint in {out / ckpt_io.CKPT_DIR} loads ({first_error}); start over with --overwrite")
    return None, None


def load_state_or_explain(acc, model, optimizer, scheduler, ckpt: Path, out: Path) -> ckpt_io.TrainerState:
    """Optimizer, scheduler, RNG and data position; a damaged file names the previous complete checkpoint."""
    try:
        return ckpt_io.load_training_state(acc, model, optimizer, scheduler, ckpt)
    except IntegrityError as err:
        older = [c for c in ckpt_io.complete_checkpoints(out) if c < ckpt]
        offer = (f"; move {ckpt} away and --resume continues from the previous complete checkpoint {older[-1].name}"
                 if older else "; no older checkpoint is left: start over with --overwrite")
        raise IntegrityError(f"--resume: checkpoint {ckpt.name} is damaged: {err}{offer}") from None


def override_peak_lr(optimizer, scheduler, lr: float) -> None:
    """``--override-lr``: the restored schedule, scaled to peak ``lr`` at the step it stands at."""
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs):
        group["lr"] = group["lr"] * lr / base
        group["initial_lr"] = lr
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def prepare_for_accelerate(model) -> None:
    """Small fixes before ``prepare``: name the HF loss (HF 5 cannot map ``GPT2LMHeadModel`` to
    one and warns), and tell FSDP's transformer wrap policy which module is a block."""
    if getattr(model, "loss_type", "") is None:
        model.loss_type = "ForCausalLM"
    if not getattr(model, "_no_split_modules", None):
        model._no_split_modules = [type(model.transformer.h[0]).__name__]


def make_stream(cfg: PretrainConfig, spec: MethodSpec, plan: RunPlan, inputs: TrainInputs, rank: int) -> TrainStream:
    """Aligned: windows at the targets' offsets (a run that reads no target column but has --targets,
    e.g. NTP, sees the same windows as CoCoMix on them); free, or no targets: the official free shift."""
    aligned = cfg.label_windows == "aligned" and inputs.targets is not None
    if not spec.columns:
        source = TokenSource(inputs.store, "train")
    else:
        source = TargetSource(inputs.targets, "train", columns=spec.columns, aligned=aligned)
    return TrainStream(source, context=plan.context, micro=plan.micro_batch, accum=plan.accum, world=plan.world,
                       rank=rank, seed=cfg.seed, offsets=inputs.targets.offsets if aligned else None)


def start_checking_ahead(stream: TrainStream, ckpt: Path | None) -> None:
    """Hand the first windows the run will read to the block check-ahead helper (when it has one)."""
    try:
        stream.prepare(ckpt_io.read_trainer_state(ckpt).data if ckpt else DataState())
    except (OSError, ValueError, KeyError, TypeError, CocomixError):
        return  # the resume checks below say what is wrong (a damaged checkpoint, flags that changed)


def run_record(cfg: PretrainConfig, spec: MethodSpec, plan: RunPlan, model, inputs: TrainInputs,
               match: WidthMatch | None) -> dict:
    counts = count_params(model)
    return {
        "config": asdict(cfg),
        "method": spec.describe(),
        "plan": {**plan.to_dict(), "seed": cfg.seed},
        "params": {"total": counts.total, "active": counts.active},
        "matched": None if match is None else match.as_record(),
        "tokens": {"path": str(inputs.tokens_path), "provenance": inputs.store.provenance()},
        "targets": None if inputs.targets is None else {
            "path": str(inputs.targets_path), "meta": inputs.targets.meta,
            "shards_sha256": [s["sha256"] for s in inputs.targets.manifest["shards"]]},
        "argv": sys.argv,
    }


def setup(cfg: PretrainConfig) -> tuple[Run, ckpt_io.TrainerState]:
    """Inputs, plan, run folder, model, optimizer and (with --resume) the restored state."""
    out = Path(cfg.out) if cfg.out else run_dir(workspace_root(cfg.workspace), cfg.method, cfg.size)
    check_fsdp_device()
    spec = spec_from_config(cfg)
    plan = make_plan(cfg, world_size())
    acc = make_accelerator(cfg, plan.accum, out)
    inputs = open_inputs(cfg.method, cfg.tokens, cfg.targets, cfg.workspace)
    check_method_inputs(spec, inputs)
    match = resolve_width(cfg, spec, inputs)  # before anything is written: a bad --insert-layer is refused here
    if spec.columns:
        spot_check_alignment(inputs.targets, inputs.store, seed=cfg.seed)
    if spec.columns or (inputs.targets is not None and cfg.label_windows == "aligned"):
        check_label_windows(inputs.targets, inputs.targets_path, plan.context, cfg.size, cfg.label_windows)
    if acc.is_main_process:
        rundir.prepare_out(out, resume=cfg.resume, overwrite=cfg.overwrite)
    acc.wait_for_everyone()
    ckpt, model = resume_point(out, inputs, cfg.lam) if cfg.resume else (None, None)
    if cfg.resume and ckpt is None:
        log.warning("--resume: no complete checkpoint in %s yet; starting from step 0", out)
    stream = make_stream(cfg, spec, plan, inputs, acc.process_index)
    start_checking_ahead(stream, ckpt)  # the rest of the set-up is the check-ahead helper's head start
    model = model or new_model(cfg, spec, match, inputs)
    prepare_for_accelerate(model)
    record = run_record(cfg, spec, plan, model, inputs, None if ckpt else match)
    optimizer = make_optimizer(model, plan.lr, on_cuda=acc.device.type == "cuda")
    scheduler = make_scheduler(optimizer, plan.schedule)
    model, optimizer = acc.prepare(model, optimizer)
    state = ckpt_io.TrainerState(0, DataState())
    if ckpt:
        state = load_state_or_explain(acc, model, optimizer, scheduler, ckpt, out)
        if cfg.override_lr:
            override_peak_lr(optimizer, scheduler, plan.lr)
    announce(acc, out, record, ckpt)  # run.json only once everything the run continues from has loaded
    if acc.is_main_process:
        truncate_metrics(out, state.step)
    start_trackers(acc, cfg.tracker, plan)
    run = Run(cfg, spec, plan, out, acc, model, optimizer, scheduler, stream,
              inputs, inputs.store.load_tokenizer(), RunLog(acc, out, plan.max_steps, cfg.log_every), record,
              val_split(inputs.store, cfg.eval_every))
    return run, state


def start_trackers(acc, tracker: str | None, plan: RunPlan) -> None:
    try:
        acc.init_trackers("cocomix", config=plan.to_dict())
    except Exception as err:  # e.g. wandb.errors.UsageError without a login
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"--tracker {tracker} could not start ({type(err).__name__}: {first}); for wandb run "
                          "`wandb login` or set WANDB_MODE=offline, or drop --tracker") from None


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
        if record["config"].get("override_lr"):
            rundir.record_lr_change(out, record, ckpt_io.read_trainer_state(ckpt).step)
        record["matched"] = record["matched"] or rundir.previous_match(out)
    rundir.write_run_json(out, record)
    p, plan, m = record["params"], record["plan"], record["matched"]
    log.info("%s %s: %s parameters, %s active", plan["method"], plan["size"], f"{p['total']:,}", f"{p['active']:,}")
    if m:
        log.info("matched to the CoCoMix student on the same targets: width %d, %s active vs %s (ratio %.4f)",
                 m["width"], f"{m['active']:,}", f"{m['reference_active']:,}", m["ratio"])
    kind = "single-process" if acc.distributed_type.name == "NO" else acc.distributed_type.name
    log.info("accelerate: %s on %s, %d process(es), mixed precision %s", kind, acc.device.type,
             acc.num_processes, acc.mixed_precision)
    log.info("batch %s tokens = micro-batch %d x accumulation %d x %d process(es) x context %d; %d steps, lr %.2e -> %.2e",
             f"{plan['batch_tokens']:,}", plan["micro_batch"], plan["accum"], plan["world"], plan["context"],
             plan["max_steps"], plan["lr"], plan["min_lr"])
    if record["targets"]:
        meta = record["targets"]["meta"]
        log.info("targets %s: teacher %s, SAE %s", record["targets"]["path"], meta.get("teacher"), meta.get("sae"))
    log.info("config %s", json.dumps(record["config"], sort_keys=True))
    log.info("run folder %s%s", out, f" (resuming from {ckpt.name})" if ckpt else "")
