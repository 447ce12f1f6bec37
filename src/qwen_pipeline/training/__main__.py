"""The training worker torchrun starts on every process: ``python -m qwen_pipeline.training WORK``.

WORK holds ``config.json`` and the dataset (``launcher.write_work_folder``); rank 0 writes ``model/``
(weights or adapter, and tokenizer) and ``result.json`` back. Multi-node users start this same
command on each node (README).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from ..quiet import install_warning_filters
from .launcher import read_work_folder, train_and_save


def main(work: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    install_warning_filters()  # conf/warnings.yml, as in the kedro run that started this worker
    dataset, model_config, config = read_work_folder(work)
    result = train_and_save(dataset, model_config, config, work / "model")
    if int(os.environ.get("RANK", "0")) == 0:  # rank-0-only work: what the launcher reads back
        (work / "result.json").write_text(json.dumps({"history": result.history, "summary": result.summary}))
    _leave_process_group()


def _leave_process_group() -> None:
    """Every rank waits for the others, then closes the process group before the interpreter exits:
    left to exit-time destructors, a rank's communication threads were seen to abort it (SIGABRT)
    after training had finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
