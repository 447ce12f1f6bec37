"""Where a run's checkpoints go and whether it resumes: one folder per (data, model, settings), keyed by a hash
of the token ids themselves, resumed from its newest complete checkpoint as rank 0 decides."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import shutil
from pathlib import Path

from ..config import ModelConfig, TrainConfig
from .packing import row_lengths

logger = logging.getLogger(__name__)


def checkpoint_dir(fingerprint: str, model_config: ModelConfig, config: TrainConfig) -> Path:
    """One checkpoint folder per (data fingerprint, model, hyperparameters): a rerun of the same command
    resumes; a changed one starts fresh instead of resuming someone else's optimizer state."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("overwrite_output_dir", "output_dir")}
    key = json.dumps([fingerprint, dataclasses.asdict(model_config), settings], sort_keys=True)
    return Path(config.output_dir) / hashlib.sha256(key.encode()).hexdigest()[:16]


def data_fingerprint(split) -> str:
    """Hash of the token ids and labels themselves (HF's own fingerprints differ between equal datasets):
    per column, the offsets of the lists, then every value as int64, streamed an Arrow chunk at a time."""
    import numpy as np
    import pyarrow as pa

    digest = hashlib.sha256()
    for name in ("input_ids", "labels"):
        offsets = np.concatenate([[0], np.cumsum(row_lengths(split, name))])
        large = pa.types.is_large_list(split.data.table.column(name).type)
        digest.update(offsets.astype(np.int64 if large else np.int32).tobytes())
        # In row order, through an indices mapping if there is one (a split stored as an order over shared
        # files): nothing is copied to a flattened file first.
        for batch in split.select_columns([name]).with_format("arrow").iter(batch_size=1 << 16):
            for chunk in batch.column(0).chunks:
                digest.update(np.asarray(chunk.flatten()).astype(np.int64).tobytes())
    return digest.hexdigest()


def last_complete_checkpoint(run_dir: Path) -> str | None:
    """The newest checkpoint with its trainer state written (the Trainer writes that last), if any,
    unless the run it belongs to had already finished (then a rerun trains anew)."""
    complete = [p for p in run_dir.glob("checkpoint-*") if (p / "trainer_state.json").is_file()]
    if not complete:
        return None
    newest = max(complete, key=lambda p: int(p.name.rsplit("-", 1)[-1]))
    state = json.loads((newest / "trainer_state.json").read_text())
    return None if state.get("global_step", 0) >= state.get("max_steps", 0) > 0 else str(newest)


def resume_point(run_dir: Path, config: TrainConfig) -> str | None:
    """Rank 0 decides whether to resume and every process follows: only rank 0 writes checkpoints, so a
    process on another node, looking at its own disk, could see none and start fresh while rank 0 resumes."""
    from .ranks import from_rank_zero, is_rank_zero

    resume = None
    if is_rank_zero():
        resume = None if config.overwrite_output_dir else last_complete_checkpoint(run_dir)
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # start over: no complete checkpoint, or asked to
    resume = from_rank_zero(resume)
    if resume:
        logger.info("Resuming from %s (train.overwrite_output_dir: true starts over)", resume)
    return resume
