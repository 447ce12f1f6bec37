"""Which process this is, and the process group: the one place distributed set-up lives.

Under torchrun every process has RANK / LOCAL_RANK / WORLD_SIZE. One process trained in-process has none,
and two things then break: DeepSpeed looks for a launcher, finds none and falls back to MPI discovery
(``No module named 'mpi4py'``); and on a host with several GPUs the Trainer, not being distributed, takes
them all through DataParallel. ``one_process_group`` gives such a process a single-rank group, so it is an
ordinary rank 0 of a world of 1 on one device.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import torch

logger = logging.getLogger(__name__)

LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LEFT_BY_THE_TRAINER = ("ACCELERATE_USE_DEEPSPEED",)  # set by transformers when it prepares DeepSpeed, never unset


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_rank_zero() -> bool:
    return rank() == 0


def launched() -> bool:
    """Started by torchrun (or another launcher that sets the rank variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def needs_own_group(deepspeed: str | None, cuda_devices: int) -> bool:
    """An in-process run needs a single-rank group of its own for DeepSpeed, or to keep to one of several GPUs."""
    return not launched() and (bool(deepspeed) or cuda_devices > 1)


@contextlib.contextmanager
def one_process_group(deepspeed: str | None) -> Iterator[None]:
    """Inside, an in-process run is rank 0 of a world of 1 (when it needs to be, see ``needs_own_group``).
    On the way out the group is closed and the variables are as before, so later nodes of the same
    ``kedro run`` (merge, evaluate) and later runs in this process start clean."""
    devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not needs_own_group(deepspeed, devices):
        yield
        return
    if devices > 1:
        logger.warning(
            "One training process on a host with %d GPUs: it uses cuda:0 only. To use all of them, run "
            "one process per GPU: train.nproc_per_node=%d (or NPROC_PER_NODE=%d)",
            devices,
            devices,
            devices,
        )
    before = {name: os.environ.get(name) for name in LAUNCH_VARIABLES + LEFT_BY_THE_TRAINER}
    os.environ.update(
        RANK="0",
        LOCAL_RANK="0",
        WORLD_SIZE="1",
        LOCAL_WORLD_SIZE="1",
        MASTER_ADDR=before["MASTER_ADDR"] or "127.0.0.1",
        MASTER_PORT=before["MASTER_PORT"] or str(free_port()),
    )
    try:
        yield
    finally:
        _close_group()
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _close_group() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    from accelerate.state import AcceleratorState
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate's singletons hold the old group
    # transformers' global DeepSpeed config outlives the run while anything holds the Trainer's arguments: a later
    # from_pretrained in this process (merge, evaluate) would build its model under ZeRO-3's zero.Init.
    unset_hf_deepspeed_config()
    if "deepspeed" in sys.modules:  # so do DeepSpeed's: its communication layer and its cached groups
        import deepspeed.comm.comm
        from deepspeed.utils import groups

        deepspeed.comm.comm.cdb = None
        for name, value in vars(groups).items():
            if name.startswith("_") and name.isupper() and isinstance(value, dict):
                value.clear()
            elif name.startswith("_") and name.isupper() and name.endswith(("_GROUP", "_SIZE", "_RANK")):
                setattr(groups, name, None)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def from_rank_zero(value: Any) -> Any:
    """Rank 0's ``value`` on every process (a decision only rank 0 can make, e.g. whether to resume: only it
    writes checkpoints). Every rank must call it; without a process group the value is returned as it is."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def max_over_ranks(value: int) -> int:
    """The largest ``value`` of all processes (every rank must call it)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return int(tensor.item())
