"""`zipmoe serve`'s pure parts, without a model or a socket: request validation into `GenerationRequest` (each bad
field a 400 naming it, as run --prompts words it), OpenAI error bodies, and the Prometheus text of /metrics."""

from __future__ import annotations

import json
import math
import re

import pytest

from zipmoe.server.metrics import Family, ServerMetrics, exposition
from zipmoe.server.openai_errors import APIError, RequestError, context_error
from zipmoe.server.schemas import parse_body, parse_chat, parse_completion


def refused(parse, doc) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse(doc)
    assert info.value.status == 400 and "\n" not in info.value.message
    return info.value


def test_a_completion_keeps_what_it_gave_and_leaves_the_rest_to_the_model():
    req = parse_completion({"model": "m", "prompt": "Hello", "max_tokens": 8, "temperature": 0.5, "top_k": 4,
                            "stop": "\n", "seed": 3, "stream": True, "stream_options": {"include_usage": True},
                            "unknown_field": {"ignored": True}, "user": "someone", "n": 1})  # fmt: skip
    assert (req.chat, req.model, req.prompt, req.max_tokens, req.stop) == (False, "m", "Hello", 8, ("\n",))
    assert req.sampling == {"temperature": 0.5, "top_k": 4, "seed": 3}  # top_p etc. left to the model's defaults
    assert req.stream and req.include_usage and not req.ignore_eos
    bare = parse_completion({"prompt": ["Hi"], "temperature": None})  # a list of one string; null is left out
    assert (bare.prompt, bare.max_tokens, bare.sampling, bare.stream, bare.stop) == ("Hi", None, {}, False, ())
    assert parse_completion({"prompt": [1, 2, 3]}).prompt == (1, 2, 3)
    assert parse_completion({"prompt": [[4, 5]]}).prompt == (4, 5)


def test_chat_messages_take_text_parts_and_max_completion_tokens():
    req = parse_chat({"messages": [{"role": "system", "content": "Be brief."},
                                   {"role": "user", "content": [{"type": "text", "text": "Hel"},
                                                                {"type": "text", "text": "lo"}]},
                                   {"role": "assistant", "content": None}],
                      "max_completion_tokens": 5, "max_tokens": 99, "stop": ["a", "b", "a"]})  # fmt: skip
    assert req.chat and req.prompt_param == "messages"
    assert req.messages == ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"},
                            {"role": "assistant", "content": ""})  # fmt: skip
    assert req.max_tokens == 5 and req.stop == ("a", "b")


@pytest.mark.parametrize(
    "doc, param, fragment",
    [
        ({"prompt": "x", "temperature": -1}, "temperature", "temperature must be a finite number >= 0, got -1.0"),
        ({"prompt": "x", "temperature": "hot"}, "temperature", 'temperature must be a number, got "hot"'),
        ({"prompt": "x", "top_p": 1.5}, "top_p", "top_p must be between 0 and 1"),
        ({"prompt": "x", "top_k": 2.5}, "top_k", "top_k must be an integer, got 2.5"),
        ({"prompt": "x", "top_k": True}, "top_k", "top_k must be an integer, got true"),
        ({"prompt": "x", "frequency_penalty": 3}, "frequency_penalty", "between -2 and 2"),
        ({"prompt": "x", "repetition_penalty": 0}, "repetition_penalty", "must be a finite number > 0"),
        ({"prompt": "x", "seed": -1}, "seed", "seed must be in 0.."),
        ({"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens must be at least 1, got 0"),
        ({"prompt": "x", "n": 2}, "n", "n must be 1"),
        ({"prompt": "x", "best_of": 3}, "best_of", "best_of must be 1"),
        ({"prompt": "x", "logprobs": 2}, "logprobs", "logprobs are not supported"),
        ({"prompt": "x", "echo": True}, "echo", "echo is not supported"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop", "stop must be at most 4 strings, got 5"),
        ({"prompt": "x", "stop": [""]}, "stop", "stop must be non-empty strings"),
        ({"prompt": "x", "stop": 7}, "stop", "stop must be a string or a list of strings, got 7"),
        ({"prompt": "x", "stream": "yes"}, "stream", 'stream must be true or false, got "yes"'),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream"),
        ({"prompt": "x", "model": 3}, "model", "model must be a string, got 3"),
        ({}, "prompt", "prompt is required"),
        ({"prompt": "   "}, "prompt", "the prompt is empty"),
        ({"prompt": ["a", "b"]}, "prompt", "holds 2 strings"),
        ({"prompt": [1, -2]}, "prompt", "it holds -2"),
        ({"prompt": {"text": "x"}}, "prompt", "prompt must be a string or a list of token ids, got an object"),
    ],
)
def test_a_bad_completion_field_is_a_400_naming_it(doc, param, fragment):
    error = refused(parse_completion, doc)
    assert error.param == param and fragment in error.message, error.message
    assert error.body() == {"error": {"message": error.message, "type": "invalid_request_error", "param": param,
                                      "code": None}}  # fmt: skip


@pytest.mark.parametrize(
    "doc, param, fragment",
    [
        ({}, "messages", "messages is required"),
        ({"messages": []}, "messages", "messages must be a non-empty array, got an empty array"),
        ({"messages": "hi"}, "messages", 'messages must be a non-empty array, got "hi"'),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0]", "messages[0].role must be one of system"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content", "must be a string or a list"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages[0].content", 'got a part of type "image_url" (this server reads text only)'),
        ({"messages": [{"role": "user", "content": ""}]}, "messages", "messages are all empty"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs", "not supported"),
        ({"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -3}, "max_completion_tokens",
         "max_completion_tokens must be at least 1, got -3"),
    ],
)  # fmt: skip
def test_a_bad_chat_field_is_a_400_naming_it(doc, param, fragment):
    error = refused(parse_chat, doc)
    assert error.param == param and fragment in error.message, error.message


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"{not json", "The request body is not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "must be a JSON object, got an array"),
        (b'{"temperature": NaN}', "NaN is not JSON"),
        (b"[" * 100 + b"]" * 100, "nested deeper than 64 levels"),
        (b"", "The request body is not valid JSON"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_a_400(body, fragment):
    error = refused(parse_body, body)
    assert fragment in error.message and error.param is None


def test_context_error_names_both_numbers_as_openai_does():
    error = context_error(64, 60, 10, "messages")
    assert error.message.startswith(
        "This model's maximum context length is 64 tokens. However, you requested 70 tokens (60 in the messages, "
        "10 in the completion)."
    )
    assert (error.status, error.param, error.code) == (400, "messages", "context_length_exceeded")
    overloaded = APIError("busy", status=503, type="server_overloaded", headers={"Retry-After": "1"})
    assert overloaded.body()["error"]["type"] == "server_overloaded" and overloaded.headers == {"Retry-After": "1"}


# -- /metrics ---------------------------------------------------------------------------------------------------------

# One sample line of the text format: name, optional {labels}, a value (https://prometheus.io/docs/instrumenting/
# exposition_formats/); parse_prometheus below is the strict reader the live test uses too.
_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{((?:[a-zA-Z_]\w*="(?:[^"\\\n]|\\.)*",?)*)\})? (\S+)')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The samples of a text exposition by metric name; fails on any line that is not HELP, TYPE or a sample, on a
    sample without its TYPE line, and on a TYPE that is not counter or gauge."""
    assert text.endswith("\n")
    types: dict[str, str] = {}
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            continue
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert kind in ("counter", "gauge") and name not in types, line
            types[name] = kind
            continue
        m = _SAMPLE.fullmatch(line)
        assert m is not None, line
        name, labels, value = m.groups()
        assert name in types, f"{name} has no TYPE line"
        pairs = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', labels or ""))
        samples.setdefault(name, []).append((pairs, float(value)))
        if types[name] == "counter":
            assert name.endswith("_total") and float(value) >= 0, line
    return samples


def test_the_exposition_is_prometheus_text():
    family = Family("zipmoe_x_total", "counter", "Things.\nMore")
    family.add(3, tier="decoded").add(1.5, tier='we"ird\\')
    text = exposition([family, Family("zipmoe_y", "gauge", "A gauge.").add(math.inf), Family("zipmoe_z", "gauge", "")])
    assert text.splitlines()[:4] == [
        "# HELP zipmoe_x_total Things.\\nMore",
        "# TYPE zipmoe_x_total counter",
        'zipmoe_x_total{tier="decoded"} 3',
        'zipmoe_x_total{tier="we\\"ird\\\\"} 1.5',
    ]
    assert "zipmoe_y +Inf" in text
    samples = parse_prometheus(text)
    assert samples["zipmoe_x_total"][1] == ({"tier": 'we\\"ird\\\\'}, 1.5) and "zipmoe_z" not in samples


def test_server_counters_and_tokens_per_second():
    metrics = ServerMetrics(window=10.0)
    metrics.request("/v1/completions", 200)
    metrics.request("/v1/completions", 200)
    metrics.request("/v1/completions", 400)
    metrics.prompt(7)
    for _ in range(20):
        metrics.token()
    metrics.cancel()
    metrics.refuse()
    samples = parse_prometheus(exposition(metrics.families()))
    requests = {(labels["endpoint"], labels["status"]): value for labels, value in samples["zipmoe_requests_total"]}
    assert requests == {("/v1/completions", "200"): 2, ("/v1/completions", "400"): 1}
    assert samples["zipmoe_generation_tokens_total"] == [({}, 20)]
    assert samples["zipmoe_prompt_tokens_total"] == [({}, 7)]
    assert samples["zipmoe_requests_cancelled_total"] == [({}, 1)]
    assert samples["zipmoe_requests_rejected_total"] == [({}, 1)]
    assert samples["zipmoe_generation_tokens_per_second"] == [({}, 2.0)]  # 20 tokens over the 10 s window
    json.dumps(samples)  # plain data
