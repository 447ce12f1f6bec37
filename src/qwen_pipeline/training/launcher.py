"""Launch concerns only: run the recipe in this process, or in several under torchrun.

One process (the default) runs the recipe in-process. ``nproc_per_node > 1`` or ``nnodes > 1``
(or the environment variables NPROC_PER_NODE, NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT, as
LLaMA-Factory reads them) start the same recipe as ``torchrun ... -m qwen_pipeline.training WORK``:
the data and configs go through WORK, rank 0 writes the trained model back there, and the MLflow
run id is passed down so rank 0's metrics land in this Kedro run's MLflow run. A multi-node user
starts that same worker command on every other node (see the README).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from datasets import DatasetDict

from ..config import ModelConfig, TrainConfig
from ..errors import QwenPipelineError
from .recipe import TrainResult, run_sft

logger = logging.getLogger(__name__)


class TrainingError(QwenPipelineError, RuntimeError):
    """The distributed training workers failed."""


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


def train(dataset: DatasetDict, model_config: ModelConfig, config: TrainConfig) -> TrainResult:
    topology = Topology.from_config(config)
    if topology.world_size == 1:
        return run_sft(dataset, model_config, config)
    # Multi-node: put the work folder on storage every node sees (QWEN_PIPELINE_WORK_DIR).
    with tempfile.TemporaryDirectory(prefix="qwen-train-", dir=os.environ.get("QWEN_PIPELINE_WORK_DIR")) as tmp:
        work = Path(tmp)
        dataset.save_to_disk(str(work / "dataset"))
        (work / "config.json").write_text(
            json.dumps({"model": dataclasses.asdict(model_config), "train": dataclasses.asdict(config)})
        )
        command = topology.torchrun(work)
        logger.info("Launching %d training processes: %s", topology.world_size, " ".join(command))
        if topology.nnodes > 1:
            logger.info(
                "On each other node, with NODE_RANK set to its rank, run: %s",
                " ".join(
                    Topology(
                        topology.nproc_per_node, topology.nnodes, 0, topology.master_addr, topology.master_port
                    ).torchrun(work)
                ).replace("--node_rank=0", "--node_rank=$NODE_RANK"),
            )
        _stream(command, _child_environment())
        return _read_result(work, model_config)


def _child_environment() -> dict[str, str]:
    env = dict(os.environ)
    try:
        import mlflow

        if (run := mlflow.active_run()) is not None:  # rank 0 logs into this Kedro run's MLflow run
            env["MLFLOW_RUN_ID"] = run.info.run_id
            env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    except ImportError:  # pragma: no cover - mlflow is a dependency
        pass
    return env


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


def _read_result(work: Path, model_config: ModelConfig) -> TrainResult:
    from transformers import AutoModelForCausalLM

    from ..models import load_causal_lm, load_tokenizer

    result = json.loads((work / "result.json").read_text())
    tokenizer = load_tokenizer(str(work / "model"))
    if (work / "model" / "adapter_config.json").exists():
        from peft import PeftModel

        base = load_causal_lm(model_config.model_name_or_path, trust_remote_code=model_config.trust_remote_code)
        model = PeftModel.from_pretrained(base, str(work / "model"))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(work / "model"))
    return TrainResult(model=model, tokenizer=tokenizer, history=result["history"], summary=result["summary"])
