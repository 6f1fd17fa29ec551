"""``cocomix extract``: teacher + TopK SAE + attribution over a token store, into target shards.

The run reads like its table of contents (docs/ARCHITECTURE.md, stage 1):

    resolve inputs (tokenize first with --corpus) -> load teacher, SAE, store -> check they agree
    -> plan shards (one label set per window offset) -> open the writer (refuses another teacher/SAE/layer unless --overwrite)
    -> label this rank's pending shards (claim, compute, write) -> barrier
    -> rank 0: finish shards abandoned by dead processes, write the manifest, print the summary

Every shard is a pure function of (tokens, teacher, SAE, flags): a killed run re-run with
the same flags recomputes only unfinished shards, and the bytes equal an uninterrupted run.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from cocomix.core.device import resolve_device
from cocomix.core.errors import ConfigError, MismatchError
from cocomix.core.workspace import cache_dir, targets_dir, workspace_root
from cocomix.stage1_extract.attribution import AttributionSpec
from cocomix.stage1_extract.config import ExtractConfig
from cocomix.stage1_extract.dist import Dist, init_dist
from cocomix.stage1_extract.kd_samples import RULE as KD_RULE
from cocomix.stage1_extract.report import Coverage, ExtractProgress, peak_memory_bytes, print_summary, read_coverage
from cocomix.stage1_extract.sae.io import check_sae_matches_teacher, load_sae
from cocomix.stage1_extract.shard_labels import label_shard
from cocomix.stage1_extract.teacher import check_layer, check_tokenizer, check_vocab, check_window, load_teacher
from cocomix.storage.target_folder import manifest_problem, open_retrying, written
from cocomix.storage.target_offsets import offsets_record, spread_offsets
from cocomix.storage.target_schema import extra_column
from cocomix.storage.targets import MANIFEST, PLAN, TargetWriter, id_dtype, ignore_id, plan_shards
from cocomix.storage.token_store import TokenStore

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  #: how often rank 0 re-checks shards held by another process


@dataclass
class ExtractResult:
    """What an extract run produced."""

    out: Path  #: the target folder (holds manifest.json)
    tokens: Path  #: the token store that was labelled
    shards_total: int
    shards_computed: int  #: by this run (all ranks); 0 when everything was already done
    tokens_computed: int  #: tokens labelled by this run (all ranks)
    seconds: float
    stats: dict = field(default_factory=dict)  #: what the manifest records under ``extra``


@dataclass
class Inputs:
    """Everything a run needs, loaded and cross-checked."""

    teacher: object
    sae: object
    sae_info: object
    store: TokenStore
    tokens_path: Path
    out: Path
    splits: list[str]


def run_extract(cfg: ExtractConfig, dist: Dist | None = None) -> ExtractResult:
    """Label ``cfg.tokens`` (``--corpus`` alone is tokenized first by the CLI's extract: pipeline/chain.py)."""
    t0 = time.monotonic()
    device = resolve_device(cfg.device)
    use_tf32(device)
    own = dist is None
    dist = dist or init_dist(device)
    threads = torch.get_num_threads()
    try:
        inputs = load_inputs(cfg, device, dist)
        return _extract(cfg, inputs, dist, device, t0)
    finally:
        torch.set_num_threads(threads)  # a caller's own setting (tests, quickstart) comes back
        if own:
            dist.close()


def _extract(cfg: ExtractConfig, inputs: Inputs, dist: Dist, device: torch.device, t0: float) -> ExtractResult:
    spec, ids_dt, score_dt = attribution_spec(cfg, inputs, device)
    offsets = spread_offsets(cfg.offsets, cfg.window, cfg.offset_seed)
    plan = plan_shards({s: len(inputs.store.split(s)) for s in inputs.splits}, cfg.window, cfg.windows_per_shard, offsets)
    writer = open_writer(cfg, inputs, plan, ids_dt, score_dt, dist)
    use_recorded_threads(cfg, writer.compute, device)
    with writer:
        pending = writer.pending(dist.rank, dist.world)  # re-verifies (sha256) this rank's finished shards
        verified = [s for i, s in enumerate(plan) if i % dist.world == dist.rank and s not in pending]
        log.info("%s: %d shards to compute, %d finished (rank %d of %d)%s",
                 inputs.out, len(pending), len(verified), dist.rank, dist.world, how_checked(writer.checks))
        labeller = ShardLabeller(cfg, inputs, spec, ids_dt, score_dt, writer)
        with ExtractProgress(sum(s.end - s.start for s in pending), len(pending), dist.is_main) as bar:
            for shard in pending:
                labeller.maybe_compute(shard, bar)
            dist.barrier()
            if dist.is_main:
                finish_abandoned(writer, plan, labeller, bar)
        labeller.coverage = merge(labeller.coverage, read_coverage([inputs.out / s.relpath for s in verified], spec.ignore_id))
        stats = run_stats(cfg, labeller, dist, device, bar.seconds, len(plan))
        if dist.is_main:
            finalize(writer, inputs.out, stats)
    dist.barrier()
    return ExtractResult(inputs.out, inputs.tokens_path, len(plan), stats["shards_computed"],
                         stats["tokens_computed"], time.monotonic() - t0, stats)


def merge(a: Coverage, b: Coverage) -> Coverage:
    return Coverage(a.tokens + b.tokens, a.labelled + b.labelled, a.labels + b.labels)


class ShardLabeller:
    """Claims, computes and writes one shard at a time (counts what this process did)."""

    def __init__(self, cfg, inputs: Inputs, spec: AttributionSpec, ids_dt, score_dt, writer) -> None:
        self.cfg, self.inputs, self.spec = cfg, inputs, spec
        self.ids_dt, self.score_dt, self.writer = ids_dt, score_dt, writer
        self.shards = self.tokens = 0
        self.coverage = Coverage()

    def maybe_compute(self, shard, bar: ExtractProgress) -> bool:
        """Compute ``shard`` unless another process holds it (or has just finished it)."""
        if not self.writer.claim(shard):
            log.debug("shard %s is held by another process or already done; skipping it", shard.relpath)
            return False
        tokens_N = np.asarray(self.inputs.store.split(shard.split).read(shard.start, shard.end))
        labels = label_shard(
            self.inputs.teacher, self.inputs.sae, tokens_N, split=shard.split, start=shard.start,
            window=self.cfg.window, batch_size=self.cfg.batch_size, spec=self.spec,
            id_dtype=self.ids_dt, score_dtype=self.score_dt, on_batch=bar.tokens_done,
        )
        self.writer.write_shard(shard, labels.tokens_N, labels.ids_NK, labels.scores_NK, labels.extra)
        self.coverage.add_ids(labels.ids_NK, self.spec.ignore_id)
        self.shards += 1
        self.tokens += len(tokens_N)
        bar.shard_done()
        return True


def finish_abandoned(writer, plan, labeller: ShardLabeller, bar: ExtractProgress) -> None:
    """Rank 0, after the barrier: compute shards nobody finished; wait for those another process holds.

    A shard is left over when a concurrent ``extract`` on the same folder claimed it (we wait
    for it, or take it over if that process dies and its lock is released). Shards the ranks
    just wrote are only checked for presence here; ``finalize`` verifies every checksum.
    """
    remaining = [s for s in plan if not written(writer.out, s)]
    while remaining:
        for shard in remaining:
            labeller.maybe_compute(shard, bar)
        remaining = [s for s in remaining if not written(writer.out, s)]
        if remaining:
            log.info("waiting for %d shard(s) held by another extract process", len(remaining))
            time.sleep(POLL_SECONDS)


def finalize(writer, out: Path, stats: dict) -> None:
    """Write the manifest, unless this run found everything finished and a manifest in place
    that readers accept and that describes this folder's plan and verified shards."""
    problem = manifest_problem(writer, out) if stats["shards_computed"] == 0 else "shards were computed"
    if problem is None:
        log.info("%s was already complete; manifest kept%s", out, how_checked(writer.checks))
    else:
        if stats["shards_computed"] == 0:
            log.warning("every shard of %s is verified, but its %s cannot be kept (%s); rewriting it", out, MANIFEST, problem)
        writer.finalize(extra=stats)
    print_summary(stats, out)


def how_checked(checks: dict) -> str:
    """How finished shards were checked: by sha256, or only found unchanged (size, mtime) since their last hash."""
    if not checks["unchanged"]:
        return f": {checks['hashed']} verified by sha256" if checks["hashed"] else ""
    return (f": {checks['hashed']} verified by sha256, {checks['unchanged']} not re-hashed (same size and mtime as when "
            "last hashed; readers check each block's CRC32C, `cocomix verify` re-hashes all)")


def load_inputs(cfg: ExtractConfig, device: torch.device, dist: Dist) -> Inputs:
    """Teacher, token store (tokenized first with --corpus), SAE; every pairwise check."""
    ws = workspace_root(cfg.workspace)
    teacher = load_teacher(cfg.teacher, device)
    check_layer(teacher, cfg.layer)
    check_window(teacher, cfg.window)
    if cfg.tokens is None:
        raise ConfigError("--corpus without --tokens is tokenized by `cocomix extract`; call "
                          "cocomix.pipeline.chain.run_extract_chain, or pass --tokens DIR")
    tokens_path = Path(cfg.tokens)
    store = TokenStore.open(tokens_path)
    check_tokenizer(teacher, store)
    check_vocab(teacher, store)
    sae, info = load_sae(cfg.sae, cache_dir=cache_dir(ws))
    check_sae_matches_teacher(info, teacher.d_model)
    check_sae_hook(info, cfg.layer)
    check_k_attr(cfg, info)
    sae = sae.to(device).eval().requires_grad_(False)
    splits = [s.strip() for s in cfg.splits.split(",") if s.strip()]
    for name in splits:
        store.split(name)  # a clear error naming the known splits
    out = Path(cfg.out) if cfg.out else targets_dir(ws, cfg.corpus or tokens_path.name)
    return Inputs(teacher, sae, info, store, tokens_path, out, splits)


HOOK_LOCATIONS = (None, "resid_post", "resid_post_mlp")  #: names of "the output of block L" (SAELens, OpenAI)


def check_k_attr(cfg: ExtractConfig, info) -> None:
    """Labels come from the SAE's k active latents (unless ``--attribution-input pre`` scores all
    of them): more slots than that would only ever hold ``ignore_id``."""
    if cfg.attribution_input == "post" and cfg.k_attr > info.k:
        raise ConfigError(f"--k-attr {cfg.k_attr} exceeds the {info.k} latents SAE {info.source} activates per token; "
                          f"pass --k-attr {info.k} or less")
    if cfg.k_attr > info.n_latents:
        raise ConfigError(f"--k-attr {cfg.k_attr} exceeds the {info.n_latents} latents of SAE {info.source}; "
                          f"pass --k-attr {info.n_latents} or less")


def check_sae_hook(info, layer: int) -> None:
    """An SAE whose file names its hook must have been trained on the output of block ``layer``."""
    if info.layer is not None and info.layer != layer:
        raise MismatchError(f"SAE {info.source} was trained on layer {info.layer}, but --layer is {layer}; pass --layer {info.layer}")
    if info.location not in HOOK_LOCATIONS:
        raise MismatchError(
            f"SAE {info.source} reads {info.location!r}, but extract hooks the output of block {layer} "
            "(resid_post / resid_post_mlp); pass an SAE trained on the residual stream after the block"
        )


def use_tf32(device: torch.device) -> None:
    """TF32 tensor-core matmuls for the fp32 teacher on CUDA, as the official code (``main.py``)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def compute_dtype(cfg: ExtractConfig, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for the teacher: none (fp32) under ``auto``, as the official extractor (its
    teacher runs outside autocast, with TF32 matmuls on CUDA: :func:`use_tf32`). ``bfloat16`` is
    faster on GPUs but moves a few percent of the label slots (tests/bench measure how many)."""
    if cfg.dtype in ("auto", "float32"):
        return None
    if cfg.dtype == "bfloat16":
        return torch.bfloat16
    raise ConfigError(f"--dtype must be auto, float32 or bfloat16, got {cfg.dtype!r}")


def attribution_spec(cfg: ExtractConfig, inputs: Inputs, device: torch.device):
    """(AttributionSpec, label id dtype, score dtype) for this run."""
    ids_dt = id_dtype(inputs.sae_info.n_latents)
    spec = AttributionSpec(layer=cfg.layer, k_attr=cfg.k_attr, selection=cfg.selection,
                           attribution_input=cfg.attribution_input, ignore_id=ignore_id(ids_dt),
                           autocast_dtype=compute_dtype(cfg, device), kd_samples=cfg.kd_samples,
                           store_hidden=cfg.store_hidden)
    return spec, ids_dt, np.dtype(cfg.score_dtype)


def target_meta(cfg: ExtractConfig, inputs: Inputs, spec: AttributionSpec) -> dict:
    """The provenance a target folder is identified by (a resumed run must match it exactly)."""
    sae = inputs.sae_info.as_meta()
    sae.update(layer=cfg.layer, location=sae.get("location") or "resid_post")
    meta = {
        "teacher": dict(inputs.teacher.info),
        "tokenizer_sha256": inputs.store.tokenizer_sha256,
        "vocab_size": inputs.store.vocab_size,
        "sae": sae,
        "layer": cfg.layer,
        "selection": cfg.selection,
        "attribution_input": cfg.attribution_input,
        "k_attr": cfg.k_attr,
        "window": cfg.window,
        "compute_dtype": str(spec.autocast_dtype or torch.float32).replace("torch.", ""),
        "tokens": inputs.store.provenance(),
    }
    offsets = offsets_record(cfg.offsets, cfg.window, cfg.offset_seed)
    if offsets:  # one offset-0 set records nothing, as folders made before offsets existed
        meta["offsets"] = offsets
    return meta


def extra_columns(cfg: ExtractConfig, inputs: Inputs) -> dict:
    """The optional columns this run writes, as the plan and manifest record them."""
    columns = {}
    if cfg.kd_samples:
        columns["kd_ids"] = extra_column(inputs.store.dtype, cfg.kd_samples, samples=cfg.kd_samples, rule=KD_RULE,
                                         window=cfg.window)
    if cfg.store_hidden:
        d = inputs.teacher.d_model
        columns["hidden"] = extra_column(
            np.float16, d, layer=cfg.layer, bytes_per_token=2 * d,
            warning=f"the hidden column alone takes {2 * d} bytes per token ({2 * d / 1e3:.1f} TB per billion tokens)")
        log.warning("--store-hidden: the `hidden` column takes 2 x %d = %d bytes per token (%.1f TB per billion tokens)",
                    d, 2 * d, 2 * d / 1e3)
    return columns


def open_writer(cfg: ExtractConfig, inputs: Inputs, plan, ids_dt, score_dt, dist: Dist) -> TargetWriter:
    """Rank 0 creates (or checks, or with --overwrite clears) the folder first; the others then join it."""
    spec, _, _ = attribution_spec(cfg, inputs, inputs.teacher.device)
    kwargs = dict(meta=target_meta(cfg, inputs, spec), plan=plan, k_attr=cfg.k_attr, id_dtype=ids_dt,
                  score_dtype=score_dt, token_dtype=inputs.store.dtype, extra_columns=extra_columns(cfg, inputs),
                  compute=compute_record(cfg, inputs.teacher.device))
    writer = None
    if dist.is_main:
        writer = open_retrying(inputs.out, overwrite=cfg.overwrite, **kwargs)
    dist.barrier()
    return writer or open_retrying(inputs.out, overwrite=False, **kwargs)


def compute_record(cfg: ExtractConfig, device: torch.device) -> dict:
    """What plan.json records about how shards are computed: on CPU the thread count (BLAS results,
    hence scores and near-tie labels, depend on it); nothing on GPUs."""
    return {"cpu_threads": cfg.threads or torch.get_num_threads()} if device.type == "cpu" else {}


def use_recorded_threads(cfg: ExtractConfig, compute: dict, device: torch.device) -> None:
    """Compute with the thread count the folder was started with, pinned: ``torch.set_num_threads``
    also turns MKL's dynamic thread choice off (with it on, MKL may use fewer threads when the
    machine is busy, and a shard computed then differs in the last bits)."""
    if device.type != "cpu":
        return
    recorded = int(compute.get("cpu_threads") or cfg.threads or torch.get_num_threads())
    if cfg.threads is not None and cfg.threads != recorded:
        log.warning("--threads %d differs from the %d CPU threads %s was started with: shards computed now may differ "
                    "from an uninterrupted run in the last bits of their scores (and labels at near ties)",
                    cfg.threads, recorded, PLAN)
        recorded = cfg.threads
    elif recorded != torch.get_num_threads():
        log.info("computing with the %d CPU threads the folder was started with (shard bytes depend on it)", recorded)
    torch.set_num_threads(recorded)


def run_stats(cfg, labeller: ShardLabeller, dist: Dist, device: torch.device, seconds: float, n_shards: int) -> dict:
    """Numbers for the summary and the manifest, summed over ranks."""
    cov = labeller.coverage
    tokens = int(dist.sum(labeller.tokens, device))
    coverage = Coverage(*(int(dist.sum(v, device)) for v in (cov.tokens, cov.labelled, cov.labels)))
    return {
        "shards_total": n_shards,
        "shards_computed": int(dist.sum(labeller.shards, device)),
        "tokens_computed": tokens,
        "tokens_per_s": tokens / max(seconds, 1e-9),
        "seconds": seconds,
        "world_size": dist.world,
        "device": str(device),
        "peak_memory_bytes": peak_memory_bytes(device),  # of rank 0
        "coverage": coverage.as_stats(),
        "k_attr": cfg.k_attr,
        "batch_size": cfg.batch_size,
        "cpu_threads": torch.get_num_threads() if device.type == "cpu" else None,
    }
