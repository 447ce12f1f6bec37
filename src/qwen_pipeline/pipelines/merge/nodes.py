"""Merge: fold the LoRA adapter into the base weights and prove the logits did not change."""

from __future__ import annotations

import logging
from typing import Any

import torch

from ...config import MergeConfig, parse_config
from ...datasets import ModelBundle

logger = logging.getLogger(__name__)


@torch.no_grad()
def _logits(model, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def merge_adapter(trained_model: ModelBundle, params: dict[str, Any]) -> tuple[ModelBundle, dict[str, Any]]:
    """Merge and unload the adapter; fail if merged logits differ from base+adapter logits."""
    config = parse_config(MergeConfig, params, "merge")
    model, tokenizer = trained_model.model, trained_model.tokenizer
    model.eval()
    from peft import PeftModel

    if not isinstance(model, PeftModel):  # full or freeze fine-tuning: the weights are already whole
        logger.info(
            "Nothing to merge: %s fine-tuning trained the weights themselves", trained_model.info.get("finetuning_type")
        )
        report = {
            "base_model": trained_model.base_model,
            "merged": False,
            "passed": True,
            "parameters": sum(p.numel() for p in model.parameters()),
        }
        return ModelBundle(
            model=model,
            tokenizer=tokenizer,
            base_model=trained_model.base_model,
            info={**trained_model.info, "merge": report},
        ), report
    input_ids = torch.tensor([tokenizer(config.check_text, add_special_tokens=False)["input_ids"]])
    before = _logits(model, input_ids)
    merged = model.merge_and_unload()
    after = _logits(merged, input_ids)
    max_diff = float((before - after).abs().max())
    report = {
        "base_model": trained_model.base_model,
        "check_tokens": int(input_ids.shape[1]),
        "max_abs_logit_diff": max_diff,
        "tolerance": config.check_tolerance,
        "passed": max_diff <= config.check_tolerance,
        "parameters": sum(p.numel() for p in merged.parameters()),
    }
    if not report["passed"]:
        raise ValueError(
            f"merged model disagrees with base+adapter: max |logit diff| {max_diff:.3g} > "
            f"merge.check_tolerance={config.check_tolerance}"
        )
    logger.info("Merged adapter into %s: max |logit diff| %.3g", trained_model.base_model, max_diff)
    # A merged model must stop at <|im_end|> as well as the base model's own eos.
    eos = merged.generation_config.eos_token_id
    eos = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    for token_id in (tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")):
        if token_id is not None and token_id not in eos:
            eos.append(token_id)
    merged.generation_config.eos_token_id = eos
    merged.generation_config.pad_token_id = tokenizer.pad_token_id
    info = {**trained_model.info, "merge": report}
    return ModelBundle(model=merged, tokenizer=tokenizer, base_model=trained_model.base_model, info=info), report
