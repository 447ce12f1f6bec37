"""Run by tests/runs/test_distributed.py under torchrun: the recipe's set-up and model load under ZeRO-3, then this
process's memory (before and at its peak, sampled every 5 ms while it loads: anonymous memory, which the process
owns, and mapped file pages, the page cache of the checkpoint) and the bytes of weights it holds, as JSON."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path

from qwen_pipeline.config import ModelConfig, TrainConfig
from qwen_pipeline.training import recipe
from qwen_pipeline.training.ranks import rank

KINDS = ("RssAnon", "RssFile")


def resident() -> dict[str, int]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return {kind: int(fields[kind].split()[0]) * 1024 for kind in KINDS}


def main(model_dir: str, deepspeed: str, out: str) -> None:
    config = TrainConfig(deepspeed=deepspeed, output_dir=str(Path(out) / "ckpt"))
    args = recipe.training_arguments(config, Path(out) / "ckpt")  # as the recipe: arguments, then the model
    before = resident()
    peak = dict(before)
    loading = True

    def sample() -> None:
        while loading:
            for kind, value in resident().items():
                peak[kind] = max(peak[kind], value)
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        model = recipe.load_model(ModelConfig(model_name_or_path=model_dir), config)
    finally:
        loading = False
        sampler.join()
    held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size() for p in model.parameters())
    grown = {kind: peak[kind] - before[kind] for kind in KINDS}
    Path(out, f"rank{rank()}.json").write_text(json.dumps({"rank": rank(), "grown": grown, "weights_held": held}))
    del model, args


if __name__ == "__main__":
    main(*sys.argv[1:])
