"""`zipmoe serve` against a live uvicorn server on a free port over the tiny demo container: the ``openai`` package
for completions, chat, streaming, stop strings and usage; httpx for the errors (bad JSON, bad parameters, over the
context, a body too large, a wrong key), a client that goes away mid-stream or mid-request (its sequence cancelled),
64 concurrent clients, a full queue (503), and /metrics; a batch of one gives `Engine.generate_tokens`' tokens."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import uvicorn

from conftest import assert_one_line_error, run_cli
from test_serve_schemas import parse_prometheus
from test_startup import zipmoe_without_torch
from zipmoe.cli.serve import listen
from zipmoe.runtime.engine import Engine, EngineOptions
from zipmoe.runtime.request import SamplingOptions
from zipmoe.runtime.routing import RoutingError
from zipmoe.server.app import ServerOptions, ServerOptionsError, create_app

KEY = "test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONTEXT = 1024  # --max-context of the module's server (the tiny model's own is 4096)
LONG = 1000  # max_tokens of requests that must still be running when their client goes: seconds at this model's speed
ENGINE = EngineOptions(device="cpu", dtype="float32", threads=1)
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]


class LiveServer:
    """``create_app(engine, options)`` served by uvicorn in a thread on a free port of 127.0.0.1."""

    def __init__(self, engine: Engine, options: ServerOptions) -> None:
        self.app = create_app(engine, options)
        sock = listen("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)

    @property
    def scheduler(self):
        return self.app.state.server.worker.scheduler

    def wait_idle(self) -> None:
        """Until no sequence is active or waiting."""
        wait_for(lambda: not (self.scheduler.active or self.scheduler.waiting))

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        assert not self.thread.is_alive()


def wait_for(condition, timeout: float = 10.0) -> None:
    """Until ``condition()`` holds (fails after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


@pytest.fixture(scope="module")
def tiny(checkpoints):
    return checkpoints.packed(checkpoints.demo("tiny"))


@pytest.fixture(scope="module")
def reference(tiny):
    """A second engine over the same container, for what `zipmoe run` gives (the served one is busy serving)."""
    with Engine(tiny, ENGINE) as engine:
        yield engine


@pytest.fixture(scope="module")
def live(tiny):
    with Engine(tiny, ENGINE) as engine:
        server = LiveServer(
            engine, ServerOptions(model_name="tiny", api_key=KEY, max_context=CONTEXT, max_body_bytes=64 << 10)
        )
        try:
            yield server
        finally:
            server.close()


@pytest.fixture(scope="module")
def client(live):
    return openai.OpenAI(base_url=live.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


def greedy(n: int) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=n, temperature=0.0)


# -- the OpenAI client --------------------------------------------------------------------------------------------------


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny"] and models[0].owned_by == "zipmoe"
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")


def test_a_batch_of_one_gives_the_tokens_of_run(live, client, reference):
    prompt = "The capital of France is"
    ids = reference.tokenizer.encode(prompt)
    text, result = reference.generate_text_from(ids, greedy(12))
    assert result.tokens == reference.generate_tokens(ids, greedy(12)).tokens  # run's tokens, twice the same
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.id.startswith("cmpl-") and done.model == "tiny"
    assert done.choices[0].text == text
    assert done.choices[0].finish_reason == result.finish_reason
    assert (done.usage.prompt_tokens, done.usage.completion_tokens) == (len(ids), len(result.tokens))
    assert done.usage.total_tokens == len(ids) + len(result.tokens)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)  # token ids
    assert by_ids.choices[0].text == text


def test_chat_completion_renders_the_chat_template(client, reference):
    text, result = reference.generate_text_from(reference.encode_chat(MESSAGES), greedy(10))
    done = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=10, temperature=0)
    assert done.object == "chat.completion" and done.id.startswith("chatcmpl-")
    message = done.choices[0].message
    assert (message.role, message.content) == ("assistant", text)
    assert done.usage.prompt_tokens == len(reference.encode_chat(MESSAGES))
    assert done.usage.completion_tokens == len(result.tokens)


def test_streamed_chunks_join_to_the_whole_text(client):
    whole = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=16, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=16, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text = client.completions.create(model="tiny", prompt="Once upon", max_tokens=16, temperature=0)
    pieces = list(client.completions.create(model="tiny", prompt="Once upon", max_tokens=16, temperature=0,
                                            stream=True))  # fmt: skip
    assert "".join(p.choices[0].text for p in pieces) == text.choices[0].text
    assert pieces[-1].choices[0].finish_reason == text.choices[0].finish_reason


def test_stop_strings_cut_the_text_and_end_the_sequence(client):
    full = client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=0, extra_body={
        "ignore_eos": True})  # fmt: skip
    text = full.choices[0].text
    assert len(text) >= 6, text
    stop = text[4:6]
    cut = text[: text.index(stop)]
    stopped = client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=0, stop=[stop, "\0"],
                                        extra_body={"ignore_eos": True})  # fmt: skip
    assert stopped.choices[0].text == cut and stopped.choices[0].finish_reason == "stop"
    assert stopped.usage.completion_tokens < full.usage.completion_tokens  # no token made past the stop string
    streamed = client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=0, stop=stop,
                                         stream=True, extra_body={"ignore_eos": True})  # fmt: skip
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_sampling_with_a_seed_repeats(client):
    def sample(seed: int) -> str:
        done = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=1.0, seed=seed,
                                         extra_body={"top_k": 20, "ignore_eos": True})  # fmt: skip
        return done.choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


# -- errors -----------------------------------------------------------------------------------------------------------


def post(live, path: str, body, headers=AUTH, timeout=60) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(live.url + path, content=content, headers={**headers, "Content-Type": "application/json"},
                      timeout=timeout)  # fmt: skip


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


@pytest.mark.parametrize(
    "path, body, param, fragment",
    [
        ("/v1/completions", b'{"prompt": "x", "max_tokens": ', None, "The request body is not valid JSON"),
        ("/v1/completions", b"[]", None, "must be a JSON object"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature", "temperature must be a finite number"),
        ("/v1/chat/completions", {"messages": MESSAGES, "n": 2}, "n", "n must be 1"),
        ("/v1/completions", {"prompt": "x", "logprobs": 1}, "logprobs", "logprobs are not supported"),
        ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages", "messages are all empty"),
        ("/v1/completions", {"prompt": [5, 99999]}, "prompt", "token id 99999, outside the model's vocabulary of"),
    ],
)
def test_bad_input_is_a_400_in_the_openai_shape(live, path, body, param, fragment):
    error = openai_error(post(live, path, body), 400)
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert fragment in error["message"], error["message"]


def test_a_prompt_over_the_context_is_a_400_naming_both_numbers(live, client, reference):
    prompt = "word " * 200
    n = len(reference.tokenizer.encode(prompt))
    assert n < CONTEXT < n + 100
    error = openai_error(post(live, "/v1/completions", {"prompt": prompt, "max_tokens": 100}), 400)
    assert error["code"] == "context_length_exceeded" and error["param"] == "prompt"
    assert f"maximum context length is {CONTEXT} tokens" in error["message"]
    assert f"you requested {n + 100} tokens ({n} in the prompt, 100 in the completion)" in error["message"]
    with pytest.raises(openai.BadRequestError, match=f"maximum context length is {CONTEXT}"):
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x " * CONTEXT}])
    # without max_tokens, the completion may take what the context leaves
    done = client.completions.create(model="tiny", prompt=prompt, temperature=0, extra_body={"ignore_eos": True})
    assert done.usage.completion_tokens == CONTEXT - n and done.choices[0].finish_reason == "length"


def test_limits_and_routes_answer_in_the_openai_shape(live):
    big = json.dumps({"prompt": "x" * (70 << 10)}).encode()
    error = openai_error(post(live, "/v1/completions", big), 413)
    assert "larger than 65,536 bytes" in error["message"]
    # Far past the limit: refused from its Content-Length alone, before a byte of it is read.
    host, port = live.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 10000000000\r\n\r\n{"
        )
        assert sock.recv(4096).startswith(b"HTTP/1.1 413 ")
    assert openai_error(httpx.get(live.url + "/v1/nothing", headers=AUTH), 404)["code"] == "not_found"
    assert "not allowed" in openai_error(httpx.get(live.url + "/v1/completions", headers=AUTH), 405)["message"]
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}  # still serving


def test_the_api_key_guards_every_endpoint_but_health(live):
    assert httpx.get(live.url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}):
        for path in ("/v1/models", "/metrics"):
            error = openai_error(httpx.get(live.url + path, headers=headers), 401)
            assert error["code"] == "invalid_api_key"
        assert openai_error(post(live, "/v1/completions", {"prompt": "x"}, headers=headers), 401)
    assert httpx.get(live.url + "/v1/models", headers=AUTH).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_a_bug_is_a_500_and_the_server_goes_on(live, client, monkeypatch):
    def broken(messages):
        raise RuntimeError("boom")

    monkeypatch.setattr(live.app.state.server.engine, "encode_chat", broken)
    error = openai_error(post(live, "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 2}), 500)
    assert error["type"] == "server_error" and "RuntimeError" in error["message"] and "boom" not in error["message"]
    monkeypatch.undo()
    assert client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=2).choices


# -- load and disconnects ---------------------------------------------------------------------------------------------


def cancelled(live) -> int:
    return live.scheduler.stats.finished.get("cancelled", 0)


def test_a_client_gone_mid_stream_cancels_its_sequence(live):
    before = cancelled(live)
    body = {"prompt": "Hello", "max_tokens": LONG, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", live.url + "/v1/completions", json=body, headers=AUTH) as response:
            assert response.status_code == 200
            events = 0
            for line in response.iter_lines():
                events += line.startswith("data: ")
                if events == 3:
                    break
            assert live.scheduler.active == 1
    wait_for(lambda: cancelled(live) == before + 1)  # well before LONG tokens at this model's speed
    live.wait_idle()


def test_a_client_gone_mid_request_cancels_its_sequence(live):
    before = cancelled(live)
    body = {"prompt": "Hello", "max_tokens": LONG, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(live, "/v1/completions", body, timeout=httpx.Timeout(60, read=0.3))
    wait_for(lambda: cancelled(live) == before + 1)
    live.wait_idle()


def test_64_concurrent_clients_are_all_answered(live):
    async def main():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=live.url, headers=AUTH, timeout=120, limits=limits) as http:
            return await asyncio.gather(*(
                http.post("/v1/completions", json={"prompt": f"Client {i}", "max_tokens": 4, "temperature": 0})
                for i in range(64)
            ))  # fmt: skip

    steps_before = live.scheduler.stats.steps
    responses = asyncio.run(main())
    assert [r.status_code for r in responses] == [200] * 64
    assert all(1 <= r.json()["usage"]["completion_tokens"] <= 4 for r in responses)
    sequences = sum(len(r.json()["choices"]) for r in responses)
    assert sequences == 64 and live.scheduler.stats.steps - steps_before < 64 * 4  # they shared forward passes


def test_metrics_are_prometheus_text(live, client):
    client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
    httpx.post(live.url + "/v1/completions", content=b"{", headers=AUTH)  # one 400
    response = httpx.get(live.url + "/metrics", headers=AUTH)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples = parse_prometheus(response.text)
    for name in ("zipmoe_requests_total", "zipmoe_generation_tokens_total", "zipmoe_generation_tokens_per_second",
                 "zipmoe_queue_length", "zipmoe_running_sequences", "zipmoe_batch_size_mean",
                 "zipmoe_expert_cache_hits_total", "zipmoe_storage_read_bytes_total",
                 "zipmoe_storage_busy_seconds_total", "zipmoe_compute_stall_seconds_total",
                 "zipmoe_decode_busy_seconds_total"):  # fmt: skip
        assert name in samples, name
    assert {labels["tier"] for labels, _ in samples["zipmoe_expert_cache_hits_total"]} >= {"decoded"}
    completions = {s["status"]: v for s, v in samples["zipmoe_requests_total"] if s["endpoint"] == "/v1/completions"}
    assert completions["200"] >= 1 and completions["400"] >= 1
    assert samples["zipmoe_generation_tokens_total"][0][1] >= 3
    assert samples["zipmoe_storage_read_bytes_total"][0][1] > 0
    assert samples["zipmoe_decode_busy_seconds_total"][0][1] > 0  # the records read were decoded


def test_a_full_queue_is_a_503(tiny):
    with Engine(tiny, ENGINE) as engine:
        live = LiveServer(engine, ServerOptions(model_name="tiny", max_batch=1, max_queue=1, max_context=CONTEXT))
        try:
            body = {"prompt": "Hello", "max_tokens": LONG, "stream": True, "ignore_eos": True}
            with httpx.Client(timeout=60) as http, http.stream("POST", live.url + "/v1/completions", json=body) as a:
                assert a.status_code == 200
                wait_for(lambda: live.scheduler.active == 1)  # the first running
                with http.stream("POST", live.url + "/v1/completions", json=body) as b:  # the second waiting
                    assert b.status_code == 200
                    wait_for(lambda: live.scheduler.waiting == 1)
                    refused = http.post(live.url + "/v1/completions", json={"prompt": "x"})
                    error = openai_error(refused, 503)
                    assert error["code"] == "queue_full" and refused.headers["retry-after"] == "1"
            live.wait_idle()
        finally:
            live.close()


def test_routing_replays_the_trace_round_robin(reference):
    app = create_app(reference, ServerOptions(routing="synthetic:qwen"))
    worker = app.state.server.worker
    assert len(worker.trace.requests) == 8
    replayed = []

    def submit(prompt, options, *, on_token, on_done, replay):
        replayed.append(replay.request)
        return object()

    worker.scheduler.submit = submit  # nothing runs: the scheduler only records what it was given
    worker.start()
    try:

        async def submit_all():
            return [worker.submit([1, 2], greedy(2)) for _ in range(10)]

        asyncio.run(submit_all())
    finally:
        worker.close()
    assert replayed == [0, 1, 2, 3, 4, 5, 6, 7, 0, 1]
    with pytest.raises(RoutingError, match="unknown routing"):
        create_app(reference, ServerOptions(routing="synthetic:nope"))
    with pytest.raises(ServerOptionsError, match="--max-context 5000 is above the model's context of 4096 tokens"):
        create_app(reference, ServerOptions(max_context=5000))
    with pytest.raises(ServerOptionsError, match="--max-queue must be at least 1"):
        ServerOptions(max_queue=0)


# -- the command --------------------------------------------------------------------------------------------------------


def test_serve_needs_its_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "starlette", None)
    code, _, err = run_cli(capsys, "serve", "model.zmoe")
    assert_one_line_error(code, err)
    assert err.strip() == "Error: zipmoe serve needs Starlette: pip install 'zipmoe[serve]'"


def test_serve_without_torch_names_its_extra(tmp_path):
    done = zipmoe_without_torch("serve", "missing.zmoe", cwd=tmp_path)
    assert_one_line_error(done.returncode, done.stderr)
    assert done.stderr.strip() == "Error: zipmoe serve needs PyTorch: pip install 'zipmoe[serve]'"


def test_serve_refuses_a_port_in_use_before_loading(capsys, tiny):
    taken = listen("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        code, _, err = run_cli(capsys, "serve", str(tiny), "--port", str(port))
        assert_one_line_error(code, err, f"cannot listen on 127.0.0.1:{port}")
    finally:
        taken.close()
    code, _, err = run_cli(capsys, "serve", str(tiny), "--max-body", "1 bushel")
    assert_one_line_error(code, err, "--max-body")


def test_serve_command_answers_and_stops_on_ctrl_c(tiny, tmp_path):
    env = {**os.environ, "ZIPMOE_API_KEY": KEY}
    process = subprocess.Popen(
        [sys.executable, "-m", "zipmoe", "serve", str(tiny), "--port", "0", "--device", "cpu", "--dtype", "float32",
         "--max-context", "64", "-t", "1"],
        stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        line = process.stderr.readline()
        while line and not line.startswith("Serving "):
            line = process.stderr.readline()
        assert line.startswith(f"Serving {tiny} on http://127.0.0.1:") and line.rstrip().endswith("(OpenAI API at /v1)")
        url = line.split(" on ")[1].split(" ")[0]
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline
                time.sleep(0.1)
        done = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).completions.create(
            model=str(tiny), prompt="Hi", max_tokens=3
        )
        assert done.model == str(tiny) and done.usage.completion_tokens >= 1
        process.send_signal(signal.SIGINT)  # Ctrl-C: uvicorn shuts down, then exits as every command does (130)
        assert process.wait(30) == 130
        err = process.stderr.read()
        assert "Application shutdown complete." in err and "Traceback" not in err
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
