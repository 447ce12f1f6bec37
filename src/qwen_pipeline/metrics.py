"""Generation metrics as LLaMA-Factory reports them for SFT predictions.

Per example: ROUGE-1/2/L F1 (rouge-chinese) over jieba words joined by spaces, and sentence BLEU-4
(nltk) over characters with smoothing method 3; each x100 and rounded to 4 places, then averaged.
An empty prediction or label (no words) scores 0 on every ROUGE.
"""

from __future__ import annotations

import logging
from statistics import fmean

METRICS = ("bleu-4", "rouge-1", "rouge-2", "rouge-l")


def _cut(text: str) -> list[str]:
    import jieba

    jieba.setLogLevel(logging.WARNING)  # its dictionary-loading chatter
    return list(jieba.cut(text))


def example_scores(predict: str, label: str) -> dict[str, float]:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    from rouge_chinese import Rouge

    hypothesis, reference = " ".join(_cut(predict)), " ".join(_cut(label))
    if not hypothesis.split() or not reference.split():
        rouge = {key: 0.0 for key in METRICS[1:]}
    else:
        (scores,) = Rouge().get_scores(hypothesis, reference)
        rouge = {key: round(scores[key]["f"] * 100, 4) for key in METRICS[1:]}
    bleu = sentence_bleu([list(label)], list(predict), smoothing_function=SmoothingFunction().method3)
    return {"bleu-4": round(bleu * 100, 4), **rouge}


def similarity_scores(predicts: list[str], labels: list[str]) -> dict[str, float]:
    """Mean of each metric over the examples (an empty list gives an empty dict)."""
    if len(predicts) != len(labels):
        raise ValueError(f"{len(predicts)} predictions for {len(labels)} labels")
    per_example = [example_scores(predict, label) for predict, label in zip(predicts, labels)]
    return {key: fmean(s[key] for s in per_example) for key in METRICS} if per_example else {}
