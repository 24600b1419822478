"""Stop strings: `StopMatcher` streams text token by token, holds back what may start a stop string, and ends the
text before the first stop string (not returned, as in the OpenAI API); `run` and `chat` stop on them."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import run_cli
from zipmoe.runtime.engine import Engine, EngineOptions
from zipmoe.runtime.request import SamplingOptions
from zipmoe.runtime.stops import StopMatcher, first_stop, held_suffix

CPU = ("--device", "cpu", "--dtype", "float32")


class PieceTokenizer:
    """A tokenizer whose token ``i`` decodes to ``pieces[i]`` (what `StreamDecoder` needs of one)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: list[int]) -> str:
        return "".join(self.pieces[i] for i in ids)


def stream(pieces: list[str], stop: tuple[str, ...]) -> tuple[list[str], bool, str, int]:
    """Push each piece as one token: what came out at each push, whether it stopped, what flush gave, tokens used."""
    matcher = StopMatcher(PieceTokenizer(pieces), stop)
    out = []
    for token in range(len(pieces)):
        text, stopped = matcher.push(token)
        out.append(text)
        if stopped:
            return out, True, matcher.flush(), matcher.tokens
    return out, False, matcher.flush(), matcher.tokens


def test_text_streams_through_without_stop_strings():
    assert stream(["Hel", "lo", " world"], ()) == (["Hel", "lo", " world"], False, "", 3)


def test_a_stop_string_within_a_token_ends_the_text_before_it():
    assert stream(["Hello", " wor", "ld. Bye", " more"], (".",)) == (["Hello", " wor", "ld"], True, "", 3)


def test_a_stop_string_across_tokens_is_held_back_until_it_is_known():
    out, stopped, tail, tokens = stream(["The an", "swer", " is 4", "2"], ("answer is",))
    assert out == ["The ", "", ""] and stopped and tokens == 3


def test_held_text_is_released_when_the_stop_string_does_not_follow():
    out, stopped, tail, _ = stream(["a ##", "# b", " ##", "#"], ("####",))
    assert out == ["a ", "### b", " ", ""] and not stopped and tail == "###"
    assert "".join(out) + tail == "a ### b ###"


def test_the_earliest_stop_string_wins_whatever_the_list_order():
    assert stream(["x END y STOP"], ("STOP", "END")) == (["x "], True, "", 1)
    assert first_stop("abcdef", ("cdef", "cd", "b")) == (1, "b")
    assert first_stop("abcdef", ("cd", "cdef")) == (2, "cdef")


def test_after_a_stop_every_push_is_empty():
    matcher = StopMatcher(PieceTokenizer(["a", "\n", "b"]), ("\n",))
    assert [matcher.push(t) for t in range(3)] == [("a", False), ("", True), ("", True)]
    assert (matcher.tokens, matcher.stop_string) == (2, "\n")


def test_incomplete_characters_wait_for_their_bytes():
    """`StreamDecoder` emits nothing while the text ends in U+FFFD (a character whose bytes have not all come)."""

    class Bytes:
        def decode(self, ids):
            return bytes(ids).decode("utf-8", errors="replace")

    matcher = StopMatcher(Bytes(), ("é!",))
    pushed = [matcher.push(b) for b in b"caf" + "é!".encode()]
    assert [text for text, _ in pushed] == ["c", "a", "f", "", "", ""] and pushed[-1][1]


def test_held_suffix():
    assert held_suffix("abc", ("cde",)) == 1
    assert held_suffix("abcd", ("bcdx", "cd!")) == 3
    assert held_suffix("abc", ("abc",)) == 0  # a whole stop string is a match, not a prefix
    assert held_suffix("xyz", ("abc",)) == 0
    assert held_suffix("a", ("aaaa",)) == 1


@given(
    pieces=st.lists(st.text(alphabet="ab\n", max_size=4), max_size=12),
    stop=st.lists(st.text(alphabet="ab\n", min_size=1, max_size=3), min_size=1, max_size=4),
)
def test_streamed_text_is_the_text_cut_at_the_first_stop_string(pieces, stop):
    """Whatever the token boundaries: the text before the earliest stop string (all of it when none appears), and
    nothing emitted is ever taken back."""
    out, stopped, tail, tokens = stream(pieces, tuple(stop))
    text = "".join(pieces)
    match = first_stop(text, stop)
    assert "".join(out) + tail == (text if match is None else text[: match[0]])
    assert stopped == (match is not None)
    if stopped:  # the token that completed the stop string is the last one used
        assert first_stop("".join(pieces[:tokens]), stop) is not None
        assert first_stop("".join(pieces[: tokens - 1]), stop) is None


# -- end to end -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(checkpoints):
    return checkpoints.packed(checkpoints.demo("tiny"))


# A seeded sample of the tiny demo, whose byte-level tokens give some ASCII (greedy gives mostly invalid UTF-8).
SAMPLED = SamplingOptions(max_new_tokens=16, temperature=1.0, seed=1, stop_at_eos=False)


def a_stop_string(text: str) -> str:
    """Two ASCII letters or digits in a row from the middle of ``text``: most likely two tokens."""
    for i in range(2, len(text) - 1):
        if text[i : i + 2].isascii() and text[i : i + 2].isalnum():
            return text[i : i + 2]
    raise AssertionError(f"no two ASCII characters in a row in {text!r}")


def test_generate_text_stops_at_a_stop_string_and_tells_the_token_loop(tiny):
    with Engine(tiny, EngineOptions(device="cpu", dtype="float32")) as e:
        full, _ = e.generate_text("Hello", SAMPLED)
        stop = a_stop_string(full)
        returned = []
        generate_tokens = e.generate_tokens

        def spy(ids, sampling, on_token=None):  # what the callback tells the token loop, token by token
            return generate_tokens(ids, sampling, lambda token: returned.append(on_token(token)) or returned[-1])

        e.generate_tokens = spy
        pieces = []
        text, result = e.generate_text("Hello", SamplingOptions(**{**SAMPLED.__dict__, "stop": (stop,)}),
                                       on_text=pieces.append)  # fmt: skip
    assert text == full[: full.index(stop)] == "".join(pieces)
    assert result.finish_reason == "stop"
    assert returned[: len(result.tokens)] == [False] * (len(result.tokens) - 1) + [True]
    assert len(result.step_seconds) == len(result.tokens) - 1


def test_run_stops_at_a_stop_string(capsys, tiny):
    """`zipmoe run --stop`: the text before it, finish_reason stop, and the tokens up to the one that completed it
    (needs a token loop that ends the sequence when ``on_token`` returns True)."""
    args = ("run", str(tiny), "Hello", "-n", "16", "--temperature", "1", "--seed", "1", "--ignore-eos", *CPU)
    code, out, err = run_cli(capsys, *args, "--json")
    full = json.loads(out)
    stop = a_stop_string(full["text"])
    code, out, err = run_cli(capsys, *args, "--json", "--stop", stop, "--stop", "never seen")
    assert code == 0, err
    stopped = json.loads(out)
    assert stopped["text"] == full["text"][: full["text"].index(stop)]
    assert stopped["finish_reason"] == "stop" and stopped["new_tokens"] < full["new_tokens"]
    assert stopped["usage"]["completion_tokens"] == stopped["new_tokens"]
    code, out, err = run_cli(capsys, *args, "--stop", stop)
    assert code == 0 and out == stopped["text"] + "\n" and "stop (a --stop string)" in err
