"""Configs of stage 2: ``pretrain`` and ``eval``. Size presets live in :mod:`.presets`."""
from __future__ import annotations

from dataclasses import dataclass

from cocomix.pipeline.configs import arg, flag, flag_name
from cocomix.pipeline.errors import ConfigError

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
        if not self.lam >= 0:
            raise ConfigError(f"--lam must be >= 0 (0 = insertion only, no concept loss), got {self.lam}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")


@dataclass
class EvalConfig:
    """Validation perplexity of a checkpoint over non-overlapping windows; writes eval.json beside it."""

    ckpt: str = arg(help="Checkpoint folder (a CoCoMix checkpoint or a stock HF GPT-2 folder).")
    tokens: str = flag(help="Token store whose split is evaluated.")
    split: str = flag("val", help="Split to evaluate.")
    window: int | None = flag(None, help="Window length. Default: the model's context (1024 for the paper's sizes).")
    max_windows: int | None = flag(None, help="Evaluate at most this many windows.")
    batch_size: int = flag(8, help="Windows per forward pass.")
    device: str = flag("auto", help="`auto`, `cpu`, `cuda` or `cuda:N`.")

    def __post_init__(self) -> None:
        for name in ("window", "max_windows", "batch_size"):
            value = getattr(self, name)
            if value is not None and value < (2 if name == "window" else 1):
                raise ConfigError(f"{flag_name(name)} must be >= {2 if name == 'window' else 1}, got {value}")
