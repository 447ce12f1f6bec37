"""Merge: fold the adapter into the base weights, export them, and prove the logits did not change.

Three steps, so the check's report is saved even when the check fails: ``merge_adapter`` writes the
merged model into a staging directory beside the trained one (tensor by tensor: a 7B merge needs one
tensor in memory, not the model); ``check_merged_model`` compares its logits with base+adapter;
``publish_merged_model`` hands the directory to the ``merged_model`` dataset (renamed into place, so it
appears only when complete) or, if the check failed, deletes it and fails.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ...config import MergeConfig, parse_config
from ...datasets import BaseModel, ModelFiles
from ...errors import QwenPipelineError
from ...merging import check_export, export_merged, resolve_device

logger = logging.getLogger(__name__)

STAGING_PREFIX = ".merge-staging-"


class MergeCheckError(QwenPipelineError):
    """The merged model does not compute what base + adapter computes."""


def _sources(trained: ModelFiles, base_model: BaseModel) -> tuple[Path, Path | None]:
    """The full weights to start from, and the adapter to merge into them (None: already whole)."""
    if trained.kind == "adapter":
        base_model.check_made_from(trained.base_model, f"the adapter in {trained.path}")
        return base_model.local_dir(), trained.path
    return trained.path, None


def merge_adapter(trained_model: ModelFiles, base_model: BaseModel, params: dict[str, Any]) -> ModelFiles:
    """The adapter merged into its (unquantized) base, written to a staging directory."""
    config = parse_config(MergeConfig, params, "merge")
    device = resolve_device(config.export_device)
    weights_dir, adapter_dir = _sources(trained_model, base_model)
    parent = trained_model.path.parent
    for stale in parent.glob(STAGING_PREFIX + "*"):  # left by an interrupted merge
        logger.info("Removing %s, left by an interrupted merge", stale)
        shutil.rmtree(stale, ignore_errors=True)
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=parent))
    try:
        done = export_merged(
            weights_dir,
            adapter_dir,
            staging,
            trained_model.path,  # the trained model's tokenizer files
            dtype=config.export_dtype,
            shard_bytes=int(config.export_size * 10**9),
            legacy=config.export_legacy_format,
            method=config.method,
            device=device,
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    logger.info(
        "Merged %s into %s (%s, %s): %d file(s), %.1f MB",
        adapter_dir or "nothing (full weights)",
        weights_dir,
        done["method"],
        done["export_dtype"],
        len(done["files"]),
        done["total_bytes"] / 1e6,
    )
    source = {k: v for k, v in trained_model.manifest.items() if k not in ("kind", "base_model")}
    merge = {
        "weights": str(weights_dir),
        "adapter": str(adapter_dir) if adapter_dir else None,
        **done,
        "config": dataclasses.asdict(config),  # resolved, defaults included
    }
    manifest = {"kind": "causal_lm", "base_model": trained_model.base_model, "training_source": source, "merge": merge}
    return ModelFiles(path=staging, manifest=manifest)


def check_merged_model(merge_staged: ModelFiles, params: dict[str, Any]) -> dict[str, Any]:
    """Logits of the staged model vs base+adapter on fixed chat inputs; the merge report."""
    config = parse_config(MergeConfig, params, "merge")
    from tokenizers import Tokenizer

    merge = merge_staged.manifest["merge"]
    tokenizer = Tokenizer.from_file(str(merge_staged.path / "tokenizer.json"))
    inputs = [tokenizer.encode(text, add_special_tokens=False).ids for text in config.check_texts]
    del tokenizer  # not needed while the models run
    result = check_export(
        Path(merge["weights"]),
        Path(merge["adapter"]) if merge["adapter"] else None,
        merge_staged.path,
        inputs,
        tolerance=config.check_tolerance,
        dtype=getattr(torch, merge["export_dtype"]),
        device=resolve_device(config.export_device),
    )
    check = {
        "passed": result.passed,
        "max_abs_logit_diff": result.max_abs_logit_diff,
        "tolerance": result.tolerance,
        "top1_agreement": result.top1_agreement,
        "tokens": result.tokens,
    }
    logger.info(
        "Merge check %s: max |logit diff| %.3g (tolerance %.3g), top-1 agreement %.4f over %d tokens",
        "passed" if result.passed else "FAILED",
        result.max_abs_logit_diff,
        result.tolerance,
        result.top1_agreement,
        result.tokens,
    )
    return {"base_model": merge_staged.base_model, **merge, "check": check}


def publish_merged_model(merge_staged: ModelFiles, merge_report: dict[str, Any]) -> ModelFiles:
    """The checked model, to be moved into place by the dataset; a failed check deletes it and fails."""
    check = merge_report["check"]
    if not check["passed"]:
        shutil.rmtree(merge_staged.path, ignore_errors=True)
        raise MergeCheckError(
            f"merged model disagrees with base+adapter: max |logit diff| {check['max_abs_logit_diff']:.3g} > "
            f"tolerance {check['tolerance']:.3g} (top-1 agreement {check['top1_agreement']:.3f}); "
            "nothing was published; the numbers are in the merge report"
        )
    manifest = {**merge_staged.manifest, "merge": {**merge_staged.manifest["merge"], "check": check}}
    return ModelFiles(path=merge_staged.path, manifest=manifest)


def merge_check_metrics(merge_report: dict[str, Any]) -> dict[str, Any]:
    """The logit check as MLflow metrics (merge_check.<name>), beside the report's JSON."""
    check = merge_report["check"]
    values = {key: float(check[key]) for key in ("max_abs_logit_diff", "tolerance", "top1_agreement", "tokens")}
    return {key: {"value": value, "step": 0} for key, value in {**values, "passed": float(check["passed"])}.items()}
