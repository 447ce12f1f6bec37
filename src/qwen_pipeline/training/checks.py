"""Checks of a training config against this machine, run before any model is loaded."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import torch

from ..config import TrainConfig
from .recipe import zero_stage


def environment_problems(config: TrainConfig, *, cuda: bool | None = None, environ=os.environ) -> list[str]:
    """Every reason this config cannot train here, each naming its key (empty when it can)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    found = []
    if config.flash_attn == "fa2":
        if not cuda:
            found.append("train.flash_attn: fa2 needs a CUDA GPU and none is visible (use sdpa or auto)")
        if importlib.util.find_spec("flash_attn") is None:
            found.append("train.flash_attn: fa2 needs the flash-attn package (pip install -e '.[gpu]')")
    if config.bf16 and cuda and not torch.cuda.is_bf16_supported():
        found.append("train.bf16: this GPU does not support bf16 (use fp16)")
    if config.fp16 and not cuda:
        found.append("train.fp16: fp16 mixed precision needs a CUDA GPU (on CPU use bf16 or neither)")
    if config.quantization_bit and importlib.util.find_spec("bitsandbytes") is None:
        found.append("train.quantization_bit: QLoRA needs the bitsandbytes package")
    if config.deepspeed:
        path = Path(config.deepspeed)
        if not path.is_file():
            found.append(f"train.deepspeed: no DeepSpeed config at {path}")
        else:
            try:
                stage = zero_stage(config)
            except json.JSONDecodeError as exc:
                found.append(f"train.deepspeed: {path} is not valid JSON (line {exc.lineno}: {exc.msg})")
                stage = 0
            if stage == 3 and config.quantization_bit == 8:
                found.append(
                    "train.deepspeed: ZeRO-3 cannot shard 8-bit quantized weights (use quantization_bit 4 or ZeRO-2)"
                )
            processes = int(environ.get("NPROC_PER_NODE", config.nproc_per_node)) * int(
                environ.get("NNODES", config.nnodes)
            )
            if stage == 3 and processes > 1 and config.generation_eval.samples:
                found.append(
                    "train.generation_eval: answers while training are not supported under ZeRO-3 with several "
                    "processes yet (each rank holds a shard; generate would need every rank in step): set "
                    "generation_eval.samples: 0, or use ZeRO-2"
                )
        if importlib.util.find_spec("deepspeed") is None:
            found.append("train.deepspeed: needs the deepspeed package")
    nnodes = int(environ.get("NNODES", config.nnodes))
    if nnodes > 1 and not environ.get("MASTER_ADDR"):
        found.append(
            f"train.nnodes={nnodes}: set MASTER_ADDR to an address of node 0 that every node can reach "
            "(without it each node would look for rank 0 at 127.0.0.1, itself)"
        )
    return found
