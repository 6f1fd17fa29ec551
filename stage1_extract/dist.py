"""Just enough ``torch.distributed`` for stage 1: rank, world size, a barrier, a sum.

Under ``torchrun`` or ``accelerate launch`` the environment holds ``RANK``,
``WORLD_SIZE`` and the rendezvous address; ranks then take disjoint shards
(``TargetWriter.pending(rank, world)``) and rank 0 writes the manifest after a
barrier. No gradient is ever synchronised, so no DDP wrapper is needed: gloo on CPU,
NCCL on CUDA. A single process (no launcher) needs no process group at all.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as td

log = logging.getLogger(__name__)

TIMEOUT = datetime.timedelta(hours=6)  #: a barrier may wait for slow ranks to finish long shards


@dataclass
class Dist:
    """This process's place in the run."""

    rank: int = 0
    world: int = 1
    owns_group: bool = False  #: we created the process group (and destroy it at the end)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            td.barrier()

    def sum(self, value: float, device: torch.device) -> float:
        """Sum of ``value`` over ranks (float64 on the collective's device)."""
        if self.world == 1:
            return float(value)
        t = torch.tensor([float(value)], dtype=torch.float64, device=self._coll_device(device))
        td.all_reduce(t)
        return float(t.item())

    def _coll_device(self, device: torch.device) -> torch.device:
        return device if td.get_backend() == "nccl" else torch.device("cpu")

    def close(self) -> None:
        if self.owns_group and td.is_initialized():
            td.destroy_process_group()


def init_dist(device: torch.device) -> Dist:
    """Join the launcher's process group when there is one (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if td.is_initialized():
        return Dist(td.get_rank(), td.get_world_size(), owns_group=False)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    td.init_process_group(backend=backend, timeout=TIMEOUT)
    log.debug("rank %d of %d (%s)", td.get_rank(), world, backend)
    return Dist(td.get_rank(), td.get_world_size(), owns_group=True)
