"""Where one training process runs (device, processes per node, ZeRO stage and offload, read from the DeepSpeed
config) and how much memory it may use there."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import TrainConfig
from ..errors import QwenPipelineError
from .host_memory import resident_bytes
from .recipe import zero_optimization


class MemoryPlanError(QwenPipelineError, MemoryError):
    """A run whose memory plan does not fit the devices (train.memory_check: error)."""


@dataclass(frozen=True)
class Placement:
    device: str  # "cuda" or "cpu"
    world_size: int
    procs_per_node: int
    zero_stage: int  # 0 = no DeepSpeed / ZeRO-0
    offload_optimizer: bool
    offload_param: bool
    deepspeed: bool = False  # a DeepSpeed config is used (ZeRO-0 included): weights in c, DeepSpeed's optimizer
    zero: dict[str, Any] = field(default_factory=dict, compare=False)  # the JSON's zero_optimization block


def placement_for(config: TrainConfig, *, world_size: int, procs_per_node: int, cuda: bool) -> Placement:
    """Where training runs, read from ``config.deepspeed``'s JSON (zero_optimization)."""
    zero: dict[str, Any] = {}
    if config.deepspeed:
        try:
            zero = zero_optimization(config)
        except (OSError, ValueError) as error:
            raise MemoryPlanError(f"train.deepspeed={config.deepspeed}: cannot read it ({error})") from error

    def offloaded(key: str) -> bool:
        return (zero.get(key) or {}).get("device", "none") == "cpu"

    return Placement(
        device="cuda" if cuda else "cpu",
        world_size=world_size,
        procs_per_node=procs_per_node,
        zero_stage=int(zero.get("stage", 0)),
        offload_optimizer=offloaded("offload_optimizer"),
        offload_param=offloaded("offload_param"),
        deepspeed=bool(config.deepspeed),
        zero=zero,
    )


def _meminfo(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise MemoryPlanError(f"/proc/meminfo has no {key}: cannot tell how much memory is free (train.memory_check=off)")


def host_memory(placement: Placement) -> int:
    """Host RAM one process may use: MemAvailable shared by the node's processes."""
    return _meminfo("MemAvailable") // max(placement.procs_per_node, 1)


def available_memory(placement: Placement) -> int:
    """Bytes one process may use on its device: the smallest free memory over the visible GPUs, or on CPU
    MemAvailable shared by the node's processes (plus this process's own resident memory when it is the one
    that trains, since the plan counts that as overhead)."""
    if placement.device == "cuda":
        import torch

        return min(torch.cuda.mem_get_info(d)[0] for d in range(torch.cuda.device_count()))
    own = resident_bytes() if placement.procs_per_node == 1 else 0
    return host_memory(placement) + own
