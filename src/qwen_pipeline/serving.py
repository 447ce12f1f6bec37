"""The merged model as an MLflow pyfunc model: conversations in, the assistant's answers out.

Logged "from code" (``mlflow.pyfunc.log_model(python_model=<this file>)``) with the merged model
directory as its artifact, so loading it needs mlflow, torch and transformers, not qwen_pipeline::

    model = mlflow.pyfunc.load_model("models:/qwen_pipeline_merged@candidate", model_config={"max_new_tokens": 64})
    model.predict(["What is 2 + 3?", [{"role": "user", "content": "Hi"}]])

The weights are the merged model's own files (``artifacts/model``): ``AutoModelForCausalLM`` loads them
directly too.
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel


class QwenChatModel(PythonModel):
    def load_context(self, context) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["model"]
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.model = AutoModelForCausalLM.from_pretrained(path).eval()
        self.max_new_tokens = int((context.model_config or {}).get("max_new_tokens", 256))

    def predict(self, context, model_input: list[str | list[dict[str, str]]], params=None) -> list[str]:
        """Each input is a string (one user turn) or a list of {"role", "content"} messages; greedy decoding
        of up to ``max_new_tokens`` (a model_config key, given when loading; default 256)."""
        import torch

        if hasattr(model_input, "columns"):  # a DataFrame: one conversation or prompt per row
            model_input = list(model_input[model_input.columns[0]])
        answers = []
        for item in model_input:
            messages = [{"role": "user", "content": item}] if isinstance(item, str) else list(item)
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            ids = torch.tensor([self.tokenizer(text, add_special_tokens=False)["input_ids"]])
            with torch.no_grad():
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=self.max_new_tokens,
                    do_sample=False,
                )
            answers.append(self.tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return answers


mlflow.models.set_model(QwenChatModel())
