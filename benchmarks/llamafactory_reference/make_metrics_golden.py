"""Golden BLEU-4 / ROUGE values from LLaMA-Factory 0.9.5's own `ComputeSimilarity` (run in its venv).

Each (predict, label) pair is encoded with the embedded tokenizer, handed to ComputeSimilarity as token ids
(as the Trainer does after generation), and its scores written out; tests/evaluate/test_metrics.py checks that ours
are the same. Needs jieba, rouge-chinese and nltk in the LLaMA-Factory venv.

    PYTHONPATH=/tmp/lfstub /tmp/lfvenv/bin/python benchmarks/llamafactory_reference/make_metrics_golden.py \
      --tokenizer "$(.venv/bin/python -c 'from qwen_pipeline.embedded import ensure_embedded_model as e; print(e())')" \
      --out tests/fixtures/parity/metrics_golden.json
"""

from __future__ import annotations

import argparse
import json

PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("我爱北京天安门", "我爱北京"),
    ("hello world", "goodbye moon"),
    ("You have 13 peaches left.", "13 peaches are left."),
    ("今天天气很好，我们去公园散步吧。", "今天天气不错，一起去公园走走。"),
    ("The answer is 42.\n", "42"),
    ("混合 mixed 文本 text 123", "mixed 文本 and text 456"),
    ("", "an empty prediction"),
    ("a prediction for an empty label", ""),
    ("Repeat repeat repeat repeat", "repeat"),
]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import numpy as np
    from llamafactory.train.sft.metric import ComputeSimilarity
    from transformers import AutoTokenizer, EvalPrediction

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    metric = ComputeSimilarity(tokenizer=tokenizer)
    results = []
    for predict, label in PAIRS:
        ids = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in (predict, label)]
        width = max(1, *map(len, ids))
        padded = np.array([row + [tokenizer.pad_token_id] * (width - len(row)) for row in ids])
        scores = metric(EvalPrediction(predictions=padded[:1], label_ids=padded[1:]))
        results.append({"predict": predict, "label": label, "scores": scores})
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(results, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
