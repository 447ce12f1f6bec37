"""The training worker torchrun starts on every process: ``python -m qwen_pipeline.training WORK``.

WORK holds ``dataset/`` (save_to_disk) and ``config.json``; rank 0 writes ``model/`` and
``result.json`` back. Multi-node users start this same command on each node (README).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from datasets import load_from_disk

from ..config import ModelConfig, TrainConfig, parse_config
from .recipe import run_sft


def main(work: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    configs = json.loads((work / "config.json").read_text())
    model_config = parse_config(ModelConfig, configs["model"], "model")
    config = parse_config(TrainConfig, configs["train"], "train")
    result = run_sft(load_from_disk(str(work / "dataset")), model_config, config, save_to=work / "model")
    if int(os.environ.get("RANK", "0")) == 0:  # rank-0-only work: write what the node reads back
        result.tokenizer.save_pretrained(str(work / "model"))
        (work / "result.json").write_text(json.dumps({"history": result.history, "summary": result.summary}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
