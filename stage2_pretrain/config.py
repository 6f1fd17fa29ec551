"""Configs of stage 2: ``pretrain`` and ``eval``. Size presets live in :mod:`.presets`."""
from __future__ import annotations

import math
from dataclasses import dataclass

from cocomix.core.configs import arg, flag, flag_name
from cocomix.core.errors import ConfigError

METHODS = ("cocomix", "ntp", "kd", "pause", "pause-kd")  #: the students of .methods
MIXES = ("interleave", "add", "none")
CONCEPT_TARGETS = ("concepts", "hidden")
HIDDEN_LOSSES = ("l1", "l2", "cosine")
LABEL_WINDOWS = ("aligned", "free")
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass
class PretrainConfig:
    """Pretrain a CoCoMix student (or the matched NTP baseline) on a token store and target shards."""

    RESUME = "re-run the same command with --resume to continue from the newest complete checkpoint"  #: printed after Ctrl-C (no annotation: not a flag)

    method: str = flag("cocomix", help="`cocomix` (concept prediction + mixing), `ntp` (plain next-token GPT-2), `kd` (GPT-2 distilled from the teacher samples `extract --kd-samples` stored), `pause` (a learned vector interleaved at --insert-layer, no concepts) or `pause-kd` (pause + the KD loss). Every method is matched in active parameters to the CoCoMix student on the same targets.")
    size: str = flag("69m", help="Model preset: tiny, 69m, 386m, 1b.")
    tokens: str | None = flag(None, help="Token store. Default: the one the targets were made from, else the workspace's only store.")
    targets: str | None = flag(None, help="Target-shard folder. Default (cocomix): the workspace's only target folder. With --method ntp or pause it only sets the matched width (those runs read tokens only); kd and pause-kd read its kd_ids.")
    out: str | None = flag(None, help="Run folder (checkpoints, metrics.jsonl). Default: <workspace>/runs/<method>-<size>.")
    max_steps: int | None = flag(None, help="Optimizer steps. Default: the preset's (20B tokens for 69m/386m/1b; 200 for tiny). May change on --resume (the cosine then ends at the new step).")
    batch_tokens: int | None = flag(None, help="Tokens per optimizer step (reached by gradient accumulation). Default: the preset's.")
    micro_batch: int | None = flag(None, help="Windows per forward pass per process. Default: the preset's.")
    width: int | None = flag(None, help="Model width (n_embd) instead of the preset's. NTP default: the preset's matched width, or, with --targets, the width matching the CoCoMix student on those targets.")
    lr: float | None = flag(None, help="Peak learning rate. Default: the preset's (min lr = lr / 10).")
    seed: int = flag(0, help="Seed for init and data order.")
    resume: bool = flag(False, help="Continue from the newest complete checkpoint in --out.")
    eval_every: int = flag(1000, help="Validation perplexity every N steps (0: never).")
    eval_windows: int = flag(64, help="Validation windows per evaluation.")
    save_every: int = flag(1000, help="Checkpoint every N steps (0: only at the end).")
    keep_last: int = flag(3, help="Checkpoints kept (older ones deleted); 0 keeps all.")
    log_every: int = flag(10, help="Console/metrics line every N steps.")
    label_windows: str = flag("aligned", help="`aligned`: each epoch's windows start at one of the offsets the targets were extracted for (`extract --offsets N`; a new one each epoch) and read that offset's labels, computed on exactly those windows. `free` (ablation): the official loader's random shift in [0, T], labels read from the offset-0 set at the shifted positions, i.e. computed on other window boundaries. NTP runs without --targets always shift freely.")
    lam: float = flag(0.1, help="Concept-loss weight lambda (0 = insertion only: concepts mixed in, no concept loss).")
    kd_alpha: float = flag(0.5, help="KD weight alpha in [0, 1] of `kd` / `pause-kd`: loss = (1 - alpha) * CE + alpha * (-(1/N) sum_n log q(id_n)) over the N stored teacher samples.")
    mix: str = flag("interleave", help="CoCoMix ablation: how the concept enters the stream at --insert-layer: `interleave` (the paper: h1, c1, h2, c2, ... on 2T positions), `add` (intervention: h + c on T positions) or `none` (prediction only: concept loss, nothing inserted).")
    concept_target: str = flag("concepts", help="CoCoMix ablation: `concepts` (the SAE concept labels) or `hidden` (a 2-layer MLP predicts the teacher's hidden state, stored by `extract --store-hidden`; compressed by a linear map and mixed the same way).")
    hidden_loss: str = flag("cosine", help="Loss of --concept-target hidden: `l1`, `l2` or `cosine` (against the teacher state normalised per token).")
    k_concept: int | None = flag(None, help="CoCoMix: concept logits kept before compression. Default: the preset's (32; tiny 8).")
    insert_layer: int | None = flag(None, help="CoCoMix and pause: the block whose input gets the concept (or pause) positions. Default: the preset's.")
    precision: str = flag("auto", help="`auto` (bf16 autocast on GPU, fp32 on CPU), `bf16` (autocast on any device) or `fp32`. Weights and AdamW state stay fp32.")
    tracker: str | None = flag(None, help="Also log to `tensorboard` or `wandb` through Accelerate.")
    workspace: str | None = flag(None, help="Workspace folder for default paths. Default: $COCOMIX_WORKSPACE or ./cocomix-workspace.")
    overwrite: bool = flag(False, help="Start over in a non-empty --out (deletes its checkpoints).")
    override_lr: bool = flag(False, help="With --resume and --lr: continue with this peak learning rate instead of the run's (the schedule keeps its shape, scaled to the new peak; e.g. after a non-finite loss). Recorded in run.json under lr_changes.")

    def __post_init__(self) -> None:
        for name, choices in (("method", METHODS), ("mix", MIXES), ("concept_target", CONCEPT_TARGETS),
                              ("hidden_loss", HIDDEN_LOSSES)):
            if getattr(self, name) not in choices:
                raise ConfigError(f"{flag_name(name)} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        if not 0 <= self.kd_alpha <= 1:
            raise ConfigError(f"--kd-alpha must be in [0, 1], got {self.kd_alpha}")
        if self.k_concept is not None and self.k_concept < 1:
            raise ConfigError(f"--k-concept must be >= 1, got {self.k_concept}")
        if self.insert_layer is not None and self.insert_layer < 0:
            raise ConfigError(f"--insert-layer must be >= 0, got {self.insert_layer}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.label_windows not in LABEL_WINDOWS:
            raise ConfigError(f"--label-windows must be one of {', '.join(LABEL_WINDOWS)}, got {self.label_windows!r}")
        if self.resume and self.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        for name in ("max_steps", "batch_tokens", "micro_batch", "log_every", "eval_windows", "width"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{flag_name(name)} must be >= 1, got {value}")
        for name in ("eval_every", "save_every", "keep_last"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{flag_name(name)} must be >= 0, got {getattr(self, name)}")
        for name in ("lr", "lam"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ConfigError(f"{flag_name(name)} must be a finite number, got {value}")
        if self.override_lr and not (self.resume and self.lr is not None):
            raise ConfigError("--override-lr needs --resume and the new --lr (e.g. --resume --override-lr --lr 3e-4)")
        if not self.lam >= 0:
            raise ConfigError(f"--lam must be >= 0 (0 = insertion only, no concept loss), got {self.lam}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")


@dataclass
class EvalConfig:
    """Evaluate a checkpoint: perplexity on token stores and lm-evaluation-harness tasks; merges the scores into eval.json beside it."""

    ckpt: str = arg(help="Checkpoint folder: a CoCoMix checkpoint, or a stock HF GPT-2 folder (NTP checkpoints are one).")
    tokens: str | None = flag(None, help="Token store whose --split gives the validation perplexity (`val_ppl` in eval.json). Optional when --tasks or --ppl-tokens is given.")
    split: str = flag("val", help="Split of --tokens to evaluate (another split than `val` goes to eval-<split>.json).")
    ppl_tokens: list[str] | None = flag(None, help="Another token store to report perplexity on, named after its folder (e.g. an OpenWebText, LAMBADA or WikiText store): repeat the flag or give a comma list. STORE:SPLIT picks a split other than --split.")
    tasks: str | None = flag(None, help="lm-evaluation-harness tasks, comma-separated, e.g. lambada_openai,wikitext,hellaswag; `paper` = the paper's seven (lambada_openai, wikitext, hellaswag, piqa, social_iqa, arc_easy, winogrande). Needs lm-evaluation-harness (`pip install -e '.\\[eval]'`); the task data sets come from the HF hub unless cached or defined locally (--include-path).")
    include_path: str | None = flag(None, help="Folder of extra task YAML files for the harness (e.g. tasks reading local JSON data); they take precedence over built-in tasks of the same name.")
    limit: int | None = flag(None, help="Score at most this many documents per task (quick checks; the scores are then not comparable to full runs).")
    num_fewshot: int | None = flag(None, help="Few-shot examples per task prompt. Default: each task's own (0 for the paper's tasks).")
    bootstrap_iters: int = flag(100000, help="Resamples for the bootstrap stderr of perplexity-type task metrics (the harness's default); 0 skips every task stderr.")
    window: int | None = flag(None, help="Window length for --tokens and --ppl-tokens. Default: the model's context (1024 for the paper's sizes).")
    max_windows: int | None = flag(None, help="Evaluate at most this many windows per token store.")
    batch_size: int = flag(8, help="Windows per forward pass (perplexity), requests per forward pass (tasks).")
    device: str = flag("auto", help="`auto`, `cpu`, `cuda` or `cuda:N`.")

    def __post_init__(self) -> None:
        for name in ("window", "max_windows", "batch_size", "limit"):
            value = getattr(self, name)
            if value is not None and value < (2 if name == "window" else 1):
                raise ConfigError(f"{flag_name(name)} must be >= {2 if name == 'window' else 1}, got {value}")
        for name in ("num_fewshot", "bootstrap_iters"):
            if (getattr(self, name) or 0) < 0:
                raise ConfigError(f"{flag_name(name)} must be >= 0, got {getattr(self, name)}")
        self.ppl_tokens = [p.strip() for v in self.ppl_tokens or [] for p in v.split(",") if p.strip()] or None
        if self.tasks is not None and not self.tasks.strip(" ,"):
            raise ConfigError("--tasks is empty; pass task names such as lambada_openai,hellaswag or `paper`")
        if not (self.tokens or self.tasks or self.ppl_tokens):
            raise ConfigError("nothing to evaluate: pass --tokens (validation perplexity), --ppl-tokens or --tasks")


@dataclass
class CompareConfig:
    """One table of every metric in the eval.json of several runs: perplexities, task accuracies and their average."""

    runs: list[str] = arg(help="Run folders (their final/ checkpoint), checkpoint folders or eval.json files.")
    plot: str | None = flag(None, help="Also draw the table as bar charts, one panel per metric, into this image file (.png, .pdf, .svg).")
    json: bool = flag(False, help="Print the table as JSON (for scripts) instead of a rich table.")
