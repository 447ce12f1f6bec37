"""Run by tests/test_distributed.py under torchrun: the recipe's set-up and model load under ZeRO-3, then this
process's resident memory (before and at its peak) and the bytes of weights it holds, as JSON on stdout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from qwen_pipeline.config import ModelConfig, TrainConfig
from qwen_pipeline.training import recipe
from qwen_pipeline.training.ranks import rank


def resident() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main(model_dir: str, deepspeed: str, out: str) -> None:
    config = TrainConfig(deepspeed=deepspeed, output_dir=str(Path(out) / "ckpt"))
    args = recipe.training_arguments(config, Path(out) / "ckpt")  # as the recipe: arguments, then the model
    before = resident()
    model = recipe.load_model(ModelConfig(model_name_or_path=model_dir), config)
    held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in model.parameters())
    result = {"rank": rank(), "rss_before": before, "peak_rss": recipe.peak_rss_bytes(), "weights_held": held}
    Path(out, f"rank{rank()}.json").write_text(json.dumps(result))
    del model, args


if __name__ == "__main__":
    main(*sys.argv[1:])
