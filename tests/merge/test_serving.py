"""The registered model as MLflow serves it: chat-completions requests in, chat-completions answers out.

The model under test is the embedded one with an untied, random output head (its tied head repeats the last
token, so every answer would be newlines), and ``<|im_end|>`` made the greedy choice wherever one token would
be: some answers end at the end of turn, others run to ``max_tokens``. Every answer is checked against
``generate`` run on the model directly, one conversation at a time."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

HI = [{"role": "user", "content": "Hi"}]
STORY = [
    {"role": "system", "content": "You tell short stories."},
    {"role": "user", "content": "Tell me a story about a cat."},
]
COLORS = [{"role": "user", "content": "List three colors."}]
NAME = "chatty"


@pytest.fixture(scope="module")
def chatty_dir(embedded_dir, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    from qwen_pipeline.models import load_tokenizer

    target = tmp_path_factory.mktemp("chatty") / "model"
    model = AutoModelForCausalLM.from_pretrained(embedded_dir)
    model.config.tie_word_embeddings = False
    torch.manual_seed(1)
    head = torch.randn_like(model.lm_head.weight) * 0.2
    tokenizer = load_tokenizer(str(embedded_dir))
    # Where the greedy answer to "Hi" would say its 4th token, <|im_end|> now scores higher.
    model.lm_head.weight = torch.nn.Parameter(head)
    fourth = reference(model, tokenizer, HI, 4)[0][3]
    head[tokenizer.convert_tokens_to_ids("<|im_end|>")] = head[fourth] * 1.5
    model.lm_head.weight = torch.nn.Parameter(head)
    model.save_pretrained(target)
    for file in embedded_dir.iterdir():
        if not (target / file.name).exists():
            shutil.copy(file, target / file.name)
    return target


def reference(model, tokenizer, messages, max_tokens) -> tuple[list[int], int]:
    """Greedy ``generate`` on one conversation alone: the answer's tokens (up to, not with, <|im_end|>) and the
    prompt's length."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, max_new_tokens=max_tokens, do_sample=False)
    answer = out[0, ids.shape[1] :].tolist()
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    return (answer[: answer.index(end)] if end in answer else answer), ids.shape[1]


@pytest.fixture(scope="module")
def store(chatty_dir, tmp_path_factory):
    """A SQLite MLflow store with the model registered as the merge stage registers it."""
    import mlflow

    from qwen_pipeline.tracking.registry import log_model_directory

    root = tmp_path_factory.mktemp("store")
    uri, previous, cwd = f"sqlite:///{root / 'mlflow.db'}", mlflow.get_tracking_uri(), os.getcwd()
    os.chdir(root)  # the default artifact root (./mlruns) lands here
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run():
            log_model_directory(chatty_dir, {"base_model": "tiny"}, name="merged", registered_model_name=NAME,
                                alias="candidate")  # fmt: skip
        yield root, uri
    finally:
        mlflow.set_tracking_uri(previous)
        os.chdir(cwd)


@pytest.fixture(scope="module")
def served(store):
    """The registered model, loaded as ``mlflow.pyfunc`` loads it, and the model and tokenizer underneath."""
    import mlflow

    root, uri = store
    mlflow.set_tracking_uri(uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@candidate")
    raw = model.unwrap_python_model()
    return model, raw.model, raw.tokenizer


def texts(response) -> list[str]:
    return [choice["message"]["content"] for choice in response["choices"]]


def test_the_signature_declares_the_chat_schema_and_the_generation_options(served):
    from mlflow.types.llm import CHAT_MODEL_OUTPUT_SCHEMA

    model, _, _ = served
    signature = model.metadata.signature
    assert [(p.name, p.default) for p in signature.params.params] == [
        ("max_tokens", None), ("max_new_tokens", None), ("temperature", None), ("top_p", None), ("top_k", None),
        ("stop", []), ("n", 1),
    ]  # fmt: skip
    assert signature.inputs.input_names() == ["messages", "prompt"]
    assert signature.outputs == CHAT_MODEL_OUTPUT_SCHEMA


def test_answers_are_what_generate_gives_one_conversation_at_a_time(served):
    model, raw, tokenizer = served
    response = model.predict([{"messages": m} for m in (HI, STORY, COLORS)], params={"max_tokens": 9, "temperature": 0})
    expected = [reference(raw, tokenizer, m, 9) for m in (HI, STORY, COLORS)]
    assert texts(response) == [tokenizer.decode(answer, skip_special_tokens=True) for answer, _ in expected]
    # "Hi" ends at <|im_end|> (counted as a completion token), the other two run to max_tokens
    assert [len(answer) for answer, _ in expected] == [3, 9, 9]
    assert [c["finish_reason"] for c in response["choices"]] == ["stop", "length", "length"]
    assert [c["index"] for c in response["choices"]] == [0, 1, 2]
    prompt_tokens = sum(length for _, length in expected)
    assert response["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 4 + 9 + 9,
                                 "total_tokens": prompt_tokens + 22}  # fmt: skip
    assert response["object"] == "chat.completion" and response["model"] == NAME
    assert response["id"].startswith("chatcmpl-")


def test_max_tokens_bounds_every_answer(served):
    model, _, tokenizer = served
    response = model.predict({"messages": STORY}, params={"max_tokens": 5, "temperature": 0.0})
    (text,) = texts(response)
    assert response["usage"]["completion_tokens"] == 5 == len(tokenizer(text)["input_ids"])
    assert response["choices"][0]["finish_reason"] == "length"


def test_max_new_tokens_is_taken_for_max_tokens(served):
    model, _, _ = served
    response = model.predict({"messages": STORY}, params={"max_new_tokens": 3, "temperature": 0.0})
    assert response["usage"]["completion_tokens"] == 3
    from qwen_pipeline.serving import GenerationOptions

    assert GenerationOptions.parse({"max_tokens": None, "max_new_tokens": None}).max_tokens == 256  # neither given


def test_a_stop_string_ends_the_answer_before_it(served):
    model, _, _ = served
    params = {"max_tokens": 12, "temperature": 0.0}
    (full,) = texts(model.predict({"messages": STORY}, params=params))
    stop = full[6:9]  # mid-answer
    assert full.find(stop) >= 6, (full, stop)
    response = model.predict({"messages": STORY}, params={**params, "stop": ["never said", stop]})
    assert texts(response) == [full[: full.find(stop)]]
    assert response["choices"][0]["finish_reason"] == "stop"
    assert response["usage"]["completion_tokens"] < 12


def test_a_stop_string_that_begins_in_the_prompt_ends_the_answer_at_once(served):
    """transformers matches stop strings on the whole sequence: the prompt ends "assistant\n", the answer begins
    " pass", so "\n pass" is met by the first token, and nothing of it is returned."""
    model, _, _ = served
    (full,) = texts(model.predict({"messages": STORY}, params={"max_tokens": 4, "temperature": 0}))
    assert full.startswith(" pass")
    response = model.predict({"messages": STORY}, params={"max_tokens": 4, "temperature": 0, "stop": ["\n pass"]})
    assert texts(response) == [""]
    assert response["choices"][0]["finish_reason"] == "stop" and response["usage"]["completion_tokens"] == 1


def test_top_p_without_a_temperature_samples(served):
    model, _, _ = served  # its generation config is greedy
    torch.manual_seed(0)
    sampled = model.predict({"messages": COLORS}, params={"max_tokens": 6, "n": 3, "top_p": 0.95})
    assert len(set(texts(sampled))) > 1


def test_n_choices_per_conversation_in_order(served):
    model, _, _ = served
    greedy = model.predict([{"messages": HI}, {"messages": COLORS}], params={"max_tokens": 4, "n": 2, "temperature": 0})
    first, second = (
        texts(model.predict({"messages": HI}, params={"max_tokens": 4, "temperature": 0})),
        texts(model.predict({"messages": COLORS}, params={"max_tokens": 4, "temperature": 0})),
    )
    assert texts(greedy) == first * 2 + second * 2
    assert [c["index"] for c in greedy["choices"]] == [0, 1, 2, 3]
    torch.manual_seed(0)
    sampled = model.predict({"messages": COLORS}, params={"max_tokens": 6, "n": 3, "temperature": 1.0, "top_k": 50})
    assert len(sampled["choices"]) == 3 and len(set(texts(sampled))) > 1  # three draws, not one copied
    assert sampled["usage"]["completion_tokens"] == 18


def test_a_plain_prompt_is_one_user_turn(served):
    model, _, _ = served
    params = {"max_tokens": 6, "temperature": 0}
    as_prompt = model.predict({"prompt": "Hi"}, params=params)
    assert texts(as_prompt) == texts(model.predict({"messages": HI}, params=params))
    assert as_prompt["usage"] == model.predict({"messages": HI}, params=params)["usage"]


@pytest.mark.parametrize(
    ("request_", "params", "message"),
    [
        ({"messages": []}, {}, "the request: messages is empty"),
        ({"messages": [{"role": "robot", "content": "x"}]}, {},
         "the request, message 0: needs a role (system, user, assistant) and a string content"),
        ([{"messages": HI}, {"prompt": "Hi", "messages": HI}], {},
         'conversation 1: give either "messages" or "prompt"'),
        ({"messages": HI}, {"max_tokens": 0}, "max_tokens must be at least 1, got 0"),
        ({"messages": HI}, {"max_tokens": 3, "max_new_tokens": 4}, "max_tokens (3) and max_new_tokens (4) disagree"),
        ({"messages": HI}, {"temperature": 2.5}, "temperature must be at least 0.0 and at most 2.0, got 2.5"),
        ({"messages": HI}, {"top_p": 0.0}, "top_p must be above 0.0 and at most 1.0, got 0.0"),
        ({"messages": HI}, {"temperature": float("nan")}, "temperature must be a number, got nan"),
        ({"messages": HI}, {"n": 17}, "n must be at least 1 and at most 16, got 17"),
        ({"messages": HI}, {"stop": ["a", "b", "c", "d", "e"]}, "stop must be at most 4 non-empty strings"),
    ],
)  # fmt: skip
def test_a_bad_request_is_refused_saying_what_is_wrong(served, request_, params, message):
    from mlflow.exceptions import MlflowException

    model, _, _ = served
    with pytest.raises(MlflowException, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as error:
        model.predict(request_, params={"max_tokens": 2, **params})
    assert error.value.get_http_status_code() == 400


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def post(port: int, body) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow  # ~25 s: mlflow models serve starts a server and loads the model
def test_mlflow_models_serve_answers_chat_completions_over_http(store, served):
    root, uri = store
    model, _, _ = served
    port = free_port()
    mlflow_cli = Path(sys.executable).with_name("mlflow")
    server = subprocess.Popen(
        [str(mlflow_cli), "models", "serve", "-m", f"models:/{NAME}@candidate", "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port)],
        cwd=root, env={**os.environ, "MLFLOW_TRACKING_URI": uri}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as ping:
                    if ping.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None and time.monotonic() < deadline, server.stdout.read().decode()[-3000:]
            time.sleep(0.5)

        # A chat-completions request as it is: max_tokens bounds the answer and usage says so.
        status, answer = post(port, {"messages": STORY, "max_tokens": 5, "temperature": 0})
        assert status == 200, answer
        assert answer["object"] == "chat.completion" and answer["usage"]["completion_tokens"] == 5
        local = model.predict({"messages": STORY}, params={"max_tokens": 5, "temperature": 0})
        assert answer["choices"] == local["choices"] and answer["usage"] == local["usage"]

        # A stop string ends the answer (cut before it).
        (full,) = texts(model.predict({"messages": STORY}, params={"max_tokens": 12, "temperature": 0}))
        status, answer = post(port, {"messages": STORY, "max_tokens": 12, "temperature": 0, "stop": [full[6:9]]})
        assert status == 200 and texts(answer) == [full[: full.find(full[6:9])]], answer
        assert answer["choices"][0]["finish_reason"] == "stop"

        # Two conversations in one request: two choices, in order.
        status, answer = post(
            port, {"inputs": [{"messages": HI}, {"messages": COLORS}], "params": {"max_tokens": 4, "temperature": 0}}
        )
        assert status == 200, answer
        local = model.predict([{"messages": HI}, {"messages": COLORS}], params={"max_tokens": 4, "temperature": 0})
        assert answer["predictions"]["choices"] == local["choices"] and len(local["choices"]) == 2

        # Malformed requests: a 400 that says what is wrong, no traceback.
        for body, says in [
            ({"messages": HI, "max_tokens": 0}, "max_tokens must be at least 1, got 0"),
            ({"messages": [{"role": "robot", "content": "Hi"}]}, "message 0: needs a role"),
            ({"messages": [{"content": "Hi"}]}, "role"),
            ({"messages": HI, "n": 99}, "n must be at least 1 and at most 16, got 99"),
            (b'{"messages": [', "Invalid input"),
        ]:
            status, error = post(port, body)
            assert status == 400 and says in error["message"], (body, status, error)
            assert "Traceback" not in json.dumps(error) and "stack_trace" not in error, error
    finally:
        server.terminate()
        server.wait(timeout=30)
