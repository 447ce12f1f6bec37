"""The merged model as an MLflow pyfunc chat model: chat-completions requests in, chat-completions answers out.

Logged "from code" (``mlflow.pyfunc.log_model(python_model=<this file>)``) with the merged model directory as its
artifact, so loading it needs mlflow, torch and transformers, not qwen_pipeline. MLflow's chat conventions
(``mlflow.types.llm``) make its interface: the ``messages`` column of MLflow's chat input schema (or ``prompt``, a
plain string taken as one user turn), a ``ChatCompletionResponse`` out, and the options as the signature's params::

    model = mlflow.pyfunc.load_model("models:/qwen_pipeline_merged@candidate")
    model.predict({"messages": [{"role": "user", "content": "Hi"}]}, params={"max_tokens": 64, "temperature": 0.0})

Served (``mlflow models serve``), a body ``{"messages": [...], "max_tokens": 5, "stop": ["."]}`` is a
chat-completions request; ``{"inputs": [{"messages": [...]}, {"messages": [...]}], "params": {...}}`` answers
several conversations in one batch, their choices in order (conversation i's j-th choice has index i * n + j).
Each batch of conversations is generated together, left-padded; an answer ends at ``<|im_end|>``, at a ``stop``
string (cut before it) or at ``max_tokens`` (finish_reason "length"). Options not given follow the model's own
``generation_config.json`` (sampling included); ``temperature: 0`` is greedy; ``top_p`` or ``top_k`` without a
temperature samples.

The weights are the merged model's own files (``artifacts/model``): ``AutoModelForCausalLM`` loads them directly too.
"""

from __future__ import annotations

import copy
import math
import uuid
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.pyfunc import PythonModel
from mlflow.types.llm import (
    CHAT_MODEL_INPUT_SCHEMA,
    CHAT_MODEL_OUTPUT_SCHEMA,
    ChatChoice,
    ChatCompletionResponse,
    ChatMessage,
    TokenUsageStats,
)
from mlflow.types.schema import ColSpec, DataType, ParamSchema, ParamSpec, Schema

MAX_TOKENS = 256  # when a request gives neither max_tokens nor max_new_tokens
MAX_CHOICES = 16  # n
MAX_STOPS = 4  # stop strings per request, as the chat-completions API allows
ROLES = ("system", "user", "assistant")
END_OF_TURN = "<|im_end|>"


def signature() -> ModelSignature:
    """MLflow's chat schemas, with ``messages`` or ``prompt`` per row, and the generation options as params."""
    messages = next(spec for spec in CHAT_MODEL_INPUT_SCHEMA.inputs if spec.name == "messages")
    inputs = Schema(
        [
            ColSpec(messages.type, "messages", required=False),
            ColSpec(DataType.string, "prompt", required=False),
        ]
    )
    params = ParamSchema(
        [
            ParamSpec("max_tokens", DataType.long, None),  # None: MAX_TOKENS
            ParamSpec("max_new_tokens", DataType.long, None),  # transformers' name for it, also taken
            ParamSpec("temperature", DataType.double, None),  # None: the model's generation config decides
            ParamSpec("top_p", DataType.double, None),
            ParamSpec("top_k", DataType.long, None),
            ParamSpec("stop", DataType.string, [], shape=(-1,)),
            ParamSpec("n", DataType.long, 1),
        ]
    )
    return ModelSignature(inputs=inputs, outputs=CHAT_MODEL_OUTPUT_SCHEMA, params=params)


def bad_request(message: str) -> MlflowException:
    """An error the scoring server answers with HTTP 400 and this message (no traceback)."""
    return MlflowException.invalid_parameter_value(message)


class QwenChatModel(PythonModel):
    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["model"]
        settings = context.model_config or {}
        self.name = str(settings.get("name", "qwen_pipeline"))
        self.batch_size = int(settings.get("batch_size", 8))  # conversations per generate call
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype="auto").to(device).eval()
        config = self.model.generation_config
        ends = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        end_of_turn = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        self.ends = {token for token in [*ends, end_of_turn] if token is not None}
        self.pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else end_of_turn

    def predict(self, context, model_input, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """One chat completion for every conversation of ``model_input`` (a DataFrame of ``messages`` or
        ``prompt`` rows, as MLflow hands it over), ``n`` choices each."""
        conversations = conversations_of(model_input)
        options = GenerationOptions.parse(params or {})
        prompts = [self.encode(messages) for messages in conversations]
        choices: list[tuple[str, str, int]] = []  # text, finish reason, completion tokens
        for start in range(0, len(prompts), self.batch_size):
            choices += self.generate(prompts[start : start + self.batch_size], options)
        return ChatCompletionResponse(
            id=f"chatcmpl-{uuid.uuid4().hex}",
            model=self.name,
            choices=[
                ChatChoice(index=i, message=ChatMessage(role="assistant", content=text), finish_reason=finish)
                for i, (text, finish, _) in enumerate(choices)
            ],
            usage=TokenUsageStats(
                prompt_tokens=sum(map(len, prompts)),
                completion_tokens=sum(tokens for _, _, tokens in choices),
                total_tokens=sum(map(len, prompts)) + sum(tokens for _, _, tokens in choices),
            ),
        ).to_dict()

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) + 1 > self.model.config.max_position_embeddings:
            raise bad_request(
                f"a conversation of {len(ids)} tokens leaves no room to answer within the model's "
                f"{self.model.config.max_position_embeddings} positions"
            )
        return ids

    def generate(self, prompts: list[list[int]], options: GenerationOptions) -> list[tuple[str, str, int]]:
        """Left-padded batched generation; ``options.n`` choices per prompt, in prompt order."""
        import torch

        width = max(map(len, prompts))
        device = self.model.device
        input_ids = torch.tensor([[self.pad] * (width - len(p)) + p for p in prompts], device=device)
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        config = options.generation_config(self.model.generation_config, sorted(self.ends), self.pad)
        repeats = config.num_return_sequences = options.n if config.do_sample else 1  # greedy: the same n times
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                generation_config=config,
                tokenizer=self.tokenizer,  # for the stop strings
            )
        longest = max(map(len, options.stop), default=1)
        tails = [self.tokenizer.decode(p[-longest:])[-(longest - 1) :] if longest > 1 else "" for p in prompts]
        answers = [self.finish(row, options, tails[r // repeats]) for r, row in enumerate(out[:, width:].tolist())]
        return [answers[i * repeats + (j if repeats > 1 else 0)] for i in range(len(prompts)) for j in range(options.n)]

    def finish(self, tokens: list[int], options: GenerationOptions, prompt_tail: str) -> tuple[str, str, int]:
        """The answer's text, why it ended and how many tokens it took. It ends at the first end-of-turn token
        (counted), at a stop string (the text cut before it; transformers matches stop strings on the whole
        sequence, so one may begin in the prompt's last characters, ``prompt_tail``), or at max_tokens."""
        end = next((i for i, token in enumerate(tokens) if token in self.ends or token == self.pad), None)
        answer = tokens if end is None else tokens[:end]
        text = self.tokenizer.decode(answer, skip_special_tokens=True)
        cuts = []
        for stop in options.stop:
            tail = prompt_tail[len(prompt_tail) - len(stop) + 1 :] if len(stop) > 1 else ""  # shorter than stop
            if (at := (tail + text).find(stop)) >= 0:
                cuts.append(max(0, at - len(tail)))
        if cuts:  # generation stopped on it; what follows is padding
            return text[: min(cuts)], "stop", len(answer)
        if end is not None:
            return text, "stop", len(answer) + (tokens[end] in self.ends)
        return text, "length" if len(answer) >= options.max_tokens else "stop", len(answer)


class GenerationOptions:
    """A request's options, checked: a bad value is a 400 naming it."""

    def __init__(self, max_tokens, temperature, top_p, top_k, stop, n):
        self.max_tokens, self.temperature, self.top_p, self.top_k = max_tokens, temperature, top_p, top_k
        self.stop, self.n = stop, n

    @classmethod
    def parse(cls, params: dict[str, Any]) -> GenerationOptions:
        def number(name, low, high=None, kind=float, low_open=False):
            value = params.get(name)
            if value is None:
                return None
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not math.isfinite(value)
                or (kind is int and value != int(value))
            ):
                raise bad_request(f"{name} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
            if value < low or (low_open and value == low) or (high is not None and value > high):
                bounds = f"{'above' if low_open else 'at least'} {low}" + (f" and at most {high}" if high else "")
                raise bad_request(f"{name} must be {bounds}, got {value}")
            return kind(value)

        stop = params.get("stop") or []
        stop = [stop] if isinstance(stop, str) else list(stop)
        if len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise bad_request(f"stop must be at most {MAX_STOPS} non-empty strings, got {stop!r}")
        max_tokens, max_new_tokens = number("max_tokens", 1, kind=int), number("max_new_tokens", 1, kind=int)
        if None not in (max_tokens, max_new_tokens) and max_tokens != max_new_tokens:
            raise bad_request(f"max_tokens ({max_tokens}) and max_new_tokens ({max_new_tokens}) disagree: give one")
        max_tokens = max_new_tokens if max_tokens is None else max_tokens
        n = number("n", 1, MAX_CHOICES, kind=int)
        return cls(
            max_tokens=MAX_TOKENS if max_tokens is None else max_tokens,
            temperature=number("temperature", 0.0, 2.0),
            top_p=number("top_p", 0.0, 1.0, low_open=True),
            top_k=number("top_k", 1, kind=int),
            stop=stop,
            n=1 if n is None else n,
        )

    def generation_config(self, model_config, ends: list[int], pad: int):
        """The model's generation config with this request's options over it: temperature 0 is greedy, another
        temperature samples; options not given keep the model's values."""
        config = copy.deepcopy(model_config)
        config.max_new_tokens, config.max_length = self.max_tokens, None
        config.eos_token_id, config.pad_token_id = ends, pad
        config.stop_strings = self.stop or None
        if self.temperature is not None:
            config.do_sample = self.temperature > 0
            config.temperature = self.temperature if config.do_sample else None
        elif self.top_p is not None or self.top_k is not None:  # asked for a sampling cut: sampling it is
            config.do_sample = True
        for name in ("top_p", "top_k"):
            if getattr(self, name) is not None:
                setattr(config, name, getattr(self, name))
        if not config.do_sample:  # greedy: sampling settings would only draw warnings
            config.temperature = config.top_p = config.top_k = None
        return config


def conversations_of(model_input) -> list[list[dict[str, str]]]:
    """Each row's conversation: its ``messages``, or its ``prompt`` as one user turn; a row with neither, or
    messages that are not {role, content} pairs, is a 400 naming the row."""
    import pandas as pd

    if isinstance(model_input, (str, dict)):
        model_input = [model_input]
    if isinstance(model_input, list):
        model_input = pd.DataFrame([{"prompt": x} if isinstance(x, str) else x for x in model_input])
    if len(model_input.columns) == 0 or len(model_input) == 0:
        raise bad_request('no conversation given: send "messages" (a list of {"role", "content"}) or "prompt"')
    rows = []
    for i, row in enumerate(model_input.to_dict(orient="records")):
        messages, prompt = _given(row.get("messages")), _given(row.get("prompt"))
        where = f"conversation {i}" if len(model_input) > 1 else "the request"
        if (messages is None) == (prompt is None):
            raise bad_request(f'{where}: give either "messages" or "prompt"')
        if prompt is not None:
            rows.append([{"role": "user", "content": str(prompt)}])
            continue
        messages = [dict(m) for m in messages]
        for k, message in enumerate(messages):
            if message.get("role") not in ROLES or not isinstance(message.get("content"), str):
                raise bad_request(
                    f"{where}, message {k}: needs a role ({', '.join(ROLES)}) and a string content, got {message!r}"
                )
        if not messages:
            raise bad_request(f"{where}: messages is empty")
        rows.append([{"role": m["role"], "content": m["content"]} for m in messages])
    return rows


def _given(value):
    """None for a missing cell (pandas fills one with None or NaN), else the value."""
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value


mlflow.models.set_model(QwenChatModel())
