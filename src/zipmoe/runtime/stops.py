"""Stop strings: the generated text ends before the first stop string to appear, as in the OpenAI API (the stop
string itself is not returned, and the sequence ends with ``finish_reason`` ``"stop"``).

A `StopMatcher` is fed one token at a time and streams text through `StreamDecoder`. It holds back the longest end
of the text that could still be the start of a stop string (``"Hel"`` while ``"Hello"`` is one), so what it has
emitted never has to be taken back; at a match it emits the text before the stop string and says so.

The token loop is told to stop through ``on_token``: a callback returning True ends the sequence with
``finish_reason`` ``"stop"`` (the contract of the generation loop and the batch scheduler). Torch-free.
"""

from __future__ import annotations

from collections.abc import Sequence

from zipmoe.runtime.tokenizer import StreamDecoder, TextTokenizer


class StopMatcher:
    """Finds stop strings in the text of a stream of tokens.

    Args:
        tokenizer: decodes the tokens.
        stop: the stop strings (non-empty; `zipmoe.runtime.request.SamplingOptions` checks them); none: the text
            streams through unchanged.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()) -> None:
        self.decoder = StreamDecoder(tokenizer)
        self.stop = tuple(s for s in stop if s)
        self.held = ""  # decoded text not emitted yet: the start of a stop string, perhaps
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that matched
        self.tokens = 0  # tokens pushed, up to and including the one that completed a stop string

    def push(self, token: int) -> tuple[str, bool]:
        """Take the next token: the text that can be emitted now, and whether a stop string has appeared (then the
        text is what came before it, and every later push gives ``("", True)``)."""
        if self.stopped:
            return "", True
        self.tokens += 1
        text = self.held + self.decoder.push(token)
        if not self.stop:
            return text, False
        match = first_stop(text, self.stop)
        if match is not None:
            index, self.stop_string = match
            self.stopped, self.held = True, ""
            return text[:index], True
        keep = held_suffix(text, self.stop)
        self.held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """The text held back, for when the sequence ends without a stop string ("" after one)."""
        held, self.held = self.held, ""
        return held


def first_stop(text: str, stop: Sequence[str]) -> tuple[int, str] | None:
    """Where the earliest stop string in ``text`` starts, and which it is (the longest of those starting there)."""
    best: tuple[int, str] | None = None
    for s in stop:
        index = text.find(s)
        if index >= 0 and (best is None or index < best[0] or index == best[0] and len(s) > len(best[1])):
            best = (index, s)
    return best


def held_suffix(text: str, stop: Sequence[str]) -> int:
    """The length of the longest end of ``text`` that is the start of a stop string, but not the whole of one."""
    longest = min(len(text), max((len(s) for s in stop), default=1) - 1)
    for n in range(longest, 0, -1):
        tail = text[-n:]
        if any(len(s) > n and s.startswith(tail) for s in stop):
            return n
    return 0
