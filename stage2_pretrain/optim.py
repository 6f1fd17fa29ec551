"""AdamW and the learning-rate schedule of the paper's recipe.

AdamW (0.9, 0.95), eps 1e-8, weight decay 0.1 on every parameter, biases and LayerNorm
gains included, as the official trainer (``train/trainer.py``: one ``AdamW(base_lm.parameters())``;
nanoGPT would exempt vectors), fused kernels on CUDA. The schedule is linear
warmup over ``max(1, steps // 300)`` steps, then a cosine from the peak to the min lr.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch.optim.lr_scheduler import LambdaLR

BETAS = (0.9, 0.95)
EPS = 1e-8
WEIGHT_DECAY = 0.1
CLIP = 1.0


@dataclass(frozen=True)
class Schedule:
    """Peak and floor of the learning rate and the step counts that shape it."""

    lr: float
    min_lr: float
    max_steps: int

    @property
    def warmup(self) -> int:
        return max(1, self.max_steps // 300)


def lr_ratio(step: int, *, warmup: int, total: int, min_ratio: float) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based).

    Warmup is ``(step + 1) / warmup`` so the first step already moves the weights
    (the official scheduler starts at 0, which wastes step 0).
    """
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - min_ratio)


def make_optimizer(model: torch.nn.Module, lr: float, on_cuda: bool) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]  # tied embeddings appear once
    return torch.optim.AdamW(params, lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, fused=on_cuda or None)


def make_scheduler(optimizer: torch.optim.Optimizer, schedule: Schedule) -> LambdaLR:
    """A LambdaLR over a ``functools.partial`` (its state_dict keeps only the step, not the shape)."""
    fn = functools.partial(
        lr_ratio, warmup=schedule.warmup, total=schedule.max_steps, min_ratio=schedule.min_lr / schedule.lr
    )
    return LambdaLR(optimizer, fn)
