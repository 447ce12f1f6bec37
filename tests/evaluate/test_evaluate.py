"""Evaluate: eval loss, batched greedy generation, the base-vs-fine-tuned table."""

from __future__ import annotations

import math

import pytest
import torch
from datasets import Dataset, DatasetDict
from helpers import base_model_of, demo_examples

from qwen_pipeline.config import EvaluateConfig
from qwen_pipeline.datasets import ModelBundle, ModelDataset, ModelFiles
from qwen_pipeline.errors import DataError
from qwen_pipeline.evaluation import eval_loss, generate, split_prompt_answer
from qwen_pipeline.models import EMBEDDED_MODEL, load_causal_lm
from qwen_pipeline.pipelines.evaluate.nodes import (
    compare_evaluations,
    evaluate_base,
    evaluate_finetuned,
)
from qwen_pipeline.template import IGNORE_INDEX


@pytest.fixture(scope="module")
def validation(tokenizer):
    return demo_examples(tokenizer, max_samples=6)


@pytest.fixture(scope="module")
def merged(tmp_path_factory, tokenizer):
    """A 'fine-tuned' model: the embedded one with its final norm scaled, saved as the merge stage does."""
    model = load_causal_lm(EMBEDDED_MODEL)
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    dataset = ModelDataset(filepath=str(tmp_path_factory.mktemp("eval") / "merged"), lazy=True)
    dataset.save(ModelBundle(model=model, tokenizer=tokenizer, base_model=EMBEDDED_MODEL))
    return dataset.load()


def test_split_prompt_answer_takes_the_last_labelled_span():
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    labels = [IGNORE_INDEX, IGNORE_INDEX, 3, 4, IGNORE_INDEX, IGNORE_INDEX, 7, 8]
    assert split_prompt_answer(ids, labels) == ([1, 2, 3, 4, 5, 6], [7, 8])


def test_eval_loss_is_token_weighted_and_batch_size_free(validation):
    model = load_causal_lm(EMBEDDED_MODEL).eval()
    one, tokens = eval_loss(model, validation, batch_size=1)
    three, tokens3 = eval_loss(model, validation, batch_size=3)
    assert tokens == tokens3 == sum(sum(x != IGNORE_INDEX for x in row[1:]) for row in validation["labels"])
    assert one == pytest.approx(three, rel=1e-5)
    row = validation[0]  # by hand for one example
    with torch.no_grad():
        logits = model(torch.tensor([row["input_ids"]])).logits[0, :-1]
    target = torch.tensor(row["labels"][1:])
    mask = target != IGNORE_INDEX
    expected = torch.nn.functional.cross_entropy(logits[mask], target[mask])
    assert eval_loss(model, validation.select([0]), 1)[0] == pytest.approx(float(expected), rel=1e-5)


def full_logits_eval_loss(model, examples, batch_size: int) -> tuple[float, int]:
    """The eval_loss this replaced: logits at every position, upcast, cross-entropy over the labelled ones."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        width = max(len(r) for r in batch["input_ids"])
        input_ids, attention, labels = (
            torch.tensor([r + [pad] * (width - len(r)) for r in batch[name]])
            for name, pad in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE_INDEX))
        )
        with torch.no_grad():
            logits = model(input_ids=input_ids, attention_mask=attention).logits[:, :-1].float()
        target = labels[:, 1:]
        total += float(
            torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), target.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            )
        )
        count += int((target != IGNORE_INDEX).sum())
    return total / count, count


def test_eval_loss_equals_the_full_logits_loss_with_the_head_in_chunks(embedded_dir):
    """Three random sequences of 300, 250 and 200 tokens, labelled after their first 20: 690 labelled
    positions in a batch of 3, so the head runs on 512 of them, then 178, never on batch x length rows."""
    model = load_causal_lm(EMBEDDED_MODEL).eval()
    generator = torch.Generator().manual_seed(0)
    rows = []
    for n in (300, 250, 200):
        ids = torch.randint(0, 151_643, (n,), generator=generator).tolist()
        rows.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [IGNORE_INDEX] * 20 + ids[20:]})
    examples = Dataset.from_list(rows)
    expected, expected_tokens = full_logits_eval_loss(model, examples, 3)
    shapes = []
    model.lm_head.register_forward_hook(lambda module, args, output: shapes.append(tuple(output.shape)))
    loss, tokens = eval_loss(model, examples, batch_size=3)
    assert tokens == expected_tokens == 280 + 230 + 180
    assert loss == pytest.approx(expected, rel=1e-5)
    assert shapes == [(512, 151_936), (178, 151_936)]
    loss, tokens = eval_loss(model, examples, batch_size=2)  # padded batches
    assert tokens == 690 and loss == pytest.approx(expected, rel=1e-5)


def test_batched_left_padded_generation_equals_one_by_one(validation, tokenizer):
    model = load_causal_lm(EMBEDDED_MODEL).eval()
    prompts = [split_prompt_answer(r["input_ids"], r["labels"])[0] for r in validation.select(range(3))]
    assert len({len(p) for p in prompts}) == 3  # different lengths: padding matters
    config = EvaluateConfig(max_new_tokens=6)
    batched = generate(model, tokenizer, prompts, config)
    alone = [generate(model, tokenizer, [p], config)[0] for p in prompts]
    assert batched == alone and all(len(x) == 6 for x in batched)


def test_evaluate_nodes_and_the_comparison(merged, validation, tokenizer):
    data = DatasetDict({"train": validation, "validation": validation})
    params = {"batch_size": 4, "max_samples": 3, "max_new_tokens": 5}
    version = {"registered_model_name": "qwen_pipeline_merged", "version": "3", "model_id": "m-1"}
    registered = ModelFiles(path=merged.path, manifest={**merged.manifest, "mlflow_model": version})
    tuned, predictions = evaluate_finetuned(registered, data, params)
    base, base_predictions = evaluate_base(base_model_of(), merged, data, params)
    assert list(predictions.columns) == ["prompt", "predict", "label"] and len(predictions) == 3
    assert list(predictions["prompt"]) == list(base_predictions["prompt"])
    first = split_prompt_answer(validation[0]["input_ids"], validation[0]["labels"])
    assert predictions["prompt"][0] == tokenizer.decode(first[0])
    assert predictions["label"][0] == tokenizer.decode(first[1], skip_special_tokens=True)
    assert tuned["eval_loss"] != base["eval_loss"] and tuned["generated"] == 3 and tuned["examples"] == 6
    assert tuned["perplexity"] == pytest.approx(math.exp(tuned["eval_loss"]))
    assert base["model"] == EMBEDDED_MODEL and tuned["model"] == str(merged.path)

    metrics, table, report = compare_evaluations(base, tuned)
    assert list(table["metric"]) == ["eval_loss", "perplexity", "bleu-4", "rouge-1", "rouge-2", "rouge-l"]
    loss = table.set_index("metric").loc["eval_loss"]
    assert loss["change"] == pytest.approx(tuned["eval_loss"] - base["eval_loss"])
    assert (loss["base"], loss["finetuned"]) == (base["eval_loss"], tuned["eval_loss"])  # "better": the test below
    assert metrics["model"] == tuned["registered_model"] == version  # the model version evaluated
    assert merged.registration is None  # a model not registered: no version to attach the metrics to
    assert metrics["metrics"]["finetuned.eval_loss"] == tuned["eval_loss"]
    assert set(metrics["metrics"]) == {f"{m}.{k}" for m in ("base", "finetuned") for k in table["metric"]}
    assert report["comparison"][0]["metric"] == "eval_loss"


def test_better_means_lower_loss_and_higher_scores():
    base = {"eval_loss": 2.0, "perplexity": 7.4, "bleu-4": 10.0, "rouge-1": 5.0, "rouge-2": 1.0, "rouge-l": 4.0}
    tuned = {"eval_loss": 1.0, "perplexity": 2.7, "bleu-4": 12.0, "rouge-1": 5.0, "rouge-2": 0.5, "rouge-l": 4.5}
    _, table, _ = compare_evaluations(base, tuned)
    assert list(table["better"]) == ["finetuned", "finetuned", "finetuned", "same", "base", "finetuned"]
    _, alone, _ = compare_evaluations({}, tuned)  # compare_base: false
    assert alone["base"].isna().all() and alone["better"].isna().all()


def test_base_evaluation_can_be_switched_off_and_a_missing_split_is_named(merged, validation):
    result, predictions = evaluate_base(
        base_model_of(), merged, DatasetDict({"validation": validation}), {"compare_base": False}
    )
    assert result == {} and predictions.empty and list(predictions.columns) == ["prompt", "predict", "label"]
    with pytest.raises(DataError, match="no validation split: set format.val_size above 0"):
        evaluate_finetuned(merged, DatasetDict({"train": validation}), {})
