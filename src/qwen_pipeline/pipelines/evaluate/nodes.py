"""Evaluate: eval loss, perplexity and generation metrics on the validation split, for the fine-tuned
model and the base model it started from, side by side.

The models are loaded one at a time inside each node (the merged model from ``ModelFiles``, the base from
the ``base_model`` dataset), so the base and the fine-tuned model are never in memory together. The
evaluation itself is library code: ``qwen_pipeline.evaluation``.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import pandas as pd
import torch
from datasets import DatasetDict

from ...config import EvaluateConfig, parse_config
from ...datasets import BaseModel, ModelFiles, StageOutput
from ...errors import DataError
from ...evaluation import PREDICTION_COLUMNS, compare, evaluate
from ...models import load_causal_lm

logger = logging.getLogger(__name__)


def _validation(sft_dataset: DatasetDict | StageOutput):
    if isinstance(sft_dataset, StageOutput):  # the catalog's sft_dataset: the data with its settings
        sft_dataset = sft_dataset.data
    if "validation" not in sft_dataset:
        raise DataError("sft_dataset has no validation split: set format.val_size above 0 to evaluate")
    return sft_dataset["validation"]


def _load(name_or_path: str):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return load_causal_lm(name_or_path, dtype="float32" if device == "cpu" else "auto").to(device)


def evaluate_finetuned(
    merged_model: ModelFiles, sft_dataset: DatasetDict, params: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame]:
    config = parse_config(EvaluateConfig, params, "evaluate")
    validation = _validation(sft_dataset)
    model, tokenizer = _load(str(merged_model.path)), merged_model.load_tokenizer()
    result, predictions = evaluate(model, tokenizer, validation, config, label="(fine-tuned)")
    del model  # the base model is loaded next: never both in memory
    gc.collect()
    logger.info("Fine-tuned: eval loss %.4f, perplexity %.2f", result["eval_loss"], result["perplexity"])
    return {"model": str(merged_model.path), "registered_model": merged_model.registration, **result}, predictions


def evaluate_base(
    base_model: BaseModel, merged_model: ModelFiles, sft_dataset: DatasetDict, params: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame]:
    """The base model the fine-tune started from, on the same examples (skipped when compare_base is off)."""
    config = parse_config(EvaluateConfig, params, "evaluate")
    if not config.compare_base:
        return {}, pd.DataFrame(columns=PREDICTION_COLUMNS)
    base_model.check_made_from(merged_model.base_model, f"the merged model in {merged_model.path}")
    validation = _validation(sft_dataset)
    model, tokenizer = _load(base_model.name), base_model.load_tokenizer()
    result, predictions = evaluate(model, tokenizer, validation, config, label="(base)")
    del model
    gc.collect()
    logger.info("Base: eval loss %.4f, perplexity %.2f", result["eval_loss"], result["perplexity"])
    return {"model": base_model.name, **result}, predictions


def compare_evaluations(
    base_eval: dict[str, Any], finetuned_eval: dict[str, Any]
) -> tuple[dict[str, Any], pd.DataFrame, dict[str, Any]]:
    """Metrics <model>.<metric> for the model version evaluated (MLflow: eval.<model>.<metric> on the run and
    on that version), a table with one row per metric, and the full report."""
    rows = compare(base_eval, finetuned_eval)
    table = pd.DataFrame(rows, columns=["metric", "base", "finetuned", "change", "better"])
    logger.info("Base vs fine-tuned on the validation split:\n%s", table.to_string(index=False, float_format="%.2f"))
    metrics = {
        f"{name}.{row['metric']}": float(row[name])
        for row in rows
        for name in ("base", "finetuned")
        if row[name] is not None
    }
    report = {"base": base_eval, "finetuned": finetuned_eval, "comparison": rows}
    return {"model": finetuned_eval.get("registered_model"), "metrics": metrics}, table, report
