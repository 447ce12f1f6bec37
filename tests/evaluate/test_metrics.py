"""BLEU-4 and ROUGE as LLaMA-Factory computes them, against values worked out by hand.

ROUGE (rouge-chinese) counts *distinct* n-grams of the jieba words; ROUGE-L is the longest common
subsequence of words; each is an F1. BLEU-4 (nltk) is over characters, smoothing method 3 (a zero
n-gram precision becomes 1 / (2^k * hypothesis n-grams), k = 1, 2, ... in order), times the brevity
penalty exp(1 - ref/hyp) when the prediction is shorter.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qwen_pipeline.metrics import example_scores, similarity_scores


def f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r)


def test_identical_answers_score_100():
    assert example_scores("the cat sat", "the cat sat") == {
        "bleu-4": 100.0,
        "rouge-1": 100.0,
        "rouge-2": 100.0,
        "rouge-l": 100.0,
    }


def test_chinese_prediction_longer_than_label():
    # words: 我 爱 北京 天安门 vs 我 爱 北京; characters: 我爱北京天安门 (7) vs 我爱北京 (4)
    scores = example_scores("我爱北京天安门", "我爱北京")
    assert scores["rouge-1"] == round(100 * f1(3 / 4, 3 / 3), 4) == 85.7143
    assert scores["rouge-2"] == round(100 * f1(2 / 3, 2 / 2), 4) == 80.0  # {我爱, 爱北京} of 3 bigrams
    assert scores["rouge-l"] == 85.7143  # LCS 我 爱 北京 = 3 words
    # char n-gram precisions 4/7, 3/6, 2/5, 1/4; prediction longer: no brevity penalty
    assert scores["bleu-4"] == round(100 * (4 / 7 * 3 / 6 * 2 / 5 * 1 / 4) ** 0.25, 4) == 41.1134


def test_english_with_a_changed_word():
    scores = example_scores("the cat sat on the mat", "the cat is on the mat")
    # distinct words {the, cat, sat, on, mat} vs {the, cat, is, on, mat}: 4 shared of 5 each
    assert scores["rouge-1"] == 80.0
    # distinct bigrams: 5 each, shared {the cat, on the, the mat}
    assert scores["rouge-2"] == 60.0
    # LCS the cat on the mat: 5 of 6 words on both sides
    assert scores["rouge-l"] == round(100 * f1(5 / 6, 5 / 6), 4) == 83.3333


def test_no_shared_words_and_a_shorter_prediction():
    scores = example_scores("hello world", "goodbye moon")
    assert (scores["rouge-1"], scores["rouge-2"], scores["rouge-l"]) == (0.0, 0.0, 0.0)
    # characters: 1-grams e, o, o, ' ', d clipped-match 5 of 11; no 2-, 3-, 4-gram matches, so method 3
    # gives 1/(2*10), 1/(4*9), 1/(8*8); the prediction (11) is shorter than the label (12)
    expected = math.exp(1 - 12 / 11) * (5 / 11 * 1 / 20 * 1 / 36 * 1 / 64) ** 0.25
    assert scores["bleu-4"] == round(100 * expected, 4) == 5.1172


@pytest.mark.parametrize("predict, label", [("", "abc"), ("abc", ""), ("   ", "abc")])
def test_an_empty_side_scores_zero(predict, label):
    assert example_scores(predict, label) == {"bleu-4": 0.0, "rouge-1": 0.0, "rouge-2": 0.0, "rouge-l": 0.0}


def test_scores_are_averaged_over_examples():
    scores = similarity_scores(["我爱北京天安门", "the cat sat"], ["我爱北京", "the cat sat"])
    assert scores == pytest.approx(
        {"bleu-4": (41.1134 + 100) / 2, "rouge-1": (85.7143 + 100) / 2, "rouge-2": 90.0, "rouge-l": (85.7143 + 100) / 2}
    )
    assert similarity_scores([], []) == {}
    with pytest.raises(ValueError, match="2 predictions for 1 labels"):
        similarity_scores(["a", "b"], ["a"])


def test_same_scores_as_llamafactory_compute_similarity():
    """Golden values from LLaMA-Factory 0.9.5's ComputeSimilarity, one pair at a time
    (benchmarks/llamafactory_reference/make_metrics_golden.py)."""
    golden = json.loads((Path(__file__).parents[1] / "fixtures/parity/metrics_golden.json").read_text())
    assert len(golden) == 10
    for case in golden:
        assert example_scores(case["predict"], case["label"]) == case["scores"], case
