"""Where a command computes: ``--device auto`` is this process's CUDA device (``LOCAL_RANK`` under
a launcher) when CUDA is available, else the CPU; an explicit device is checked."""
from __future__ import annotations

import os

import torch

from cocomix.core.errors import ConfigError


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> cuda (this process's LOCAL_RANK under a launcher) if available, else cpu."""
    if spec != "auto":
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise ConfigError(f"--device {spec!r} is not a device; pass auto, cpu, cuda or cuda:N") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {spec}: CUDA is not available here; pass --device cpu (or auto)")
        if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
