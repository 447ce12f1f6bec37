"""Answers while it learns: at each evaluation while training, answers to a fixed, seeded sample of validation
prompts with the current weights (LoRA unmerged, greedy, batched with left padding), scored as the evaluate
stage scores them (BLEU-4, ROUGE), and logged to the run: ``eval/<metric>`` and ``eval/generation_seconds``
at the step, and the prompts, references and answers as an MLflow table, ``generation_eval/step_<N>.json``."""

from __future__ import annotations

import logging
import random
import time

from transformers import TrainerCallback

from ..config import EvaluateConfig
from ..config.blocks import GenerationEvalConfig
from ..evaluation import generate, split_prompt_answer
from ..metrics import similarity_scores

logger = logging.getLogger(__name__)


class GenerationEval(TrainerCallback):
    """Generates after every evaluation (every process, so that a sharded model can run; rank 0 logs)."""

    def __init__(self, validation, tokenizer, config: GenerationEvalConfig, seed: int, live=None):
        count = min(config.samples, len(validation))
        sample = validation.select(sorted(random.Random(seed).sample(range(len(validation)), count)))
        self.pairs = [split_prompt_answer(ids, labels) for ids, labels in zip(sample["input_ids"], sample["labels"])]
        self.tokenizer, self.live = tokenizer, live
        self.settings = EvaluateConfig(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
        self.seconds: list[float] = []  # per evaluation: the cost, reported in the summary

    def on_evaluate(self, args, state, control, model=None, **kwargs):
        started = time.perf_counter()
        training = model.training
        model.eval()
        answers = []
        for start in range(0, len(self.pairs), self.settings.batch_size):
            prompts = [prompt for prompt, _ in self.pairs[start : start + self.settings.batch_size]]
            answers += generate(model, self.tokenizer, prompts, self.settings)
        model.train(training)
        decode = self.tokenizer.decode
        rows = [
            {
                "step": state.global_step,
                "prompt": decode(prompt, skip_special_tokens=False),
                "reference": decode(reference, skip_special_tokens=True),
                "answer": decode(answer, skip_special_tokens=True),
            }
            for (prompt, reference), answer in zip(self.pairs, answers)
        ]
        scores = similarity_scores([r["answer"] for r in rows], [r["reference"] for r in rows])
        self.seconds.append(time.perf_counter() - started)
        logger.info(
            "step %d: %d answers generated in %.1f s (%s)",
            state.global_step,
            len(rows),
            self.seconds[-1],
            ", ".join(f"{k} {v:.2f}" for k, v in scores.items()),
        )
        if state.is_world_process_zero and self.live is not None:
            self.live.log_generations(state.global_step, {**scores, "generation_seconds": self.seconds[-1]}, rows)
