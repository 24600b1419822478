"""`zipmoe chat`: turns from a pipe, the history through the chat template, /reset, /stats, /exit, trimming to the
context with the system prompt kept, and one-line errors; `Conversation` on its own, without a model."""

import io
import json
import sys

import pytest

import zipmoe.runtime.engine as engine_module
from conftest import assert_one_line_error, copy_of, rewrite_manifest, run_cli
from zipmoe.pack import PackOptions, pack
from zipmoe.runtime.conversation import Conversation
from zipmoe.runtime.engine import Engine, EngineOptions
from zipmoe.runtime.request import PromptError, SamplingOptions

CPU = ("--device", "cpu", "--dtype", "float32")
REPLY = SamplingOptions(max_new_tokens=6)  # what `zipmoe chat -n 6` samples with


@pytest.fixture(scope="module")
def tiny(checkpoints):
    return checkpoints.packed(checkpoints.demo("tiny"))


@pytest.fixture(scope="module")
def short_context(tiny, tmp_path_factory):
    """The tiny container, its config saying the context is 64 tokens."""
    path = copy_of(tiny, tmp_path_factory.mktemp("short"))
    rewrite_manifest(path, lambda doc: doc["config"].update(max_position_embeddings=64))
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def reply(container, messages, sampling=REPLY) -> str:
    """What the model answers to ``messages``, computed without the chat command."""
    with Engine(container, EngineOptions(device="cpu", dtype="float32")) as e:
        return e.generate_text_from(e.encode_chat(messages), sampling)[0]


def chat(capsys, monkeypatch, container, stdin: bytes, *args):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    return run_cli(capsys, "chat", str(container), *args, *CPU)


def test_turns_keep_the_history_and_reset_forgets_it(capsys, monkeypatch, tiny):
    first = reply(tiny, [user("Hello")])
    second = reply(tiny, [user("Hello"), assistant(first), user("And then?")])
    assert second != reply(tiny, [user("And then?")])  # the history changes the answer
    code, out, err = chat(capsys, monkeypatch, tiny, b"Hello\nAnd then?\n/stats\n\n/reset\nHello\n", "-n", "6")
    assert code == 0, err
    assert out == f"{first}\n{second}\n{first}\n"  # after /reset, "Hello" is a first turn again
    assert "The conversation is forgotten." in err
    for row in ("turns (kept in the conversation / in all)", "tokens generated", "tokens/s", "experts served decoded"):
        assert row in err
    assert "Traceback" not in err and "Error" not in err


def test_exit_ends_the_chat(capsys, monkeypatch, tiny):
    first = reply(tiny, [user("Hello")])
    code, out, _ = chat(capsys, monkeypatch, tiny, b"Hello\n/exit\nHello again\n", "-n", "6")
    assert code == 0 and out == f"{first}\n"


@pytest.mark.parametrize("system", [None, "Be brief."])
def test_the_oldest_turns_are_dropped_to_fit_the_context(capsys, monkeypatch, short_context, system):
    # "<s>" + "user: Hello there, model\n" + "assistant: " is 37 byte-level tokens; with -n 8, 56 fit in 64.
    head = [{"role": "system", "content": system}] if system else []
    sampling = SamplingOptions(max_new_tokens=8)
    expected = reply(short_context, [*head, user("Tell me more, model")], sampling)
    args = ["-n", "8"] + (["--system", system] if system else [])
    code, out, err = chat(capsys, monkeypatch, short_context, b"Hello there, model\nTell me more, model\n", *args)
    assert code == 0, err
    assert out.endswith(f"\n{expected}\n")  # the second reply saw the second message alone (and the system prompt)
    kept = " (the system prompt is kept)" if system else ""
    assert f"the conversation's oldest 1 turn was dropped to fit the model's context of 64 tokens{kept}" in err


def test_a_message_that_cannot_fit_is_a_one_line_error(capsys, monkeypatch, short_context):
    code, _, err = chat(capsys, monkeypatch, short_context, b"x" * 80 + b"\n", "-n", "8")
    assert_one_line_error(
        code,
        err,
        "standard input, line 1: this message takes 99 tokens; with --max-new-tokens 8 more that exceeds the model's "
        "context of 64 tokens",
    )


@pytest.mark.parametrize(
    "stdin, message",
    [
        (b"/nope\n", "standard input, line 1: unknown command /nope (commands: /reset, /stats, /help, /exit, /quit)"),
        (b"\n\xff\n", "standard input, line 2: not valid UTF-8 (invalid start byte)"),
    ],
)
def test_bad_input_from_a_pipe_is_a_one_line_error(capsys, monkeypatch, tiny, stdin, message):
    code, _, err = chat(capsys, monkeypatch, tiny, stdin)
    assert_one_line_error(code, err, message)


def test_a_container_without_a_chat_template_is_refused_before_the_model_loads(
    capsys, monkeypatch, checkpoints, tmp_path
):
    source = copy_of(checkpoints.demo("tiny"), tmp_path)
    config = json.loads((source / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (source / "tokenizer_config.json").write_text(json.dumps(config))
    plain = tmp_path / "plain.zmoe"
    pack(str(source), plain, PackOptions())

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine_module, "Engine", refuse)
    code, _, err = chat(capsys, monkeypatch, plain, b"Hello\n")
    assert_one_line_error(code, err, "plain.zmoe: no chat template embedded", "zipmoe chat needs one")
    code, _, err = chat(capsys, monkeypatch, tmp_path / "missing.zmoe", b"Hello\n")
    assert_one_line_error(code, err, "missing.zmoe: no such file")
    code, _, err = chat(capsys, monkeypatch, plain, b"Hello\n", "--system", " ")
    assert_one_line_error(code, err, "--system: the prompt is empty")


def test_at_a_terminal_an_error_ends_the_turn_not_the_chat(capsys, monkeypatch, tiny):
    from zipmoe.cli.chat import _Session

    typed = iter(["/nope", "Hello"])

    def read_line(prompt=""):
        line = next(typed, None)
        if line is None:
            raise EOFError
        return line

    monkeypatch.setattr("builtins.input", read_line)
    with Engine(tiny, EngineOptions(device="cpu", dtype="float32")) as e:
        _Session(e, Conversation(), REPLY, quiet=False, interactive=True).run()
    out, err = capsys.readouterr()
    assert out == reply(tiny, [user("Hello")]) + "\n"
    assert "Error: unknown command /nope" in err


# -- Conversation, without a model ------------------------------------------------------------------------------------


def count(messages):
    """One token per character of each message and one for its role: a stand-in for the chat template."""
    return list(range(sum(len(m["content"]) + 1 for m in messages)))


def test_conversation_drops_the_oldest_turns_and_keeps_the_system_prompt():
    conversation = Conversation("sys")  # 4 tokens
    for i in range(3):
        conversation.add(f"question {i}", f"answer {i}")  # 11 + 9 tokens a turn
    assert [m["role"] for m in conversation.messages("next")] == ["system"] + ["user", "assistant"] * 3 + ["user"]
    prompt = conversation.prompt("next", count, context=60, max_new_tokens=10)  # room for 50: 4 + 5 + 2 turns
    assert (prompt.dropped_turns, len(prompt.ids)) == (1, 4 + 5 + 40)
    assert [t.user for t in conversation.turns] == ["question 1", "question 2"]
    assert conversation.messages()[0] == {"role": "system", "content": "sys"}
    conversation.reset()
    assert conversation.turns == [] and conversation.messages() == [{"role": "system", "content": "sys"}]


def test_a_message_that_cannot_fit_leaves_the_history_as_it_was():
    conversation = Conversation()
    conversation.add("hi", "hello")
    with pytest.raises(PromptError, match="^this message takes 31 tokens; with --max-new-tokens 10 more that exceeds"):
        conversation.prompt("x" * 30, count, context=30, max_new_tokens=10)
    assert len(conversation.turns) == 1
    with pytest.raises(PromptError, match="leaves no room for a prompt in the model's context of 10 tokens"):
        conversation.prompt("x", count, context=10, max_new_tokens=10)
    with pytest.raises(PromptError, match="the prompt is empty"):
        conversation.prompt("   ", count, context=100, max_new_tokens=10)
    with pytest.raises(PromptError, match="^--system: the prompt is empty$"):
        Conversation("")
