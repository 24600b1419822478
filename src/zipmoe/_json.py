"""Parsing JSON that strangers wrote: nesting depth and number length are bounded before the parser sees them.

Python's ``json`` recurses once per nesting level (100,000 ``[`` raise RecursionError) and refuses integers of more
than 4,300 digits with a ValueError that does not say where. `load_json` scans the text once, outside string
literals, and refuses a document nested deeper than `MAX_DEPTH` or holding a number longer than `MAX_NUMBER_CHARS`
before parsing it; every failure is a ``ValueError`` subclass raised by the caller's ``fail`` function, one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

MAX_DEPTH = 64  # manifests nest 6 levels, Hugging Face configs and tokenizers rarely more than 10
MAX_NUMBER_CHARS = 64  # a float64 needs 24; a u64 20

# Outside strings: brackets, string literals (skipped whole), and number tokens. The string pattern is the unrolled
# loop: `(?:[^"\\]|\\.)*` would take ~100 bytes of regex stack per character (5.7 GB for a 50 MB string).
_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]|-?[0-9][0-9eE.+-]*', re.DOTALL)


def check_json_bounds(text: str, max_depth: int = MAX_DEPTH, max_number: int = MAX_NUMBER_CHARS) -> str | None:
    """What makes ``text`` too deep or too long-numbered to parse, or None when it is within the bounds."""
    depth = 0
    for m in _TOKENS.finditer(text):
        token = m.group()
        first = token[0]
        if first == '"':
            continue
        if first in "[{":
            depth += 1
            if depth > max_depth:
                return f"nested deeper than {max_depth} levels (at character {m.start()})"
        elif first in "]}":
            depth -= 1
        elif len(token) > max_number:
            return f"a number of {len(token)} characters (at character {m.start()}; at most {max_number})"
    return None


def load_json(data: bytes | str, fail: Callable[[str], Exception], *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON; ``fail(reason)`` builds the exception raised for any problem.

    Args:
        data: UTF-8 bytes or text.
        fail: turns a one-line reason (``not UTF-8 JSON ...``, ``nested deeper than ...``) into the caller's error.
        max_depth: the deepest nesting accepted.

    Raises:
        whatever ``fail`` returns: invalid UTF-8, invalid JSON, too deep, a number too long, NaN or Infinity.
    """
    if isinstance(data, (bytes, bytearray, memoryview)):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise fail(f"not UTF-8 JSON ({exc.reason} at byte {exc.start})") from None
    else:
        text = data
    problem = check_json_bounds(text, max_depth)
    if problem:
        raise fail(problem)
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise fail(f"not UTF-8 JSON ({exc})") from None


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
