"""Reading the fields of an untrusted JSON object (a ``config.json``) with their types and ranges checked.

Every reader records a bad value as a one-line problem naming the key, what was expected and what was found, and
reads it as None, so a caller can list every problem of a file at once. This module does not import torch.
"""

from __future__ import annotations

import math
from typing import Any

# Caps on what a config.json may claim. The largest published MoE models are far below each (DeepSeek-V3: 61 layers,
# hidden 7168, 128 heads, 256 experts of 2048, vocabulary 129,280; Llama 4 Scout: 10M context), so a value above a
# cap is a corrupt or hostile file.
MAX_LAYERS = 1024
MAX_HIDDEN = 65_536
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_EXPERTS = 4096
MAX_INTERMEDIATE = 262_144
MAX_VOCAB = 4_194_304
MAX_CONTEXT = 16_777_216


class Fields:
    """Reads fields of a JSON object with their types and ranges checked. A missing or null field takes its default;
    a bad one is recorded as a one-line problem and read as None."""

    def __init__(self, doc: dict[str, Any], file: str = "config.json", problems: list[str] | None = None) -> None:
        self.doc, self.file = doc, file
        self.problems = [] if problems is None else problems

    def fail(self, message: str) -> None:
        self.problems.append(f"{self.file}: {message}")

    def bad(self, key: str, expected: str, value: Any) -> None:
        self.fail(f"{key!r} must be {expected}, got {show(value)}")

    def integer(self, key: str, low: int, high: int, default: Any = ...) -> int | None:
        value = self.doc.get(key)
        if value is None:
            if default is ...:
                self.fail(f"{key!r} is missing (an integer in {low}..{high})")
                return None
            return default
        if not (is_int(value) and low <= value <= high):
            return self.bad(key, f"an integer in {low}..{high}", value)
        return value

    def number(self, key: str, default: float | None, below: float = math.inf) -> float | None:
        """A finite number in ``(0, below)``."""
        value = self.doc.get(key)
        if value is None:
            return default
        if not (is_finite(value) and 0 < value < below):
            return self.bad(key, "a finite number > 0" + (f" and < {below:g}" if below < math.inf else ""), value)
        return float(value)

    def flag(self, key: str, default: bool) -> bool | None:
        value = self.doc.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            return self.bad(key, "true or false", value)
        return value

    def integers(self, key: str, low: int, high: int) -> list[int] | None:
        value = self.doc.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(is_int(v) and low <= v <= high for v in value):
            return self.bad(key, f"a list of integers in {low}..{high}", value)
        return value

    def choices(self, key: str, allowed: tuple[str, ...], length: int | None) -> list[str] | None:
        value = self.doc.get(key)
        if value is None:
            return None
        if not isinstance(value, list) or len(value) != (length or len(value)) or not all(v in allowed for v in value):
            return self.bad(key, f"a list of {length} values from {', '.join(allowed)}", value)
        return value

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str | None:
        """One string from ``allowed``."""
        value = self.doc.get(key)
        if value is None:
            return default
        if value not in allowed:
            return self.bad(key, f"one of {', '.join(allowed)}", value)
        return value

    def token_ids(self, key: str, vocab_size: int | None) -> tuple[int, ...] | None:
        value = self.doc.get(key)
        if value is None:
            return ()
        high = (vocab_size or MAX_VOCAB) - 1
        ids = value if isinstance(value, list) else [value]
        if not all(is_int(i) and 0 <= i <= high for i in ids):
            return self.bad(key, f"a token id in 0..{high} or a list of them", value)
        return tuple(ids)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def first_set(doc: dict[str, Any], key: str, fallback: str) -> str:
    return key if doc.get(key) is not None else fallback


def is_finite(value: Any) -> bool:
    """A JSON number that converts to a finite float."""
    return isinstance(value, float) and math.isfinite(value) or is_int(value) and value.bit_length() < 1024


def show(value: Any) -> str:
    """A short repr of an untrusted value (huge integers and long lists are summarised)."""
    if is_int(value) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    text = repr(value) if not isinstance(value, (list, dict)) or len(value) <= 16 else f"a {type(value).__name__}"
    return text if len(text) <= 80 else text[:77] + "..."
