"""Prompts from stdin, files and JSON Lines batches (`zipmoe run C -`, `--file`, `--prompts`), the cache kept warm
between the prompts of one engine, per-prompt statistics, and `finish_reason`."""

import io
import json
import os
import subprocess
import sys

import pytest

import zipmoe.runtime.engine as engine_module
import zipmoe.runtime.request as request_module
from conftest import assert_one_line_error, copy_of, rewrite_manifest, run_cli
from zipmoe.runtime.engine import Engine, EngineOptions
from zipmoe.runtime.request import PromptError, SamplingOptions, parse_prompt_requests
from zipmoe.runtime.routing import RoutingTrace

CPU = ("--device", "cpu", "--dtype", "float32")


@pytest.fixture(scope="module")
def tiny(checkpoints):
    return checkpoints.packed(checkpoints.demo("tiny"))


def engine(path, **options) -> Engine:
    return Engine(path, EngineOptions(device="cpu", dtype="float32", **options))


def with_config(container, tmp_path, **changes):
    """A copy of ``container`` whose config.json (in the manifest) has ``changes``."""
    path = copy_of(container, tmp_path)
    rewrite_manifest(path, lambda doc: doc["config"].update(changes))
    return path


def stdin_of(monkeypatch, data: bytes) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def run_json(capsys, container, *args) -> dict:
    code, out, err = run_cli(capsys, "run", str(container), *args, *CPU, "--json")
    assert code == 0, err
    return json.loads(out)


def no_engine(monkeypatch) -> None:
    """Make loading a model fail the test: what is checked must be checked before the model loads."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(engine_module, "Engine", refuse)


# -- one prompt from stdin or a file ----------------------------------------------------------------------------------


def test_a_prompt_from_stdin_or_a_file_is_the_argument_prompt(capsys, monkeypatch, tiny, tmp_path):
    expected = run_json(capsys, tiny, "Hello, caches", "-n", "6")
    stdin_of(monkeypatch, b"Hello, caches\n")  # as `echo` writes it: the one trailing newline is not the prompt's
    from_stdin = run_json(capsys, tiny, "-", "-n", "6")
    prompt_file = tmp_path / "prompt.txt"
    prompt_file.write_bytes(b"\xef\xbb\xbfHello, caches\r\n")  # an editor's BOM and CR LF
    from_file = run_json(capsys, tiny, "--file", str(prompt_file), "-n", "6")
    for doc in (from_stdin, from_file):
        assert (doc["text"], doc["prompt_tokens"], doc["new_tokens"]) == (
            expected["text"],
            expected["prompt_tokens"],
            6,
        )
    stdin_of(monkeypatch, b"Hello, caches\n\n")  # only one newline goes: the other is the prompt's last token
    assert run_json(capsys, tiny, "-", "-n", "6")["prompt_tokens"] == expected["prompt_tokens"] + 1


@pytest.mark.parametrize(
    "stdin, message",
    [
        (b"caf\xe9\n", "standard input: not valid UTF-8 (invalid continuation byte at byte 3)"),
        (b"", "standard input: the prompt is empty"),
        (b" \n", "standard input: the prompt is empty"),
        (b"x" * 64, "standard input: larger than 32 bytes"),
    ],
)
def test_bad_stdin_is_a_one_line_error_before_the_model_loads(capsys, monkeypatch, tiny, stdin, message):
    monkeypatch.setattr(request_module, "MAX_PROMPT_BYTES", 32)
    no_engine(monkeypatch)
    stdin_of(monkeypatch, stdin)
    code, _, err = run_cli(capsys, "run", str(tiny), "-", *CPU)
    assert_one_line_error(code, err, message)


def test_bad_prompt_files_are_one_line_errors(capsys, monkeypatch, tiny, tmp_path):
    no_engine(monkeypatch)
    monkeypatch.setattr(request_module, "MAX_PROMPT_BYTES", 32)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # opening it must not wait for a writer
    big = tmp_path / "big.txt"
    big.write_text("x" * 33)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    for path, message in [
        (tmp_path / "missing.txt", "missing.txt: no such file"),
        (tmp_path, "a directory (give a file, or - for standard input)"),
        (fifo, "fifo: not a regular file"),
        (big, "big.txt: larger than 32 bytes"),
        (latin1, "latin1.txt: not valid UTF-8 (unexpected end of data at byte 3)"),
    ]:
        code, _, err = run_cli(capsys, "run", str(tiny), "--file", str(path), *CPU)
        assert_one_line_error(code, err, f"--file {tmp_path}", message)


@pytest.mark.parametrize(
    "args, message",
    [
        ([], "give one prompt: an argument, - for standard input, --file FILE or --prompts FILE"),
        (["Hello", "--file", "x.txt"], "(not both PROMPT and --file)"),
        (["--file", "x.txt", "--prompts", "p.jsonl"], "(not both --file and --prompts)"),
    ],
)
def test_exactly_one_source_of_prompts(capsys, monkeypatch, tiny, args, message):
    no_engine(monkeypatch)
    code, _, err = run_cli(capsys, "run", str(tiny), *args, *CPU)
    assert_one_line_error(code, err, message)


# -- many prompts on one engine ---------------------------------------------------------------------------------------


def test_prompts_give_the_tokens_of_separate_runs_in_order_with_a_warm_cache(capsys, monkeypatch, tiny, tmp_path):
    batch = tmp_path / "batch.jsonl"
    lines = [
        {"prompt": "Hello", "max_new_tokens": 5},
        "The cache stays warm",
        {"prompt": "Hello", "max_new_tokens": 5, "id": "again"},
        {"prompt": "hi", "chat": True, "max_new_tokens": 3},
    ]
    batch.write_text("\n".join(json.dumps(line) for line in lines) + "\n\n")  # a blank line is skipped
    trace = tmp_path / "routing.jsonl"
    code, out, err = run_cli(
        capsys, "run", str(tiny), "--prompts", str(batch), "-n", "7", "--record-routing", str(trace), *CPU
    )
    assert code == 0, err
    assert out.endswith("\n") and len(out.splitlines()) == 4
    assert len(RoutingTrace.read(trace).requests) == 4  # one request a prompt
    results = [json.loads(line) for line in out.splitlines()]
    assert [r["id"] for r in results] == [1, 2, "again", 4]  # in input order; the line number unless given
    separate = [
        run_json(capsys, tiny, "Hello", "-n", "5"),
        run_json(capsys, tiny, "The cache stays warm", "-n", "7"),
        run_json(capsys, tiny, "Hello", "-n", "5"),
        run_json(capsys, tiny, "hi", "--chat", "-n", "3"),
    ]
    for result, alone in zip(results, separate):
        for key in ("text", "prompt_tokens", "new_tokens", "finish_reason"):
            assert result[key] == alone[key], key
        assert result["ttft_seconds"] > 0 and result["tpot_seconds"] > 0
    # The first prompt read its experts from storage; the third, the same prompt, found all of them held.
    first, third = results[0]["cache"], results[2]["cache"]
    assert first["served_from"]["storage"] > 0
    assert third["served_from"].get("storage", 0) == 0 and third["served_from"]["decoded"] == third["requests"] > 0
    assert third["bytes_read"] == 0 and first["bytes_read"] > 0


def test_prompts_from_stdin(capsys, monkeypatch, tiny):
    stdin_of(monkeypatch, b'"Hello"\n{"prompt": "Hi", "id": "b"}\n')
    code, out, err = run_cli(capsys, "run", str(tiny), "--prompts", "-", "-n", "2", *CPU)
    assert code == 0, err
    assert [json.loads(line)["id"] for line in out.splitlines()] == [1, "b"]


def test_a_bad_line_is_reported_before_the_model_loads(capsys, monkeypatch, tiny, tmp_path):
    no_engine(monkeypatch)
    batch = tmp_path / "batch.jsonl"
    batch.write_text('{"prompt": "fine"}\n"also fine"\n\n{"prompt": "Hi", "max_tokens": 5}\n')
    code, out, err = run_cli(capsys, "run", str(tiny), "--prompts", str(batch), *CPU)
    assert_one_line_error(code, err, f"--prompts {batch}: line 4: unknown key 'max_tokens' (the keys are prompt, id,")
    assert out == ""


@pytest.mark.parametrize(
    "text, message",
    [
        (b'{"prompt": 5}', 'line 1: "prompt" must be a string, got 5'),
        (b'"ok"\n[1, 2]', 'line 2: expected a JSON object with a "prompt", or a JSON string; got an array'),
        (b'"ok"\n{"prompt": "x"', "line 2: not UTF-8 JSON"),
        (b'{"id": 3}', 'line 1: no "prompt"'),
        (b'{"prompt": "  "}', "line 1: the prompt is empty"),
        (b'{"prompt": "x", "temperature": -1}', 'line 1: "temperature" must be a finite number >= 0, got -1'),
        (b'{"prompt": "x", "top_p": 2}', 'line 1: "top_p" must be between 0 and 1, got 2'),
        (b'{"prompt": "x", "max_new_tokens": 0}', 'line 1: "max_new_tokens" must be at least 1, got 0'),
        (b'{"prompt": "x", "top_k": -1}', 'line 1: "top_k" must be an integer >= 0 (0: off), got -1'),
        (b'{"prompt": "x", "top_k": 1.5}', 'line 1: "top_k" must be an integer, got 1.5'),
        (b'{"prompt": "x", "min_p": 2}', 'line 1: "min_p" must be between 0 and 1, got 2'),
        (b'{"prompt": "x", "repetition_penalty": 0}', 'line 1: "repetition_penalty" must be a finite number > 0'),
        (b'{"prompt": "x", "frequency_penalty": -3}', 'line 1: "frequency_penalty" must be between -2 and 2, got -3'),
        (b'{"prompt": "x", "presence_penalty": "1"}', 'line 1: "presence_penalty" must be a number, got "1"'),
        (b'{"prompt": "x", "stop": 5}', 'line 1: "stop" must be a string or an array of strings, got 5'),
        (b'{"prompt": "x", "stop": ["a", 1]}', 'line 1: "stop" must be a string or an array of strings, got an array'),
        (b'{"prompt": "x", "stop": ""}', "line 1: \"stop\" must be non-empty strings, got ''"),
        (b'{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}', 'line 1: "stop" must be at most 4 strings, got 5'),
        (b'{"prompt": "x", "max_new_tokens": 2.5}', 'line 1: "max_new_tokens" must be an integer, got 2.5'),
        (b'{"prompt": "x", "seed": true}', 'line 1: "seed" must be an integer, got true'),
        (b'{"prompt": "x", "chat": "yes"}', 'line 1: "chat" must be true or false, got "yes"'),
        (b'{"prompt": "x", "id": [1]}', 'line 1: "id" must be a string or an integer, got an array'),
        (b'{"prompt": "a", "id": "x"}\n{"prompt": "b", "id": "x"}', "line 2: id 'x' is used again (first on line 1)"),
        (b'"ok"\n"caf\xe9"', "line 2: not valid UTF-8 (invalid continuation byte)"),
        (b"\n  \n", "no prompts (one JSON object or string per line)"),
        (b'"\\ud800"', "line 1: the prompt is not valid UTF-8"),
    ],
)
def test_bad_lines_name_their_line(text, message):
    with pytest.raises(PromptError) as info:
        parse_prompt_requests(text, "batch.jsonl", SamplingOptions())
    assert str(info.value).startswith(f"batch.jsonl: {message}"), str(info.value)


def test_lines_override_the_flags_and_keep_the_rest():
    base = SamplingOptions(max_new_tokens=9, temperature=0.5, seed=3, truncate=True)
    text = '{"prompt": "a\u2028b", "temperature": 0, "id": 7}\n"plain"\n'.encode()  # U+2028 is not a line end
    first, second = parse_prompt_requests(text, "batch", base, chat=True)
    assert (first.prompt, first.id, first.line, first.chat) == ("a\u2028b", 7, 1, True)
    assert first.sampling == SamplingOptions(max_new_tokens=9, temperature=0, seed=3, truncate=True)
    assert (second.prompt, second.id, second.line, second.sampling) == ("plain", 2, 2, base)


def test_lines_take_every_sampling_option():
    line = {"prompt": "x", "top_k": 5, "min_p": 0.1, "repetition_penalty": 1.2, "frequency_penalty": -0.5,
            "presence_penalty": 2, "stop": "\n", "seed": 4}  # fmt: skip
    (request,) = parse_prompt_requests(json.dumps(line).encode(), "batch", SamplingOptions(top_p=0.9))
    assert request.sampling == SamplingOptions(
        top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.2, frequency_penalty=-0.5, presence_penalty=2,
        stop=("\n",), seed=4,
    )  # fmt: skip
    (request,) = parse_prompt_requests(b'{"prompt": "x", "stop": ["a", "bc"]}', "batch", SamplingOptions())
    assert request.sampling.stop == ("a", "bc")


def test_a_prompt_the_model_cannot_take_fails_alone(capsys, tiny, tmp_path):
    short = with_config(tiny, tmp_path, max_position_embeddings=64)
    batch = tmp_path / "batch.jsonl"
    batch.write_text(json.dumps("x" * 100) + "\n" + json.dumps("Hello") + "\n")
    code, out, err = run_cli(capsys, "run", str(short), "--prompts", str(batch), "-n", "4", *CPU)
    assert_one_line_error(code, err, '1 of 2 prompts failed (their result lines hold the "error")')
    failed, fine = (json.loads(line) for line in out.splitlines())
    assert failed == {
        "id": 1,
        "error": "the prompt has 100 tokens and --max-new-tokens 4 asks for 4 more: 104 exceeds the model's context "
        "of 64 tokens (use --truncate to keep the last 60 prompt tokens)",
    }
    assert fine["id"] == 2 and fine["new_tokens"] == 4


# -- per-request statistics and finish_reason -------------------------------------------------------------------------


def test_the_cache_stays_warm_across_calls_and_each_call_has_its_own_stats(tiny):
    sampling = SamplingOptions(max_new_tokens=6, stop_at_eos=False)
    with engine(tiny, memory_budget="2.5MB") as e:  # part of the experts: some reads on every call
        _, first = e.generate_text("Hello there", sampling)
        _, second = e.generate_text("Hello there", sampling)
        total = e.pipeline.stats
        assert first.cache.total_requests + second.cache.total_requests == total.total_requests
        assert first.cache.total_bytes_read + second.cache.total_bytes_read == total.total_bytes_read
        for where in total.served_from:
            assert (
                first.cache.served_from.get(where, 0) + second.cache.served_from.get(where, 0)
                == (total.served_from[where])
            )
        assert len(first.cache.decode_misses) == len(second.cache.decode_misses) == 5  # one per decode step
        assert first.cache.served_from["storage"] > 0
        # what the first call left in the tiers serves the second: fewer reads from storage
        assert second.cache.served_from.get("storage", 0) < first.cache.served_from["storage"]
    with engine(tiny) as e:  # every expert fits: the second call reads nothing
        e.generate_text("Hello there", sampling)
        _, again = e.generate_text("Hello there", sampling)
        assert again.cache.total_bytes_read == 0 and again.cache.served_from.get("storage", 0) == 0
        assert again.cache.served_from["decoded"] == again.cache.total_requests > 0


def test_finish_reason_stop_at_eos_and_length_at_max_new_tokens(capsys, tiny, tmp_path):
    with engine(tiny) as e:
        first = e.generate_text("Hello", SamplingOptions(max_new_tokens=1))[1].tokens[0]
    plain = run_json(capsys, tiny, "Hello", "-n", "3")
    assert (plain["finish_reason"], plain["new_tokens"]) == ("length", 3)
    # The same container, its config saying the first token the model picks ends a sequence.
    stops = with_config(tiny, tmp_path, eos_token_id=first)
    stopped = run_json(capsys, stops, "Hello", "-n", "3")
    assert (stopped["finish_reason"], stopped["new_tokens"]) == ("stop", 1)
    ignored = run_json(capsys, stops, "Hello", "-n", "3", "--ignore-eos")
    assert (ignored["finish_reason"], ignored["new_tokens"]) == ("length", 3)
    code, out, err = run_cli(capsys, "run", str(stops), "Hello", "-n", "3", *CPU)
    assert code == 0 and "stop (end-of-sequence token)" in err


def test_request_and_conversation_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import zipmoe.runtime.conversation, zipmoe.runtime.request\n"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
