"""The request bodies of ``/v1/completions`` and ``/v1/chat/completions``, validated into `GenerationRequest`.

Bodies are parsed with the bounded JSON parser the rest of zipmoe uses for input from strangers
(`zipmoe._json.load_json`), prompts are checked with `zipmoe.runtime.request.check_prompt` and sampling values with
`zipmoe.runtime.request.sampling_problem`, the code ``zipmoe run --prompts`` validates its lines with; so a value
refused on the command line is refused here with the same reason. No pydantic layer: the OpenAI fields are few, and
every error names its parameter in the API's error shape (`RequestError`, HTTP 400).

As OpenAI-compatible servers do, fields this server does not know are ignored, and a ``null`` is the same as a field
left out. Fields that would change what is returned and that it cannot honour are refused: ``n`` or ``best_of``
other than 1, ``logprobs``, ``top_logprobs``, ``echo``. Torch-free.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from zipmoe._json import load_json
from zipmoe.runtime.request import MAX_PROMPT_CHARS, PromptError, check_prompt, sampling_problem
from zipmoe.server.openai_errors import RequestError

MAX_MESSAGES = 10_000
MAX_PROMPT_IDS = MAX_PROMPT_CHARS  # a prompt given as token ids
ROLES = ("system", "developer", "user", "assistant", "tool")
# OpenAI parameter -> (the SamplingOptions field it sets, the JSON types it takes: "int" or "number")
SAMPLING_PARAMS: dict[str, tuple[str, str]] = {
    "temperature": ("temperature", "number"),
    "top_p": ("top_p", "number"),
    "top_k": ("top_k", "int"),
    "min_p": ("min_p", "number"),
    "repetition_penalty": ("repetition_penalty", "number"),
    "frequency_penalty": ("frequency_penalty", "number"),
    "presence_penalty": ("presence_penalty", "number"),
    "seed": ("seed", "int"),
}


@dataclass(frozen=True)
class GenerationRequest:
    """One validated request of either endpoint.

    Attributes:
        chat: a chat completion (``messages``), else a text completion (``prompt``).
        model: the ``model`` the client named (any name is served by the one model).
        prompt: a completion's prompt: text, or token ids.
        messages: a chat's messages, ``{"role", "content"}`` with text content.
        max_tokens: tokens to generate at most; None: what the context leaves after the prompt.
        sampling: values for `zipmoe.runtime.request.SamplingOptions` fields (``temperature``, ``seed``...), those
            the request gave; the rest come from the model's defaults.
        stop: strings that end the completion (cut from its text).
        stream: answer with server-sent events.
        include_usage: streaming: a last chunk with the token counts (``stream_options.include_usage``).
        ignore_eos: do not stop at the end-of-sequence token (an extension vLLM also offers, for benchmarks).
    """

    chat: bool
    model: str | None = None
    prompt: str | tuple[int, ...] | None = None
    messages: tuple[dict[str, str], ...] = ()
    max_tokens: int | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False

    @property
    def prompt_param(self) -> str:
        """The parameter that holds the prompt, as errors name it."""
        return "messages" if self.chat else "prompt"


def parse_body(data: bytes) -> dict[str, Any]:
    """A request body: a JSON object.

    Raises:
        RequestError: not UTF-8, not JSON (too deep, a number too long, NaN), or not an object.
    """
    doc = load_json(data, lambda reason: RequestError(f"The request body is not valid JSON: {reason}"))
    if not isinstance(doc, dict):
        raise RequestError(f"The request body must be a JSON object, got {_kind(doc)}")
    return doc


def parse_completion(doc: dict[str, Any]) -> GenerationRequest:
    """A ``/v1/completions`` body: ``prompt`` (a string, a list of one string, token ids or a list of one list of
    token ids) and the common parameters (`common_fields`).

    Raises:
        RequestError: a missing, empty or unsupported prompt, or a bad parameter (`common_fields`), naming it.
    """
    if doc.get("echo"):
        raise RequestError("echo is not supported", param="echo")
    if doc.get("logprobs") is not None:
        raise RequestError("logprobs are not supported by this server", param="logprobs")
    if doc.get("best_of") not in (None, 1):
        raise RequestError(
            f"best_of must be 1 (one completion per request), got {_show(doc['best_of'])}", param="best_of"
        )
    if doc.get("suffix"):
        raise RequestError("suffix is not supported", param="suffix")
    prompt = _prompt(doc.get("prompt"))
    return GenerationRequest(chat=False, prompt=prompt, **common_fields(doc, max_tokens_keys=("max_tokens",)))


def parse_chat(doc: dict[str, Any]) -> GenerationRequest:
    """A ``/v1/chat/completions`` body: ``messages`` (role and text content, or content as a list of text parts)
    and the common parameters (`common_fields`); ``max_completion_tokens`` is the newer name of ``max_tokens``.

    Raises:
        RequestError: missing or malformed messages, or a bad parameter, naming it.
    """
    if doc.get("logprobs"):
        raise RequestError("logprobs are not supported by this server", param="logprobs")
    if doc.get("top_logprobs") is not None:
        raise RequestError("top_logprobs is not supported by this server", param="top_logprobs")
    messages = _messages(doc.get("messages"))
    keys = ("max_completion_tokens", "max_tokens")
    return GenerationRequest(chat=True, messages=messages, **common_fields(doc, max_tokens_keys=keys))


def common_fields(doc: dict[str, Any], *, max_tokens_keys: tuple[str, ...]) -> dict[str, Any]:
    """The fields both endpoints share, as `GenerationRequest` keyword arguments: ``model``, the first of
    ``max_tokens_keys`` given, the sampling parameters (`SAMPLING_PARAMS`), ``stop``, ``stream``,
    ``stream_options``, ``n`` (1 only), ``ignore_eos``.

    Raises:
        RequestError: a value of the wrong type or out of range, naming the parameter.
    """
    model = doc.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(f"model must be a string, got {_kind(model)}", param="model")
    n = doc.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise RequestError(f"n must be 1 (this server makes one choice per request), got {_show(n)}", param="n")
    max_tokens = None
    for key in max_tokens_keys:
        if doc.get(key) is not None:
            max_tokens = _integer(doc, key)
            problem = sampling_problem("max_new_tokens", max_tokens)
            if problem:
                raise RequestError(f"{key} {problem}", param=key)
            break
    sampling = {}
    for key, (name, kind) in SAMPLING_PARAMS.items():
        value = doc.get(key)
        if value is None:
            continue
        value = _integer(doc, key) if kind == "int" else _number(doc, key)
        problem = sampling_problem(name, value)
        if problem:
            raise RequestError(f"{key} {problem}", param=key)
        sampling[name] = value
    stream = _boolean(doc, "stream")
    options = doc.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise RequestError("stream_options is only allowed when stream is true", param="stream_options")
        if not isinstance(options, dict):
            raise RequestError(f"stream_options must be an object, got {_kind(options)}", param="stream_options")
        include_usage = _boolean(options, "include_usage", "stream_options.include_usage")
    return {
        "model": model,
        "max_tokens": max_tokens,
        "sampling": sampling,
        "stop": _stop(doc.get("stop")),
        "stream": stream,
        "include_usage": include_usage,
        "ignore_eos": _boolean(doc, "ignore_eos"),
    }


# -- fields -----------------------------------------------------------------------------------------------------------


def _prompt(value: Any) -> str | tuple[int, ...]:
    """A completion prompt: text, or token ids (a list of one of either is the same)."""
    if isinstance(value, list) and len(value) == 1 and isinstance(value[0], (str, list)):
        value = value[0]
    if value is None:
        raise RequestError("prompt is required", param="prompt")
    if isinstance(value, str):
        _check_text(value, "prompt")
        return value
    if isinstance(value, list):
        if not value:
            raise RequestError("prompt is empty", param="prompt")
        if all(isinstance(v, str) for v in value):
            raise RequestError(
                f"prompt holds {len(value)} strings; this server completes one prompt per request", param="prompt"
            )
        if len(value) > MAX_PROMPT_IDS:
            raise RequestError(f"prompt holds {len(value):,} token ids (at most {MAX_PROMPT_IDS:,})", param="prompt")
        bad = next((v for v in value if not _is_int(v) or v < 0), None)
        if bad is not None:
            raise RequestError(
                f"prompt must be a string or a list of token ids (integers >= 0); it holds {_show(bad)}",
                param="prompt",
            )
        return tuple(value)
    raise RequestError(f"prompt must be a string or a list of token ids, got {_kind(value)}", param="prompt")


def _messages(value: Any) -> tuple[dict[str, str], ...]:
    if value is None:
        raise RequestError("messages is required", param="messages")
    if not isinstance(value, list) or not value:
        raise RequestError(f"messages must be a non-empty array, got {_kind(value)}", param="messages")
    if len(value) > MAX_MESSAGES:
        raise RequestError(f"messages holds {len(value):,} messages (at most {MAX_MESSAGES:,})", param="messages")
    out = []
    total = 0
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RequestError(f"{where} must be an object, got {_kind(message)}", param=where)
        role = message.get("role")
        if role not in ROLES:
            raise RequestError(f"{where}.role must be one of {', '.join(ROLES)}, got {_show(role)}", param=where)
        content = _content(message.get("content"), f"{where}.content")
        total += len(content)
        if total > MAX_PROMPT_CHARS:
            raise RequestError(f"the messages hold more than {MAX_PROMPT_CHARS:,} characters", param="messages")
        out.append({"role": role, "content": content})
    if not any(m["content"].strip() for m in out):
        raise RequestError("messages are all empty", param="messages")
    return tuple(out)


def _content(value: Any, where: str) -> str:
    """A message's content: text, null (an empty assistant turn), or a list of ``{"type": "text", "text"}`` parts."""
    if value is None:
        return ""
    if isinstance(value, str):
        _check_text(value, where, empty_ok=True)
        return value
    if isinstance(value, list):
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else None
                got = f"a part of type {_show(kind)}" if isinstance(kind, str) else _kind(part)
                raise RequestError(
                    f'{where}[{j}] must be a text part {{"type": "text", "text": "..."}}, got {got} '
                    "(this server reads text only)",
                    param=where,
                )
            texts.append(part["text"])
        text = "".join(texts)
        _check_text(text, where, empty_ok=True)
        return text
    raise RequestError(f"{where} must be a string or a list of text parts, got {_kind(value)}", param=where)


def _check_text(text: str, param: str, *, empty_ok: bool = False) -> None:
    if empty_ok and not text:
        return
    try:
        check_prompt(text)
    except PromptError as exc:
        raise RequestError(f"{param}: {exc}", param=param.split(".")[0].split("[")[0]) from None


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise RequestError(f"stop must be a string or a list of strings, got {_kind(value)}", param="stop")
    problem = sampling_problem("stop", stops)
    if problem:
        raise RequestError(f"stop {problem}", param="stop")
    return tuple(dict.fromkeys(stops))  # in order, once each


def _integer(doc: dict[str, Any], key: str) -> int:
    value = doc[key]
    if not _is_int(value):
        raise RequestError(f"{key} must be an integer, got {_show(value)}", param=key)
    return value


def _number(doc: dict[str, Any], key: str) -> float:
    value = doc[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(f"{key} must be a number, got {_show(value)}", param=key)
    return float(value)


def _boolean(doc: dict[str, Any], key: str, name: str | None = None) -> bool:
    value = doc.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(f"{name or key} must be true or false, got {_show(value)}", param=name or key)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value: Any) -> str:
    if isinstance(value, list):
        return "an empty array" if not value else "an array"
    if isinstance(value, dict):
        return "an object"
    return _show(value)


def _show(value: Any) -> str:
    """A JSON value as errors quote it: scalars as written (shortened), arrays and objects by kind."""
    if isinstance(value, (list, dict)):
        return _kind(value)
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."
