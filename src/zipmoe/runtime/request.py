"""What one generation asks for (a prompt and how to sample it), and where prompts come from.

`zipmoe run` takes its prompt from an argument, from stdin (``-``), from a file (``--file``), or many prompts from a
JSON Lines file (``--prompts``): one object per line, ``{"prompt": "..."}`` with optional ``max_new_tokens``, the
sampling options (``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty``, ``frequency_penalty``,
``presence_penalty``, ``stop``, ``seed``), ``chat`` and ``id``, or a bare JSON string. Everything here is read within
bounds and validated before a model is loaded, so a bad line fails in a second, naming its line, and not after the
weights are in memory. The module needs no torch: a server can validate its requests with it at the edge.

The defaults of the sampling options come from the checkpoint's ``generation_config.json`` (`generation_defaults`)
where it sets them, else from `SamplingOptions`.

A prompt read from stdin or a file loses one trailing newline (``echo "Hello" | zipmoe run C -`` is
``zipmoe run C Hello``) and a leading UTF-8 byte order mark; the rest is kept as it is.
"""

from __future__ import annotations

import json
import math
import os
import stat
import sys
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, BinaryIO

from zipmoe._json import load_json
from zipmoe.errors import ZipmoeError

STDIN = "-"  # the prompt source meaning standard input
# One prompt, in characters: the bound a chat template's rendered prompt has (`zipmoe.runtime.chat_template`),
# ~250,000 tokens, beyond the context of every model zipmoe runs.
MAX_PROMPT_CHARS = 1_000_000
MAX_PROMPT_BYTES = 4 * MAX_PROMPT_CHARS + 5  # its UTF-8 bytes: at most 4 a character, a BOM, a CR LF
# A --prompts file is validated whole before the model loads, so it is held in memory; split larger batches.
MAX_BATCH_BYTES = 256 << 20
MAX_SEED = 2**63 - 1  # torch seeds are 64-bit
MAX_STOPS = 4  # stop strings per request, as the OpenAI API allows
MAX_STOP_CHARS = 256  # one stop string: held back from the stream while it may still be starting
MAX_PENALTY = 2.0  # frequency and presence penalties lie in -2..2, as in the OpenAI API
# The keys of a --prompts line besides "prompt": the JSON types each takes (a boolean is not a number here), in words.
_LINE_KEYS: dict[str, tuple[tuple[type, ...], str]] = {
    "id": ((str, int), "a string or an integer"),
    "max_new_tokens": ((int,), "an integer"),
    "temperature": ((int, float), "a number"),
    "top_p": ((int, float), "a number"),
    "top_k": ((int,), "an integer"),
    "min_p": ((int, float), "a number"),
    "repetition_penalty": ((int, float), "a number"),
    "frequency_penalty": ((int, float), "a number"),
    "presence_penalty": ((int, float), "a number"),
    "stop": ((str, list), "a string or an array of strings"),
    "seed": ((int,), "an integer"),
    "chat": ((bool,), "true or false"),
}
# The options of a line that are `SamplingOptions` fields.
_SAMPLING_KEYS = tuple(key for key in _LINE_KEYS if key not in ("id", "chat"))
# The keys of generation_config.json read as sampling defaults (besides do_sample), and the JSON types each takes.
GENERATION_KEYS: dict[str, tuple[type, ...]] = {
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "min_p": (int, float),
    "repetition_penalty": (int, float),
}


class PromptError(ZipmoeError, ValueError):
    """A prompt the model cannot take: empty, not UTF-8, too large, or too long for its context."""


class SamplingError(ZipmoeError, ValueError):
    """Sampling options out of range."""


def sampling_problem(name: str, value: Any) -> str | None:
    """Why ``value`` is out of range for the sampling option ``name`` (``must be ...``), or None when it is not."""
    if name == "max_new_tokens" and not value >= 1:
        return f"must be at least 1, got {value}"
    if name == "temperature" and not (math.isfinite(value) and value >= 0):
        return f"must be a finite number >= 0, got {value!r}"
    if name == "top_p" and not 0.0 <= value <= 1.0:  # also NaN
        return f"must be between 0 and 1, got {value!r}"
    if name == "top_k" and not (isinstance(value, int) and not isinstance(value, bool) and value >= 0):
        return f"must be an integer >= 0 (0: off), got {value!r}"
    if name == "min_p" and not 0.0 <= value <= 1.0:
        return f"must be between 0 and 1, got {value!r}"
    if name == "repetition_penalty" and not (math.isfinite(value) and value > 0):
        return f"must be a finite number > 0 (1: off), got {value!r}"
    if name in ("frequency_penalty", "presence_penalty") and not -MAX_PENALTY <= value <= MAX_PENALTY:
        return f"must be between -{MAX_PENALTY:g} and {MAX_PENALTY:g}, got {value!r}"
    if name == "seed" and not 0 <= value <= MAX_SEED:
        return f"must be in 0..{MAX_SEED} (2**63-1), got {value}"
    if name == "stop":
        return _stop_problem(value)
    return None


def _stop_problem(stop: Any) -> str | None:
    if len(stop) > MAX_STOPS:
        return f"must be at most {MAX_STOPS} strings, got {len(stop)}"
    for text in stop:
        if not isinstance(text, str) or not text:
            return f"must be non-empty strings, got {text!r}"
        if len(text) > MAX_STOP_CHARS:
            return f"must be at most {MAX_STOP_CHARS} characters each, got one of {len(text)}"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "must be valid UTF-8"
    return None


@dataclass(frozen=True)
class SamplingOptions:
    """How to pick tokens (`zipmoe.runtime.sampling` applies them, in the order given there).

    ``temperature`` 0 is greedy (the penalties still apply); ``top_p`` 0 keeps only the most likely token; ``top_k``
    0, ``min_p`` 0, ``repetition_penalty`` 1 and the frequency and presence penalties 0 are off. ``stop``: at most
    `MAX_STOPS` strings; the text ends before the first of them to appear, which is not returned
    (`zipmoe.runtime.stops`). A string for ``stop`` is one stop string; a list becomes a tuple.

    ``truncate`` keeps the last prompt tokens that leave room for ``max_new_tokens`` in the model's context, instead
    of refusing a prompt that is too long.

    Raises:
        SamplingError: a value out of range (NaN and infinities included), naming its ``zipmoe run`` flag.
    """

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop_at_eos: bool = True
    truncate: bool = False
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif not isinstance(self.stop, tuple):
            if not isinstance(self.stop, list):
                raise SamplingError(f"--stop must be a string or a list of strings, got {type(self.stop).__name__}")
            object.__setattr__(self, "stop", tuple(self.stop))
        for name in _SAMPLING_KEYS:
            problem = sampling_problem(name, getattr(self, name))
            if problem:
                raise SamplingError(f"--{name.replace('_', '-')} {problem}")

    @property
    def greedy(self) -> bool:
        """Whether the most likely token is taken (``temperature`` 0)."""
        return self.temperature <= 0


def sampling_with_defaults(defaults: Mapping[str, Any], **overrides: Any) -> SamplingOptions:
    """`SamplingOptions` from ``defaults`` (`generation_defaults`), with the ``overrides`` that are not None on top.

    Raises:
        SamplingError: a value out of range, naming its flag.
    """
    return SamplingOptions(**{**defaults, **{key: value for key, value in overrides.items() if value is not None}})


def generation_defaults(doc: Any, file: str = "generation_config.json") -> tuple[dict[str, Any], list[str]]:
    """The sampling defaults a checkpoint's ``generation_config.json`` sets, and a warning for each value ignored.

    As transformers reads it: without ``"do_sample": true`` generation is greedy (``temperature`` 0, whatever the
    file's temperature); with it, ``temperature`` defaults to 1. ``top_p``, ``top_k``, ``min_p`` and
    ``repetition_penalty`` are taken where set (transformers' own fallbacks, such as ``top_k`` 50, are not: a key the
    file leaves out stays off). The file is untrusted: a value of the wrong type or out of range is left out with a
    one-line warning (a model still runs with its author's typo), never an error.

    Args:
        doc: the parsed file (anything: a non-object gives no defaults and one warning).
        file: how warnings name the file.

    Returns:
        `SamplingOptions` field values, and the warnings (``generation_config.json: top_p must be ...; ignored``).
    """
    if not isinstance(doc, dict):
        return {}, [f"{file}: expected a JSON object, got {_json_kind(doc)}; its sampling defaults are ignored"]
    warnings: list[str] = []
    do_sample = doc.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        warnings.append(f"{file}: do_sample must be true or false, got {_json_kind(do_sample)}; ignored (greedy)")
    defaults: dict[str, Any] = {}
    for key, types in GENERATION_KEYS.items():
        value = doc.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or isinstance(value, bool):
            problem = f"must be {'an integer' if types == (int,) else 'a number'}, got {_json_kind(value)}"
        else:
            problem = sampling_problem(key, value)
        if problem:
            warnings.append(f"{file}: {key} {problem}; ignored")
        else:
            defaults[key] = value
    temperature = defaults.pop("temperature", 1.0)
    defaults["temperature"] = temperature if do_sample is True else 0.0
    return defaults, warnings


def check_prompt(prompt: str) -> None:
    """Raise `PromptError` for a prompt that is empty, not valid UTF-8, or longer than `MAX_PROMPT_CHARS`."""
    if not prompt.strip():
        raise PromptError("the prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise PromptError(f"the prompt has {len(prompt):,} characters (at most {MAX_PROMPT_CHARS:,})")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:  # bytes that were not UTF-8 arrive from argv as lone surrogates
        raise PromptError("the prompt is not valid UTF-8") from None


# -- reading ----------------------------------------------------------------------------------------------------------


def read_stdin(limit: int, what: str, stream: BinaryIO | None = None) -> bytes:
    """Standard input to its end, at most ``limit`` bytes (``what`` names it in errors).

    Raises:
        PromptError: there is no standard input, or it holds more than ``limit`` bytes.
    """
    if stream is None:
        if sys.stdin is None:  # started without one (pythonw, a closed descriptor 0)
            raise PromptError(f"{what}: there is no standard input to read")
        stream = sys.stdin.buffer
    data = stream.read(limit + 1)
    if len(data) > limit:
        raise PromptError(f"{what}: larger than {_size(limit)}")
    return data


def read_file(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """A regular file's bytes, at most ``limit`` (``what`` names it in errors, e.g. ``--file notes.txt``).

    Raises:
        PromptError: the file is missing, unreadable, not a regular file (a directory, a FIFO, a device), or larger
            than ``limit``.
    """
    try:  # O_NONBLOCK: opening a FIFO must not wait for a writer before we can refuse it
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise PromptError(f"{what}: no such file") from None
    except OSError as exc:
        raise PromptError(f"{what}: cannot open it ({exc.strerror or exc})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise PromptError(f"{what}: {kind} (give a file, or {STDIN} for standard input)")
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise PromptError(f"{what}: cannot read it ({exc.strerror or exc})") from None
    if len(data) > limit:
        raise PromptError(f"{what}: larger than {_size(limit)}")
    return data


def read_source(source: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """The bytes of ``source``: standard input for ``-``, else a regular file (see `read_stdin`, `read_file`)."""
    if str(source) == STDIN:
        return read_stdin(limit, what)
    return read_file(source, limit, what)


def decode_prompt(data: bytes, what: str) -> str:
    """A prompt from bytes read from stdin or a file: UTF-8, less a leading BOM and one trailing newline.

    Raises:
        PromptError: not valid UTF-8 (with the byte offset), empty, or too long (`check_prompt`), naming ``what``.
    """
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromptError(f"{what}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    text = text.removeprefix("\ufeff")
    text = text[:-2] if text.endswith("\r\n") else text.removesuffix("\n")
    try:
        check_prompt(text)
    except PromptError as exc:
        raise PromptError(f"{what}: {exc}") from None
    return text


def read_prompt(source: str | os.PathLike[str], what: str) -> str:
    """One prompt from standard input (``-``) or a file; ``what`` names the source in errors (``--file F``)."""
    return decode_prompt(read_source(source, MAX_PROMPT_BYTES, what), what)


# -- batches ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptRequest:
    """One prompt of a batch: its text, how to sample it, whether it goes through the chat template, and its id (the
    line number unless the line gave one)."""

    prompt: str
    sampling: SamplingOptions
    chat: bool = False
    id: str | int | None = None
    line: int = 0


def request_from_json(doc: Any, base: SamplingOptions, chat: bool = False) -> PromptRequest:
    """A request from one parsed JSON value: a string (the prompt), or an object with a ``"prompt"`` and optional
    ``max_new_tokens``, sampling options (`SamplingOptions` fields; ``stop`` a string or an array of strings),
    ``chat`` and ``id``; what it leaves out comes from ``base`` and ``chat``.

    Raises:
        PromptError: a value of another kind, a missing or empty prompt, an unknown key, a value of the wrong type or
            out of range; the message names the key.
    """
    if isinstance(doc, str):
        doc = {"prompt": doc}
    if not isinstance(doc, dict):
        raise PromptError(f'expected a JSON object with a "prompt", or a JSON string; got {_json_kind(doc)}')
    unknown = [key for key in doc if key != "prompt" and key not in _LINE_KEYS]
    if unknown:
        known = ", ".join(["prompt", *_LINE_KEYS])
        raise PromptError(f"unknown key {unknown[0]!r} (the keys are {known})")
    if "prompt" not in doc:
        raise PromptError('no "prompt"')
    if not isinstance(doc["prompt"], str):
        raise PromptError(f'"prompt" must be a string, got {_json_kind(doc["prompt"])}')
    check_prompt(doc["prompt"])
    for key, value in doc.items():
        if key == "prompt" or key == "id" and value is None:
            continue
        types, wanted = _LINE_KEYS[key]
        if not isinstance(value, types) or isinstance(value, bool) and bool not in types:
            raise PromptError(f'"{key}" must be {wanted}, got {_json_kind(value)}')
        if key == "stop":
            value = [value] if isinstance(value, str) else value
            if not all(isinstance(text, str) for text in value):
                kind = _json_kind(next(text for text in value if not isinstance(text, str)))
                raise PromptError(f'"stop" must be {wanted}, got an array holding {kind}')
        problem = sampling_problem(key, value)
        if problem:
            raise PromptError(f'"{key}" {problem}')
    overrides = {key: doc[key] for key in _SAMPLING_KEYS if key in doc}
    return PromptRequest(doc["prompt"], replace(base, **overrides), doc.get("chat", chat), doc.get("id"))


def parse_prompt_requests(data: bytes, what: str, base: SamplingOptions, chat: bool = False) -> list[PromptRequest]:
    """Every request of a JSON Lines batch, in order; blank lines are skipped; an ``id`` defaults to the line number.

    Raises:
        PromptError: the first bad line, as ``WHAT: line N: reason``; not UTF-8; no prompts; an id used twice.
    """
    try:
        text = data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise PromptError(f"{what}: line {line}: not valid UTF-8 ({exc.reason})") from None
    requests: list[PromptRequest] = []
    first_line: dict[Any, int] = {}
    # Lines end at "\n" only: JSON strings may hold U+2028 and other characters that str.splitlines() splits at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue

        def fail(reason: str, number: int = number) -> PromptError:
            return PromptError(f"{what}: line {number}: {reason}")

        doc = load_json(line, fail)
        try:
            request = request_from_json(doc, base, chat)
        except PromptError as exc:
            raise fail(str(exc)) from None
        if request.id is not None:
            key = (type(request.id).__name__, request.id)
            if key in first_line:
                raise fail(f"id {request.id!r} is used again (first on line {first_line[key]})")
            first_line[key] = number
        requests.append(replace(request, id=number if request.id is None else request.id, line=number))
    if not requests:
        raise PromptError(f"{what}: no prompts (one JSON object or string per line)")
    return requests


def read_prompt_requests(
    source: str | os.PathLike[str], what: str, base: SamplingOptions, chat: bool = False
) -> list[PromptRequest]:
    """The requests of a JSON Lines file, or of standard input for ``-`` (see `parse_prompt_requests`)."""
    return parse_prompt_requests(read_source(source, MAX_BATCH_BYTES, what), what, base, chat)


def _json_kind(value: Any) -> str:
    """A JSON value as an error message shows it: scalars as written (shortened), arrays and objects by kind."""
    if isinstance(value, (list, dict)):
        return "an array" if isinstance(value, list) else "an object"
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _size(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes:,} bytes"
