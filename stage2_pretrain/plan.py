"""The numbers of a run, resolved once from the flags, the preset and the process count.

``micro_batch * accum * world * context == batch_tokens``: the global batch is the
same whatever the number of processes, so a run can be resumed on another world size
with the same data order (see :mod:`.data`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from cocomix.core.errors import ConfigError
from cocomix.stage2_pretrain.config import PretrainConfig
from cocomix.stage2_pretrain.optim import Schedule
from cocomix.stage2_pretrain.presets import Preset, get_preset


@dataclass(frozen=True)
class RunPlan:
    """Resolved training shape and schedule."""

    method: str
    size: str
    context: int
    micro_batch: int   #: windows per forward pass per process
    accum: int         #: micro-batches per optimizer step per process
    world: int         #: processes
    batch_tokens: int  #: tokens per optimizer step, all processes together
    max_steps: int
    lr: float
    min_lr: float
    warmup: int

    @property
    def global_windows(self) -> int:
        return self.micro_batch * self.accum * self.world

    @property
    def schedule(self) -> Schedule:
        return Schedule(self.lr, self.min_lr, self.max_steps)

    def to_dict(self) -> dict:
        return asdict(self)


def split_batch(batch_tokens: int, context: int, world: int, micro: int | None, preset_micro: int) -> tuple[int, int]:
    """(micro_batch, accum) with ``micro * accum * world * context == batch_tokens``; else one line naming the flags."""
    if batch_tokens % (context * world):
        raise ConfigError(
            f"--batch-tokens {batch_tokens} is not a multiple of context {context} x {world} process(es) = {context * world}; "
            f"pass --batch-tokens a multiple of {context * world}"
        )
    per_rank = batch_tokens // (context * world)  # windows per process per step
    micro = micro or _largest_divisor_at_most(per_rank, preset_micro)
    if per_rank % micro:
        raise ConfigError(
            f"--batch-tokens {batch_tokens} gives {per_rank} windows of {context} per process ({world} process(es)), "
            f"not a multiple of --micro-batch {micro}; pass a --micro-batch dividing {per_rank} or another --batch-tokens"
        )
    return micro, per_rank // micro


def _largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, min(n, cap) + 1) if n % d == 0)


def make_plan(cfg: PretrainConfig, world: int, preset: Preset | None = None) -> RunPlan:
    preset = preset or get_preset(cfg.size)
    batch_tokens = cfg.batch_tokens or preset.batch_tokens
    micro, accum = split_batch(batch_tokens, preset.context, world, cfg.micro_batch, preset.micro_batch)
    max_steps = cfg.max_steps or preset.max_steps
    lr = cfg.lr or preset.lr
    min_lr = preset.min_lr if cfg.lr is None else cfg.lr / 10
    schedule = Schedule(lr, min_lr, max_steps)
    return RunPlan(cfg.method, preset.name, preset.context, micro, accum, world, batch_tokens, max_steps, lr, min_lr, schedule.warmup)
