"""Run the ``cocomix`` CLI under Accelerate's FSDP on CPU processes (gloo). Test scaffolding only.

``accelerate launch --config_file configs/accelerate/fsdp.yaml`` starts the processes and sets
the FSDP environment exactly as on a GPU node, but Accelerate turns FSDP on only for GPU-like
devices (on CPU it quietly falls back to plain data parallel), and two torch code paths assume a
GPU. Three patches, applied before the CLI runs, make the very same code path run on CPU:

1. ``AcceleratorState``: with ``ACCELERATE_USE_FSDP`` set, take ``DistributedType.FSDP`` with
   compute device ``cpu`` instead of ``MULTI_CPU``.
2. ``FullyShardedDataParallelPlugin``: ``sync_module_states`` (broadcast rank 0's weights at
   wrap time) needs a GPU in both Accelerate and torch; it is turned off. Nothing depends on
   it: every rank builds the same weights from the seed, or loads the same checkpoint.
3. Full state dicts (model in ``Accelerator.get_state_dict``, optimizer in the plugin's config)
   are gathered to rank 0 without ``offload_to_cpu``: torch segfaults offloading tensors that
   already live on the CPU. Otherwise the same call as Accelerate's FSDP1 branch.

cocomix itself refuses FSDP without a GPU (:func:`check_fsdp_device`); that guard is lifted here.

    accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes 2 \\
        tests/stage2_pretrain/fsdp_on_cpu.py pretrain --size tiny ...
"""
from __future__ import annotations

import os
import sys

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin
from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

from cocomix.stage2_pretrain import run_setup

CPU = torch.device("cpu")


def _patch_state() -> None:
    init = AcceleratorState.__init__

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        if self.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
            self.distributed_type = DistributedType.FSDP
            self.device = CPU  # FSDP compares its compute device with `device_id`: "cpu", not "cpu:0"
            self.fsdp_plugin = kwargs.get("fsdp_plugin") or FullyShardedDataParallelPlugin()

    AcceleratorState.__init__ = __init__


def _patch_plugin() -> None:
    post_init = FullyShardedDataParallelPlugin.__post_init__

    def __post_init__(self):
        sync = os.environ.pop("FSDP_SYNC_MODULE_STATES", None)
        try:
            post_init(self)
        finally:
            if sync is not None:
                os.environ["FSDP_SYNC_MODULE_STATES"] = sync
        self.state_dict_config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        self.optim_state_dict_config = FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=True)

    FullyShardedDataParallelPlugin.__post_init__ = __post_init__


def _patch_get_state_dict() -> None:
    get_state_dict = Accelerator.get_state_dict

    def patched(self, model, unwrap=True):
        if self.distributed_type != DistributedType.FSDP:
            return get_state_dict(self, model, unwrap)
        config = FullStateDictConfig(offload_to_cpu=False, rank0_only=True)
        with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, config):
            return model.state_dict()

    Accelerator.get_state_dict = patched


def main() -> None:
    assert os.environ.get("ACCELERATE_USE_FSDP") == "true", "start this under accelerate launch with the FSDP config"
    _patch_state()
    _patch_plugin()
    _patch_get_state_dict()
    run_setup.check_fsdp_device = lambda: None
    from cocomix.pipeline.cli import main as cli

    sys.argv = ["cocomix", *sys.argv[1:]]
    cli()


if __name__ == "__main__":
    main()
