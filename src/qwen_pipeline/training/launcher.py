"""Launch concerns only: run the recipe in this process, or in several under torchrun.

One process (the default) runs the recipe in-process. ``nproc_per_node > 1`` or ``nnodes > 1``
(or the environment variables NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, as
LLaMA-Factory reads them) start the same recipe as ``torchrun ... -m qwen_pipeline.training WORK``:
the data and configs go through WORK (``write_work_folder`` / ``read_work_folder``), rank 0 writes
the trained model back there, and the MLflow run id is passed down so rank 0's metrics land in this
Kedro run's MLflow run. A multi-node user starts that same worker command on every other node
(see the README).

Either way the model ends up saved by the process that trained it, in a staging folder that the
``trained_model`` dataset moves into place: this process never loads it again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict

from ..config import ModelConfig, TrainConfig, parse_config
from ..data.streaming import table_files
from ..errors import QwenPipelineError
from ..tracking.workers import tracking_environment
from .recipe import TrainResult, run_sft

logger = logging.getLogger(__name__)


class TrainingError(QwenPipelineError, RuntimeError):
    """The distributed training workers failed."""


@dataclasses.dataclass(frozen=True)
class TrainedModel:
    """What training leaves behind: the saved model (not loaded), its loss history and summary."""

    path: Path  # model + tokenizer files, in a staging folder for the trained_model dataset to move
    kind: str  # "adapter" (PEFT) or "causal_lm" (full weights)
    history: list[dict[str, float]]
    summary: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Topology:
    nproc_per_node: int
    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes

    @classmethod
    def from_config(cls, config: TrainConfig, environ=os.environ) -> Topology:
        return cls(
            nproc_per_node=int(environ.get("NPROC_PER_NODE", config.nproc_per_node)),
            nnodes=int(environ.get("NNODES", config.nnodes)),
            node_rank=int(environ.get("NODE_RANK", 0)),
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(environ.get("MASTER_PORT", 29500)),
        )

    def torchrun(self, work: Path) -> list[str]:
        return [
            sys.executable, "-m", "torch.distributed.run",
            f"--nproc_per_node={self.nproc_per_node}", f"--nnodes={self.nnodes}", f"--node_rank={self.node_rank}",
            f"--master_addr={self.master_addr}", f"--master_port={self.master_port}",
            "-m", "qwen_pipeline.training", str(work),
        ]  # fmt: skip


def train(dataset: DatasetDict, model_config: ModelConfig, config: TrainConfig) -> TrainedModel:
    """Train in this process or under torchrun; the model comes back as a saved folder, never loaded here."""
    topology = Topology.from_config(config)
    # Absolute: a worker started from another folder (another node's working directory) checkpoints and
    # resumes in the same place rank 0 does.
    config = dataclasses.replace(config, output_dir=str(Path(config.output_dir).resolve()))
    root = work_root(config).resolve()  # absolute: the command logged for other nodes names it
    root.mkdir(parents=True, exist_ok=True)
    model_dir = Path(tempfile.mkdtemp(prefix=".qwen-trained-", dir=root))
    try:
        if topology.world_size == 1:  # already in memory here: the one process saves it like rank 0 would
            result = train_and_save(dataset, model_config, config, model_dir)
            history, summary = result.history, result.summary
            del result
            release_memory()  # merge or evaluate may load models next, in this same process
        else:
            history, summary = _run_workers(topology, dataset, model_config, config, model_dir)
    except BaseException:
        shutil.rmtree(model_dir, ignore_errors=True)
        raise
    kind = "adapter" if (model_dir / "adapter_config.json").is_file() else "causal_lm"
    return TrainedModel(path=model_dir, kind=kind, history=history, summary=summary)


def release_memory() -> None:
    """Give back what the trained model held: the Trainer's reference cycles keep it alive until collected,
    and PyTorch's caching allocator keeps freed GPU blocks for itself until emptied."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def work_root(config: TrainConfig) -> Path:
    """Where the work and staging folders go: QWEN_PIPELINE_WORK_DIR (multi-node: a folder every node
    sees), else beside the checkpoints, on the project's storage, so moving the model into
    data/06_models is a rename rather than a copy of its weights."""
    return Path(os.environ.get("QWEN_PIPELINE_WORK_DIR") or config.output_dir)


def train_and_save(
    dataset: DatasetDict, model_config: ModelConfig, config: TrainConfig, model_dir: Path
) -> TrainResult:
    """The recipe, writing the model and tokenizer to ``model_dir`` (rank 0; every rank must call it)."""
    result = run_sft(dataset, model_config, config, save_to=model_dir)
    if int(os.environ.get("RANK", "0")) == 0:
        result.tokenizer.save_pretrained(str(model_dir))
        # The Trainer's pickled arguments: the manifest records the config readably, without a pickle.
        (model_dir / "training_args.bin").unlink(missing_ok=True)
    return result


def _run_workers(
    topology: Topology, dataset: DatasetDict, model_config: ModelConfig, config: TrainConfig, model_dir: Path
) -> tuple[list[dict[str, float]], dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix=".qwen-train-", dir=model_dir.parent) as tmp:
        work = Path(tmp)
        # Other nodes are only promised the work folder, not the dataset's own files: copy for them.
        write_work_folder(work, dataset, model_config, config, copy_data=topology.nnodes > 1)
        command = topology.torchrun(work)
        logger.info("Launching %d training processes: %s", topology.world_size, " ".join(command))
        if topology.nnodes > 1:
            if "QWEN_PIPELINE_WORK_DIR" not in os.environ:
                logger.warning("QWEN_PIPELINE_WORK_DIR is not set: every node must see %s", work)
            other = dataclasses.replace(topology, node_rank=0).torchrun(work)
            logger.info(
                "On each other node, with NODE_RANK set to its rank, run: %s",
                " ".join(other).replace("--node_rank=0", "--node_rank=$NODE_RANK"),
            )
        _stream(command, _child_environment())
        result = json.loads((work / "result.json").read_text())
        os.replace(work / "model", model_dir)  # same folder tree: a rename onto the empty staging folder
    return result["history"], result["summary"]


def write_work_folder(
    work: Path, dataset: DatasetDict, model_config: ModelConfig, config: TrainConfig, *, copy_data: bool = False
) -> None:
    """WORK for the workers: config.json, and each split as the Arrow files (and row order) it already
    lives in, or (in memory, changed since read, or ``copy_data``) a copy in WORK/dataset."""
    files = {name: None if copy_data else _arrow_files(split) for name, split in dataset.items()}
    copied = [name for name, paths in files.items() if paths is None]
    if copied:
        DatasetDict({name: dataset[name] for name in copied}).save_to_disk(str(work / "dataset"))
    handoff = {"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config), "dataset": files}
    (work / "config.json").write_text(json.dumps(handoff, indent=2))


def read_work_folder(work: Path) -> tuple[DatasetDict, ModelConfig, TrainConfig]:
    """The worker's side of ``write_work_folder``."""
    from datasets import concatenate_datasets, load_from_disk
    from datasets.table import MemoryMappedTable

    def split(paths: dict[str, Any]) -> Dataset:
        data = concatenate_datasets([Dataset.from_file(p) for p in paths["files"]])
        if paths["indices"] is None:
            return data
        return Dataset(data.data, indices_table=MemoryMappedTable.from_file(paths["indices"]))

    handoff = json.loads((work / "config.json").read_text())
    copied = load_from_disk(str(work / "dataset")) if (work / "dataset").is_dir() else {}
    dataset = DatasetDict(
        {name: copied[name] if paths is None else split(paths) for name, paths in handoff["dataset"].items()}
    )
    model_config = parse_config(ModelConfig, handoff["model"], "model")
    return dataset, model_config, parse_config(TrainConfig, handoff["train"], "train")


def _arrow_files(split: Dataset) -> dict[str, Any] | None:
    """The Arrow files whose rows are this split's, and the file of its row order (an indices mapping),
    or None when it is not exactly that (in memory, a column added, a recorded select or cast)."""
    from datasets.table import MemoryMappedTable

    files = table_files(split.data)
    indices = split._indices
    if files is None or not (indices is None or (isinstance(indices, MemoryMappedTable) and not indices.replays)):
        return None
    return {
        "files": [str(Path(f).resolve()) for f in files],
        "indices": None if indices is None else str(Path(indices.path).resolve()),
    }


def _child_environment() -> dict[str, str]:
    return {**os.environ, **tracking_environment()}  # rank 0 logs live metrics into this Kedro run's MLflow run


def _stream(command: list[str], env: dict[str, str]) -> None:
    """Run the workers, their output going line by line into the Kedro log; fail clearly."""
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    tail: list[str] = []
    for line in process.stdout:
        line = line.rstrip()
        logger.info("[torchrun] %s", line)
        tail = (tail + [line])[-20:]
    if (code := process.wait()) != 0:
        raise TrainingError(f"torchrun exited with code {code}; the last lines of its workers:\n  " + "\n  ".join(tail))
