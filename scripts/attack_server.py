#!/usr/bin/env python
"""A rerunnable hostile-input campaign against ``zipmoe serve``, the OpenAI-compatible HTTP server.

    .venv/bin/python scripts/attack_server.py                 # every family, ~390 cases (~50 s on 2 cores)
    .venv/bin/python scripts/attack_server.py --quick         # 30 cases, for CI-like use (~15 s)
    .venv/bin/python scripts/attack_server.py --family params --family auth --json
    .venv/bin/python scripts/attack_server.py --markdown      # the table for docs/SECURITY.md

The campaign builds the ``tiny`` demo checkpoint offline and packs it (``zipmoe demo-checkpoint``, ``zipmoe pack``),
then starts ``python -m zipmoe serve tiny.zmoe --port 0 --max-queue 4 --max-batch 2 --max-context 64 --max-body
64KiB --api-key KEY -q`` in a private directory (and, for the cases that need it, a second server without
``--api-key``, ``--max-context`` and with ``--max-body 1MiB``: bodies past the parameter limits, and generations
long enough to outlive their clients) and reads each port from its ``Serving ... on http://HOST:PORT`` line.
It sends hostile requests in families (`FAMILIES`): httpx for most, raw sockets for malformed HTTP. Every case
expects an HTTP status (400, 401, 404, 405, 413, 503 with an OpenAI error body ``{"error": {"message", "type",
"param", "code"}}`` whose message is one line) or an accepted 200.

After every case ``GET /health`` must answer 200 within ``--health-timeout``, the server must be alive, its
resident memory (polled from /proc) under ``--max-rss``, nothing in its directory (the container, a secret file)
created, changed or removed, and its stderr (read continuously, each line attributed to the case in flight or
the one that just ended) must hold no traceback. Outcomes, in the words of scripts/attack.py:

    clean          the expected error status, with a one-line OpenAI error body (or, for malformed HTTP that
                   uvicorn refuses before the application sees it, its 4xx or a closed connection)
    accepted       the expected 200 (a completion, or a stream that ends with ``data: [DONE]``)
    wrong          another status, a 200 where an error was expected, an error body not in the OpenAI shape or
                   on several lines, a check after the requests that failed (the batch not freed, no 503 under load)
    traceback      a 500, an error event for an internal error, or a traceback in the server's log
    hang           no answer within ``--timeout``, or /health not answering after the case (the server is restarted)
    memory         the server's resident memory above ``--max-rss`` (it is killed and restarted)
    crash          the server died (restarted, and the campaign goes on)
    unclean        the connection dropped without an HTTP answer where one was due
    outside-write  a file created, changed or removed in the server's directory

Everything but ``clean`` and ``accepted`` is a failure; the exit status is 1 if there is any. docs/SECURITY.md
("zipmoe serve") describes the families and keeps the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import attack  # noqa: E402  (the command campaign: its outcome words, its tables, its /proc helpers)

OUTCOMES, FAILURES, GIB = attack.OUTCOMES, attack.FAILURES, attack.GIB
FAMILIES = ("json", "params", "context", "http", "auth", "load")
KEY = "zipmoe-attack-key-3c9e"
SECRET = attack.SECRET  # in secret.txt in the server's directory; must never appear in an answer
MAX_CONTEXT, MAX_BATCH, MAX_QUEUE = 64, 2, 4
KEYED = ["--max-queue", str(MAX_QUEUE), "--max-batch", str(MAX_BATCH)]
SERVERS = {  # the servers the cases run against: the first always, the second only when a case asks for it
    "key": [*KEYED, "--max-context", str(MAX_CONTEXT), "--max-body", "64KiB", "--api-key", KEY],
    "open": [*KEYED, "--max-body", "1MiB"],  # no key, the model's context (4,096): long generations, larger bodies
}
SERVING = re.compile(r"Serving .* on http://(\[[^\]]+\]|[^\s:/]+):(\d+)")
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
DROP = object()  # a field to leave out of a body

# -- the server -------------------------------------------------------------------------------------------------------


class Server:
    """One ``zipmoe serve`` process, restarted when it dies: its port, its stderr read line by line (each line
    tagged with the case in flight, `tag`), its resident memory polled (killed above ``rss_limit``)."""

    def __init__(self, name: str, cwd: Path, container: str, rss_limit: int) -> None:
        self.name = name
        self.cwd = cwd
        self.key = KEY if "--api-key" in SERVERS[name] else None
        self.argv = [sys.executable, "-m", "zipmoe", "serve", container, "--port", "0", *SERVERS[name], "-q"]
        self.rss_limit = rss_limit
        self.env = {k: v for k, v in attack.CHILD_ENV.items() if k != "ZIPMOE_API_KEY"}
        self.lines: list[tuple[Any, str]] = []  # (case index or "start", line)
        self.tag: Any = "start"
        self.proc: subprocess.Popen | None = None
        self.url = ""
        self.peak = 0  # the largest RSS seen since `peak` was last reset (at each case)
        self.max_peak = 0  # the largest RSS seen
        self.rss_after_start = 0
        self.memory_killed = False
        self.starts = 0

    def start(self, timeout: float = 180.0) -> None:
        self.tag, self.memory_killed, self.url, self.starts = "start", False, "", self.starts + 1
        ready = threading.Event()
        proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
        self.proc = proc
        threading.Thread(target=self._read, args=(proc, ready), daemon=True).start()
        threading.Thread(target=self._watch, args=(proc,), daemon=True).start()
        deadline = time.monotonic() + timeout
        while not ready.wait(0.1):
            if proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(line for _, line in self.lines[-30:])
                raise SystemExit(f"the {self.name} server did not start (exit {proc.returncode}):\n{tail}")
        if self.health(30.0):
            raise SystemExit(f"the {self.name} server does not answer /health after starting")
        self.rss_after_start = max(self.rss_after_start, attack._rss_bytes(proc.pid))

    def _read(self, proc: subprocess.Popen, ready: threading.Event) -> None:
        for raw in iter(proc.stderr.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.lines.append((self.tag, line))
            match = SERVING.search(line)
            if match and not ready.is_set():
                self.url = f"http://{match.group(1)}:{match.group(2)}"
                ready.set()

    def _watch(self, proc: subprocess.Popen) -> None:
        while proc.poll() is None:
            rss = attack._rss_bytes(proc.pid)
            self.peak = max(self.peak, rss)
            self.max_peak = max(self.max_peak, rss)
            if rss > self.rss_limit:
                self.memory_killed = True
                proc.kill()
                return
            time.sleep(0.05)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def health(self, timeout: float) -> str | None:
        """Why ``GET /health`` did not answer 200 within ``timeout`` seconds, or None."""
        try:
            r = httpx.get(self.url + "/health", timeout=timeout)
        except httpx.HTTPError as exc:
            return f"GET /health: {type(exc).__name__}"
        return None if r.status_code == 200 else f"GET /health answered {r.status_code}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def restart(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.start()


@dataclass
class Ctx:
    """What every case sees: the servers (started on first use), the limits, the seed."""

    base: Path  # the servers' directory
    container: str
    timeout: float
    health_timeout: float
    rss_limit: int
    seed: int
    servers: dict[str, Server] = field(default_factory=dict)

    def server(self, name: str) -> Server:
        if name not in self.servers:
            self.servers[name] = Server(name, self.base, self.container, self.rss_limit)
        server = self.servers[name]
        if not server.alive:
            server.start()
        return server


# -- answers ----------------------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """What came back for one request: a status, headers, a body; or ``error`` ("timeout", or why none came)."""

    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    error: str | None = None

    def show(self) -> list[str]:
        if self.error:
            return [f"no answer: {self.error}"]
        text = self.body[:400].decode("utf-8", "replace").replace("\n", "\\n")
        return [f"{self.status} {self.headers.get('content-type', '')}: {text}"]


@dataclass
class Expect:
    """What a case may get: ``statuses`` (200 an accepted answer, the others refusals); error bodies in the OpenAI
    shape unless ``protocol`` (refused by uvicorn's HTTP parser, any body or a closed connection); ``contains``:
    fragments the message must hold; ``code``: the error code required; ``check``: one more test of the answer."""

    statuses: tuple[int, ...]
    protocol: bool = False
    closed_ok: bool = False
    silence_ok: bool = False  # no answer at all is right (an incomplete request: the server waits for the rest)
    empty_ok: bool = False  # a 200 without a body (HEAD)
    contains: tuple[str, ...] = ()
    code: str | None = None
    check: Callable[[Answer], str | None] | None = None


def error_shape(body: bytes) -> tuple[dict | None, str | None]:
    """The ``error`` object of an OpenAI error body, or why the body is not one (one line of message)."""
    try:
        doc = json.loads(body)
    except ValueError:
        return None, f"not JSON: {body[:80]!r}"
    if not isinstance(doc, dict) or set(doc) != {"error"} or not isinstance(doc["error"], dict):
        return None, f"not {{'error': {{...}}}}: {body[:80]!r}"
    err = doc["error"]
    if set(err) != {"message", "type", "param", "code"}:
        return None, f"error keys {sorted(err)}, not message/type/param/code"
    message = err["message"]
    if not isinstance(message, str) or not message.strip():
        return None, "no message"
    if len(message.splitlines()) > 1 or "\n" in message or "\r" in message:  # also \x0b, \x1c, \x85, \u2028 ...
        return None, f"a message of {len(message.splitlines())} lines: {message[:120]!r}"
    if not isinstance(err["type"], str) or not all(
        err[k] is None or isinstance(err[k], str) for k in ("param", "code")
    ):
        return None, "type, param or code of the wrong type"
    return err, None


def judge(answer: Answer, expect: Expect) -> tuple[str, str]:
    """The outcome of one answer against what was expected, and a one-line detail."""
    if answer.error == "timeout":
        if expect.silence_ok:
            return "clean", "no answer: the server waits for the rest of the request"
        return "hang", "no answer within the timeout"
    if SECRET.encode() in answer.body or b"root:x:0:0" in answer.body:
        return "wrong", "the answer holds the content of a file"
    if answer.error:
        if expect.closed_ok or expect.protocol:
            return "clean", f"connection closed ({answer.error})"
        return "unclean", f"no HTTP answer: {answer.error}"
    status = answer.status
    if status == 500:
        err, _ = error_shape(answer.body)
        return "traceback", f"500: {err['message'] if err else answer.body[:200].decode('utf-8', 'replace')}"
    if status not in expect.statuses:
        want = "/".join(map(str, expect.statuses))
        return "wrong", f"expected {want}, got {status}: {answer.body[:160].decode('utf-8', 'replace')}"
    if 300 <= status < 400:  # Starlette's redirect to the path without its trailing slash: to this server only
        location = urlsplit(answer.headers.get("location", ""))
        if location.hostname not in (None, "127.0.0.1") or answer.headers.get("location", "").startswith("//"):
            return "wrong", f"{status} redirects elsewhere: {answer.headers.get('location')!r}"
        return "clean", f"{status} to {answer.headers.get('location')}"
    if status == 200:
        problem = None if expect.empty_ok and not answer.body else _ok_problem(answer)
        if problem:
            return ("traceback" if "internal" in problem else "wrong"), problem
        extra = expect.check(answer) if expect.check else None
        return ("wrong", extra) if extra else ("accepted", "")
    if expect.protocol and not answer.headers.get("content-type", "").startswith("application/json"):
        return "clean", f"{status} from the HTTP layer: {answer.body[:60].decode('utf-8', 'replace')}"
    err, problem = error_shape(answer.body)
    if problem:
        return "wrong", f"{status} {problem}"
    if status == 503 and "retry-after" not in answer.headers:
        return "wrong", "503 without Retry-After"
    if expect.code and err["code"] != expect.code:
        return "wrong", f"code {err['code']!r}, expected {expect.code!r}: {err['message'][:100]}"
    missing = [c for c in expect.contains if c not in err["message"]]
    if missing:
        return "wrong", f"the message does not say {missing}: {err['message'][:160]}"
    extra = expect.check(answer) if expect.check else None
    if extra:
        return "wrong", extra
    return "clean", f"{status} {err['message'][:160]}"


def _ok_problem(answer: Answer) -> str | None:
    """Why a 200 is not a whole answer: a stream without ``[DONE]`` or with an error event, a completion without
    choices."""
    text = answer.body.decode("utf-8", "replace")
    if answer.headers.get("content-type", "").startswith("text/event-stream"):
        if not text.rstrip().endswith("data: [DONE]"):
            return f"a stream that does not end with data: [DONE]: ...{text[-80:]!r}"
        for line in text.splitlines():
            if line.startswith("data: {") and '"error"' in line[:20]:
                return f"an error event in a 200 stream: {line[:160]}"
        return None
    if answer.headers.get("content-type", "").startswith("application/json"):
        try:
            doc = json.loads(text)
        except ValueError:
            return "a 200 whose body is not JSON"
        if isinstance(doc, dict) and "error" in doc:
            return f"a 200 with an error body: {text[:160]}"
    return None


# -- requests ---------------------------------------------------------------------------------------------------------


@dataclass
class Req:
    """One HTTP request sent with httpx; ``headers`` values of None remove a default header."""

    method: str = "POST"
    path: str = COMPLETIONS
    body: bytes | None = None
    headers: dict[str, Any] = field(default_factory=dict)
    auth: bool = True
    server: str = "key"

    def show(self) -> str:
        body = "" if self.body is None else " " + _short(self.body)
        extra = "".join(f" -H '{k}: {_short(v if isinstance(v, bytes) else str(v).encode(), 60)}'"
                        for k, v in self.headers.items() if v is not None)  # fmt: skip
        return f"{self.method} {self.path}{extra}{'' if self.auth else ' (no key)'}{body}"


def _short(data: bytes, n: int = 160) -> str:
    text = repr(data[:n])[2:-1]
    return text + (f"... ({len(data):,} bytes)" if len(data) > n else "")


def send(ctx: Ctx, req: Req) -> Answer:
    server = ctx.server(req.server)
    headers: dict[str, Any] = {}
    if req.auth and server.key:
        headers["Authorization"] = f"Bearer {server.key}"
    if req.body is not None:
        headers["Content-Type"] = "application/json"
    headers.update(req.headers)
    headers = {k: v for k, v in headers.items() if v is not None}
    try:
        with httpx.Client(timeout=ctx.timeout) as client:
            r = client.request(req.method, server.url + req.path, content=req.body, headers=headers)
            return Answer(r.status_code, dict(r.headers), r.content)
    except httpx.TimeoutException:
        return Answer(error="timeout")
    except httpx.HTTPError as exc:
        return Answer(error=f"{type(exc).__name__}: {exc}"[:200])


def raw_send(ctx: Ctx, pieces: list[bytes], *, server: str = "key", pause: float = 0.0, read: bool = True,
             wait: float | None = None) -> Answer:  # fmt: skip
    """``pieces`` written to a fresh connection (``pause`` seconds apart), then the first response read (within
    ``wait`` seconds, default the timeout)."""
    srv = ctx.server(server)
    try:
        sock = socket.create_connection(("127.0.0.1", srv.port), timeout=wait or ctx.timeout)
    except OSError as exc:
        return Answer(error=f"connect: {exc}")
    with sock:
        try:
            for piece in pieces:
                sock.sendall(piece)
                if pause:
                    time.sleep(pause)
        except OSError:
            pass  # the server may answer and close before reading everything: read what it said
        return read_response(sock) if read else Answer(error="not read")


def read_response(sock: socket.socket) -> Answer:
    """One HTTP/1.1 response: status line, headers, and a body by Content-Length, chunks, or up to the close."""
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return Answer(error="closed without an answer" if not data else f"closed mid-head: {data[:80]!r}")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split()[1])
        if 100 <= status < 200:  # an interim answer (100 Continue): the real one follows
            return _after_interim(sock, rest)
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            n = int(headers["content-length"])
            while len(rest) < n:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                rest += chunk
            return Answer(status, headers, rest[:n])
        if headers.get("transfer-encoding", "").lower() == "chunked":
            return Answer(status, headers, _dechunk(sock, rest))
        while chunk := sock.recv(65536):
            rest += chunk
        return Answer(status, headers, rest)
    except TimeoutError:
        return Answer(error="timeout")
    except (OSError, ValueError, IndexError) as exc:
        return Answer(error=f"{type(exc).__name__}: {exc}")


def _after_interim(sock: socket.socket, rest: bytes) -> Answer:
    class Replay:  # `read_response` on what was read already, then on the socket
        def __init__(self) -> None:
            self.pending = rest

        def recv(self, n: int) -> bytes:
            if self.pending:
                out, self.pending = self.pending[:n], self.pending[n:]
                return out
            return sock.recv(n)

    return read_response(Replay())  # type: ignore[arg-type]


def _dechunk(sock: socket.socket, rest: bytes) -> bytes:
    body = b""
    while True:
        while b"\r\n" not in rest:
            chunk = sock.recv(65536)
            if not chunk:
                return body
            rest += chunk
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        while len(rest) < size + 2:
            chunk = sock.recv(65536)
            if not chunk:
                return body + rest
            rest += chunk
        if size == 0:
            return body
        body, rest = body + rest[:size], rest[size + 2 :]


def head(method: str, path: str, body: bytes = b"", *, auth: bool = True, extra: str = "", length: Any = "auto",
         ctype: bool = True) -> bytes:  # fmt: skip
    """A raw HTTP/1.1 request head (and ``body``): Host, the key, Content-Type, Content-Length (``length``: "auto",
    None for none, or any text), ``extra`` header lines (each ending in CRLF)."""
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if auth:
        lines.append(f"Authorization: Bearer {KEY}")
    if ctype and body:
        lines.append("Content-Type: application/json")
    if length == "auto":
        lines.append(f"Content-Length: {len(body)}")
    elif length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode("latin-1") + body


def body(**fields: Any) -> bytes:
    """A completion body: ``{"model": "m", "prompt": "Hello", "max_tokens": 2}`` changed by ``fields``."""
    return _dump({"model": "m", "prompt": "Hello", "max_tokens": 2}, fields)


def chat_body(**fields: Any) -> bytes:
    """A chat body: one user message, ``max_tokens`` 2, changed by ``fields``."""
    return _dump({"model": "m", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 2}, fields)


def _dump(doc: dict, fields: dict) -> bytes:
    doc = {**doc, **fields}
    return json.dumps({k: v for k, v in doc.items() if v is not DROP}).encode()


# -- cases ------------------------------------------------------------------------------------------------------------


@dataclass
class Case:
    family: str
    name: str
    run: Callable[[Ctx], tuple[str, str, list[str]]]  # -> (outcome, detail, lines that show the answer)
    request: str  # what was sent, for the report
    server: str = "key"
    quick: bool = False


@dataclass
class Verdict:
    case: Case
    index: int
    outcome: str
    detail: str
    answer: list[str]
    seconds: float
    rss: int = 0  # the largest resident memory of a server during the case
    log: list[str] = field(default_factory=list)


def http_case(family: str, name: str, req: Req, *statuses: int, quick: bool = False, **expect: Any) -> Case:
    exp = Expect(statuses, **expect)

    def run(ctx: Ctx) -> tuple[str, str, list[str]]:
        answer = send(ctx, req)
        return (*judge(answer, exp), answer.show())

    return Case(family, name, run, req.show(), req.server, quick)


def raw_case(family: str, name: str, data: bytes | list[bytes], *statuses: int, quick: bool = False,
             pause: float = 0.0, wait: float | None = None, **expect: Any) -> Case:  # fmt: skip
    exp = Expect(statuses, **expect)
    pieces = data if isinstance(data, list) else [data]

    def run(ctx: Ctx) -> tuple[str, str, list[str]]:
        answer = raw_send(ctx, pieces, pause=pause, wait=wait)
        return (*judge(answer, exp), answer.show())

    return Case(family, name, run, "raw: " + _short(b"".join(pieces), 200), "key", quick)


def post(path: str, data: bytes, **kw: Any) -> Req:
    return Req("POST", path, data, **kw)


def family_json() -> list[Case]:
    """Bodies that are not the JSON object the API wants, through both generating endpoints."""
    valid, nested = body(), b"[" * 10_000 + b"]" * 10_000
    structural = {
        "invalid-open-brace": (b"{", 400),
        "invalid-missing-value": (b'{"prompt": }', 400),
        "invalid-single-quotes": (b"{'prompt': 'Hello'}", 400),
        "invalid-trailing-comma": (b'{"prompt": "Hello", "max_tokens": 2,}', 400),
        "invalid-trailing-garbage": (valid + b" x", 400),
        "invalid-two-objects": (valid + valid, 400),
        "invalid-unterminated-string": (b'{"prompt": "Hello', 400),
        "invalid-form-encoded": (b"prompt=Hello&max_tokens=2", 400),
        "invalid-comment": (b'{"prompt": "Hello" /* c */, "max_tokens": 2}', 400),
        "not-utf8-ff": (b'{"prompt": "\xff\xfe", "max_tokens": 2}', 400),
        "not-utf8-latin1": ('{"prompt": "café", "max_tokens": 2}'.encode("latin-1"), 400),
        "not-utf8-overlong-slash": (b'{"prompt": "\xc0\xaf", "max_tokens": 2}', 400),
        "not-utf8-surrogate-bytes": (b'{"prompt": "\xed\xa0\x80", "max_tokens": 2}', 400),
        "utf16-with-bom": (valid.decode().encode("utf-16"), 400),
        "utf8-bom": (b"\xef\xbb\xbf" + valid, (200, 400)),
        "nul-after-object": (valid + b"\x00", 400),
        "nested-10k-arrays": (b'{"prompt": "Hello", "max_tokens": 2, "user": ' + nested + b"}", 400),
        "nested-10k-objects": (b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 400),
        "nested-10k-top-level": (nested, 400),
        "nested-65-levels": (b'{"prompt": "Hello", "user": ' + b"[" * 64 + b"]" * 64 + b"}", 400),
        "top-level-array": (b"[" + valid + b"]", 400),
        "top-level-string": (b'"Hello"', 400),
        "top-level-null": (b"null", 400),
        "top-level-number": (b"5", 400),
        "top-level-true": (b"true", 400),
        "empty-object": (b"{}", 400),
        "empty-body": (b"", 400),
        "whitespace-body": (b"  \r\n\t ", 400),
    }
    cases = []
    for name, (data, expect) in structural.items():
        statuses = expect if isinstance(expect, tuple) else (expect,)
        quick = name in ("invalid-open-brace", "nested-10k-arrays", "top-level-array")
        cases.append(http_case("json", name, post(COMPLETIONS, data), *statuses, quick=quick))
        if name in ("invalid-open-brace", "not-utf8-ff", "nested-10k-arrays", "top-level-array", "empty-body"):
            chat = data.replace(b'"prompt": "Hello"', b'"messages": [{"role": "user", "content": "Hello"}]')
            cases.append(http_case("json", "chat-" + name, post(CHAT, chat), *statuses))
    numbers = {  # a field given as raw JSON text: (field, text, statuses)
        "max_tokens-1e400": ("max_tokens", "1e400", 400),
        "temperature-1e400": ("temperature", "1e400", 400),
        "temperature--1e400": ("temperature", "-1e400", 400),
        "temperature-1e-400": ("temperature", "1e-400", 200),
        "temperature--0.0": ("temperature", "-0.0", 200),
        "seed-1e400": ("seed", "1e400", 400),
        "ignored-1e400": ("user", "1e400", (200, 400)),
        "max_tokens-5000-digits": ("max_tokens", "9" * 5000, 400),
        "seed-5000-digits": ("seed", "1" + "0" * 4999, 400),
        "ignored-50000-digits": ("user", "7" * 50_000, 400),
        "top_p-65-char-number": ("top_p", "0." + "0" * 62 + "1", 400),
        "temperature-NaN": ("temperature", "NaN", 400),
        "temperature-Infinity": ("temperature", "Infinity", 400),
        "top_p--Infinity": ("top_p", "-Infinity", 400),
        "ignored-NaN": ("user", "NaN", 400),
        "max_tokens-Infinity": ("max_tokens", "Infinity", 400),
    }
    for name, (key, text, expect) in numbers.items():
        data = b'{"prompt": "Hello", "max_tokens": 2, "' + key.encode() + b'": ' + text.encode() + b"}"
        if key == "max_tokens":
            data = b'{"prompt": "Hello", "max_tokens": ' + text.encode() + b"}"
        statuses = expect if isinstance(expect, tuple) else (expect,)
        cases.append(http_case("json", name, post(COMPLETIONS, data), *statuses, quick=name == "temperature-NaN"))
    others = [
        ("duplicate-prompt", post(COMPLETIONS, b'{"prompt": "a", "prompt": "Hello", "max_tokens": 2}'), (200, 400)),
        ("duplicate-max_tokens", post(COMPLETIONS, b'{"prompt": "a", "max_tokens": 2, "max_tokens": 99999}'),
         (200, 400)),
        ("escaped-lone-surrogate", post(COMPLETIONS, b'{"prompt": "\\ud800", "max_tokens": 2}'), (400,)),
        ("escaped-nul", post(COMPLETIONS, b'{"prompt": "a\\u0000b", "max_tokens": 2}'), (200, 400)),
        ("many-keys-3000", post(COMPLETIONS, json.dumps({**{f"k{i}": i for i in range(3000)}, "prompt": "Hello",
                                                          "max_tokens": 2}).encode()), (200,)),
        ("content-type-text-plain", post(COMPLETIONS, valid, headers={"Content-Type": "text/plain"}), (200, 400, 415)),
        ("content-type-form", post(COMPLETIONS, valid, headers={"Content-Type": "application/x-www-form-urlencoded"}),
         (200, 400, 415)),
        ("content-type-multipart", post(COMPLETIONS, valid, headers={"Content-Type": "multipart/form-data; b=x"}),
         (200, 400, 415)),
        ("content-type-missing", post(COMPLETIONS, valid, headers={"Content-Type": None}), (200, 400, 415)),
        ("content-type-latin1-charset", post(COMPLETIONS, '{"prompt": "café", "max_tokens": 2}'.encode("latin-1"),
                                             headers={"Content-Type": "application/json; charset=latin-1"}),
         (200, 400, 415)),
        ("content-encoding-gzip-lie", post(COMPLETIONS, valid, headers={"Content-Encoding": "gzip"}), (200, 400, 415)),
    ]  # fmt: skip
    for name, req, statuses in others:
        cases.append(http_case("json", name, req, *statuses, quick=name == "content-type-text-plain"))
    return cases


# Each parameter with values of the wrong type, out of range, null and huge: (value, expected status).
COMMON_PARAMS: dict[str, list[tuple[Any, int]]] = {
    "max_tokens": [(-1, 400), (0, 400), (2**63, 400), ("5", 400), (1.5, 400), (True, 400), (None, 200), (1, 200)],
    "temperature": [(-1, 400), ("0.5", 400), (True, 400), (None, 200), (0, 200), (1e308, 200), (1e-308, 200),
                    (5e-324, 200)],
    "top_p": [(-0.1, 400), (1.1, 400), (0, 200), ("x", 400), (1e-300, 200)],
    "top_k": [(-1, 400), (0, 200), (1.5, 400), (10**6, 200), (2**63, 200), ("3", 400)],
    "min_p": [(-1, 400), (1.5, 400), (1.0, 200)],
    "repetition_penalty": [(0, 400), (-1, 400), (1e9, 200), (1e-300, 200)],
    "frequency_penalty": [(-3, 400), (3, 400), (2, 200), (1e308, 400)],
    "presence_penalty": [(2.5, 400), (-2, 200), ([], 400)],
    "seed": [(-1, 400), (2**64, 400), (2**63, 400), (2**63 - 1, 200), (1.5, 400), ("1", 400), (True, 400)],
    "n": [(2, 400), (0, 400), ("1", 400), (1, 200), (1.0, 400)],
    "stop": [(["a", "b", "c", "d", "e"], 400), ("x" * 10_000, 400), (5, 400), ([1, 2], 400), ("", 400), ([], 200),
             (["\n"], 200), ([["a"]], 400), (["a", "b", "c", "d"], 200), ("\ud800", 400), ("x" * 256, 200),
             ("x" * 257, 400)],
    "stream": [("true", 400), (1, 400), (None, 200), (True, 200)],
    "ignore_eos": [("yes", 400), (True, 200)],
    "model": [(5, 400), ([], 400), (None, 200), ("", 200), ("x" * 10_000, 200)],
    "user": [({"x": [1, 2]}, 200)],
    "tools": [([{"type": "function", "function": {"name": "f"}}], 200)],
}  # fmt: skip
COMPLETION_PARAMS: dict[str, list[tuple[Any, int]]] = {
    "prompt": [("", 400), ([], 400), (["a", "b"], 400), ([1, 2, 3], 200), ([[1, 2]], 200), ([[1], [2]], 400),
               ([300_000], 400), ([2**64], 400), ([-1], 400), ([1.5], 400), ([[[1]]], 400), (5, 400), ({}, 400),
               (DROP, 400), ("   ", 400), ("a\u0000b", 200), ("\ud800", 400), ("\u202e\u0007\x1b[31m", 200),
               ("x" * 10**6, 413), ("x" * 60_000, 400), ([1] * 30_000, 413)],
    "logprobs": [(1, 400), (None, 200)],
    "echo": [(True, 400)],
    "suffix": [("x", 400)],
    "best_of": [(2, 400), (1, 200)],
}  # fmt: skip
ROLE_USER = {"role": "user", "content": "Hello"}
CHAT_PARAMS: dict[str, list[tuple[Any, int]]] = {
    "messages": [([], 400), (DROP, 400), ("hi", 400), (["hi"], 400), ([{"role": "wizard", "content": "x"}], 400),
                 ([{"role": "user"}], 400), ([{"content": "x"}], 400), ([{"role": "user", "content": 5}], 400),
                 ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
                  400),
                 ([{"role": "user", "content": [{"type": "text"}]}], 400),
                 ([{"role": "user", "content": [{"type": "text", "text": "a"}, None]}], 400),
                 ([{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], 200),
                 ([{"role": "user", "content": ""}], 400), ([{"role": "user", "content": "\ud800"}], 400),
                 ([{"role": "user", "content": "Hi", "name": "bob", "extra": [1]}], 200),
                 ([{"role": "\u2028\x0b\x1b[2J", "content": "Hi"}], 400),
                 ([{"role": "system", "content": "Be brief."}, ROLE_USER], 200),
                 ([{"role": "tool", "content": "42"}, ROLE_USER], 200),
                 ([ROLE_USER] * 10_000, 413)],
    "max_completion_tokens": [(-1, 400), ("5", 400), (1, 200)],
    "logprobs": [(True, 400), (False, 200)],
    "top_logprobs": [(2, 400)],
}  # fmt: skip


def _param_name(key: str, value: Any) -> str:
    if value is DROP:
        return f"{key}-missing"
    text = json.dumps(value, ensure_ascii=True)
    if len(text) > 40:
        text = f"{type(value).__name__}-of-{len(value)}"
    return f"{key}={text}"


def family_params() -> list[Case]:
    """Every parameter with wrong types, out-of-range, null and huge values, on both endpoints."""
    cases = []
    quick = {"max_tokens=-1", "temperature=\"0.5\"", "seed=18446744073709551616", "stop=[\"a\", \"b\", \"c\", \"d\", "
             "\"e\"]", "prompt=[300000]", "messages=[]", "top_k=9223372036854775808", "stream=true"}  # fmt: skip
    for key, values in COMMON_PARAMS.items():
        for i, (value, status) in enumerate(values):
            name = _param_name(key, value)
            cases.append(http_case("params", name, post(COMPLETIONS, body(**{key: value})), status,
                                   quick=name in quick, **_param_expect(key, status)))  # fmt: skip
            if key in ("max_tokens", "temperature", "stop", "stream", "model") and i < 2:  # the chat endpoint too
                cases.append(http_case("params", "chat-" + name, post(CHAT, chat_body(**{key: value})), status,
                                       **_param_expect(key, status)))  # fmt: skip
    for key, values in COMPLETION_PARAMS.items():
        for value, status in values:
            name = _param_name(key, value)
            cases.append(http_case("params", name, post(COMPLETIONS, body(**{key: value})), status,
                                   quick=name in quick, **_param_expect(key, status)))  # fmt: skip
    for key, values in CHAT_PARAMS.items():
        for value, status in values:
            name = "chat-" + _param_name(key, value)
            cases.append(http_case("params", name, post(CHAT, chat_body(**{key: value})), status,
                                   quick=name[5:] in quick, **_param_expect(key, status)))  # fmt: skip
    stream_options = [  # (stream, stream_options, status)
        (DROP, {"include_usage": True}, 400), (True, {"include_usage": True}, 200), (True, "yes", 400),
        (True, {"include_usage": "yes"}, 400), (True, [], 400), (True, {}, 200), (True, {"include_usage": None}, 200),
    ]  # fmt: skip
    for stream, options, status in stream_options:
        name = f"stream={json.dumps(None if stream is DROP else stream)}-{_param_name('stream_options', options)}"
        data = body(stream=stream, stream_options=options)
        check = _usage_chunk if status == 200 and isinstance(options, dict) and options.get("include_usage") else None
        cases.append(http_case("params", name, post(COMPLETIONS, data), status, check=check))
    # the open server (--max-body 1MiB): bodies past the parameter limits that the keyed server's 64 KiB refuses
    big = [
        ("open-messages-10000", chat_body(messages=[{"role": "user", "content": "a"}] * 10_000), 400, ()),
        ("open-messages-10001", chat_body(messages=[{"role": "user", "content": ""}] * 10_000 + [ROLE_USER]), 400,
         ("10,000",)),
        ("open-prompt-1000000-chars", body(prompt="x" * 1_000_000), 400, ()),
        ("open-prompt-1000001-chars", body(prompt="x" * 1_000_001), 400, ()),
        ("open-prompt-100000-ids", body(prompt=[5] * 100_000), 400, ()),
        ("open-stop-10k-chars", body(stop=["x" * 10_000]), 400, ()),
    ]  # fmt: skip
    for name, data, status, contains in big:
        path = CHAT if b'"messages"' in data else COMPLETIONS
        cases.append(http_case("params", name, post(path, data, server="open"), status, contains=contains))
    return cases


def _param_expect(key: str, status: int) -> dict[str, Any]:
    if status == 400 and key not in ("prompt", "messages", "max_tokens", "max_completion_tokens"):
        return {"check": _param_named(key)}
    return {}


def _param_named(key: str) -> Callable[[Answer], str | None]:
    def check(answer: Answer) -> str | None:
        err, _ = error_shape(answer.body)
        if err is not None and err["param"] not in (key, None) and key not in err["message"]:
            return f"the error names {err['param']!r}, not {key!r}: {err['message'][:100]}"
        return None

    return check


def _usage_chunk(answer: Answer) -> str | None:
    events = [line[6:] for line in answer.body.decode().splitlines() if line.startswith("data: {")]
    if not events or '"usage": {' not in events[-1].replace('"usage":{', '"usage": {'):
        return "stream_options.include_usage: no usage chunk before [DONE]"
    return None


def _ids(n: int) -> list[int]:
    return [5 + i % 50 for i in range(n)]


def family_context() -> list[Case]:
    """Prompt plus max_tokens around --max-context (64): at the limit 200, over it 400 naming both numbers."""
    cases = []
    for n in (1, 60, 63, 64, 65, 1000):
        for max_tokens in (None, 1, MAX_CONTEXT - n, MAX_CONTEXT - n + 1, 2**40):
            if max_tokens is not None and max_tokens < 1:
                continue
            asked = n + (max_tokens or 1)
            fits = asked <= MAX_CONTEXT and (max_tokens is not None or n < MAX_CONTEXT)
            name = f"ids-{n}+max_tokens-{max_tokens}"
            if any(c.name == name for c in cases):
                continue
            extra = {} if fits else {"code": "context_length_exceeded", "contains": (f" {MAX_CONTEXT} ", f" {asked} ")}
            quick = name in ("ids-60+max_tokens-4", "ids-60+max_tokens-5")
            fields = {"prompt": _ids(n), "max_tokens": DROP if max_tokens is None else max_tokens}
            cases.append(http_case("context", name, post(COMPLETIONS, body(**fields)), 200 if fits else 400,
                                   quick=quick, **extra))  # fmt: skip
    for stream in (False, True):
        for n, max_tokens, status in ((60, 4, 200), (60, 5, 400)):
            name = f"stream-{stream}-ids-{n}+{max_tokens}"
            extra = {} if status == 200 else {"code": "context_length_exceeded"}
            data = body(prompt=_ids(n), max_tokens=max_tokens, stream=stream)
            cases.append(http_case("context", name, post(COMPLETIONS, data), status, **extra))
    for chars, max_tokens, status in ((10, 2, 200), (200, 2, 400), (30, 60, 400), (3000, None, 400)):
        name = f"chat-{chars}-chars+max_tokens-{max_tokens}"
        data = chat_body(messages=[{"role": "user", "content": "a" * chars}], max_tokens=max_tokens or DROP)
        extra = {} if status == 200 else {"code": "context_length_exceeded", "contains": (f" {MAX_CONTEXT} ",)}
        cases.append(http_case("context", name, post(CHAT, data), status, **extra))
    for chars, status in ((20, 200), (400, 400)):
        name = f"text-{chars}-chars+max_tokens-2"
        extra = {} if status == 200 else {"code": "context_length_exceeded", "contains": (f" {MAX_CONTEXT} ",)}
        cases.append(http_case("context", name, post(COMPLETIONS, body(prompt="b" * chars)), status, **extra))
    return cases


# -- http: paths, methods, malformed requests, slow and vanishing clients ----------------------------------------------


def family_http() -> list[Case]:
    cases = []
    unknown = ["/", "/v1", "/v2/completions", "/v1/completions/", "/v1/embeddings", "/admin", "/%00", "/.env",
               "/x%0Ay", "/x%0By", "/x%E2%80%A8y", "/" + "a" * 8000]  # fmt: skip
    for path in unknown:
        name = "path " + (path if len(path) < 40 else f"/a*{len(path) - 1}")
        cases.append(http_case("http", name, Req("GET", path), 404, 307, quick=path == "/admin"))
    for path in ("/v1/completions", "/v1/chat/completions"):
        for method in ("GET", "PUT", "OPTIONS"):
            cases.append(http_case("http", f"{method} {path}", Req(method, path), 405, quick=method == "GET"))
    for path in ("/health", "/metrics", "/v1/models"):
        for method in ("POST",):
            cases.append(http_case("http", f"{method} {path}", Req(method, path, body()), 405))
    cases.append(http_case("http", "HEAD /health", Req("HEAD", "/health"), 200, 405, empty_ok=True))
    traversal = ["..%2F..%2Fetc%2Fpasswd", "%2e%2e%2f%2e%2e%2fetc%2fpasswd", "..%2F..%2Fserver%2Fsecret.txt",
                 "%00", "a%0Ab", "a%0D%0ASet-Cookie:%20x=1", "a%0Bb", "a%C2%85b", "a%E2%80%A8b", "%1B[2J%1B[31mred",
                 "b" * 8000, "%252e%252e%252fetc", "C:%5Cwindows"]  # fmt: skip
    for model in traversal:
        name = "model " + (model if len(model) < 40 else f"b*{len(model)}")
        req = Req("GET", "/v1/models/" + model)  # 404: model_not_found, or not_found for a name the route refuses
        cases.append(http_case("http", name, req, 404, quick=model in ("..%2F..%2Fetc%2Fpasswd", "a%E2%80%A8b")))
    cases.append(http_case("http", "model tiny.zmoe", Req("GET", "/v1/models/tiny.zmoe"), 200))
    for path in (
        "/v1/models/../../etc/passwd",
        "/v1/models/tiny.zmoe/..",
        "/../../etc/passwd",
        "/v1/models/./tiny.zmoe",
    ):
        cases.append(raw_case("http", "raw GET " + path, head("GET", path), 404, 400, protocol=True))
    cases.append(http_case("http", "redirect //evil.example/", Req("GET", "//evil.example/"), 404, 307))
    refused = {  # malformed HTTP: refused by uvicorn's parser (h11), a 4xx in any shape or a closed connection
        "header-1MB": head("GET", "/v1/models", extra="X-Big: " + "a" * 1_000_000 + "\r\n"),
        "header-nul": head("GET", "/v1/models", extra="X-A: a\x00b\r\n"),
        "header-name-space": head("GET", "/v1/models", extra="X A: b\r\n"),
        "header-no-colon": head("GET", "/v1/models", extra="X-A\r\n"),
        "no-host-http11": b"GET /health HTTP/1.1\r\n\r\n",
        "tls-client-hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)) + b"\r\n\r\n",
        "binary-junk": bytes(random.Random(7).randrange(256) for _ in range(2000)) + b"\r\n\r\n",
        "method-garbage": head("FOO\x01", "/health"),
        "request-line-1MB": head("GET", "/" + "a" * 1_000_000),
        "content-length-abc": head("POST", COMPLETIONS, body(), length="abc"),
        "content-length-negative": head("POST", COMPLETIONS, body(), length="-1"),
        "content-length-plus": head("POST", COMPLETIONS, body(), length="+56"),
        "content-length-10^20": head("POST", COMPLETIONS, body(), length=10**20),
        "content-length-two-values": head("POST", COMPLETIONS, body(), extra="Content-Length: 3\r\n"),
        "chunked-bad-size": head("POST", COMPLETIONS, length=None, extra="Transfer-Encoding: chunked\r\n")
        + b"zz\r\nabc\r\n0\r\n\r\n",
        "chunked-negative-size": head("POST", COMPLETIONS, length=None, extra="Transfer-Encoding: chunked\r\n")
        + b"-5\r\nabc\r\n0\r\n\r\n",
        "transfer-encoding-gzip": head("POST", COMPLETIONS, body(), length=None, extra="Transfer-Encoding: gzip\r\n"),
    }  # fmt: skip
    for name, data in refused.items():
        cases.append(raw_case("http", name, data, 400, 404, 405, 413, 431, 501, 505, protocol=True,
                              quick=name == "header-1MB"))  # fmt: skip
    lenient = {  # odd but parseable: answered normally, or refused by the parser
        "header-100KB": head("GET", "/v1/models", extra="X-Big: " + "a" * 100_000 + "\r\n"),
        "headers-2000": head("GET", "/v1/models", extra="".join(f"X-H{i}: v\r\n" for i in range(2000))),
        "header-obs-fold": head("GET", "/v1/models", extra="X-A: a\r\n  b\r\n"),
        "version-9.9": b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
        "http-0.9": b"GET /health\r\n\r\n",
        "http-1.0-no-host": b"GET /health HTTP/1.0\r\n\r\n",
        "method-lowercase": head("get", "/health"),
        "absolute-uri": head("GET", "http://evil.example/health"),
    }  # fmt: skip
    for name, data in lenient.items():
        cases.append(raw_case("http", name, data, 200, 400, 404, 405, 431, 505, protocol=True))
    cases.append(raw_case("http", "incomplete-junk-head", bytes(random.Random(8).randrange(32, 127) for _ in range(500)),
                          400, protocol=True, silence_ok=True, wait=2.0))  # fmt: skip
    cases.append(raw_case("http", "headers-300-small", head("GET", "/v1/models", extra="".join(
        f"X-H{i}: v\r\n" for i in range(300))), 200))  # fmt: skip
    cases.append(raw_case("http", "content-length-and-chunked", head(
        "POST", COMPLETIONS, length=56, extra="Transfer-Encoding: chunked\r\n") + _chunked(body(), 8),
        200, 400, protocol=True))  # fmt: skip
    lies = {  # Content-Length that does not match the body
        "content-length-smaller": (head("POST", COMPLETIONS, body(), length=10), (400,), {}),
        "content-length-300000": (head("POST", COMPLETIONS, body(), length=300_000), (413,), {}),
        "content-length-larger-then-close": (head("POST", COMPLETIONS, body(), length=500), (400, 413),
                                             {"closed_ok": True}),
        "body-100KB": (head("POST", COMPLETIONS, body(user="u" * 100_000)), (413,), {}),
        "body-1MB": (head("POST", COMPLETIONS, body(user="u" * 1_000_000)), (413,), {"closed_ok": True}),
        "chunked-small-valid": (head("POST", COMPLETIONS, length=None, extra="Transfer-Encoding: chunked\r\n")
                                + _chunked(body(), 7), (200,), {}),
        "chunked-100KB": (head("POST", COMPLETIONS, length=None, extra="Transfer-Encoding: chunked\r\n")
                          + _chunked(body(user="u" * 100_000), 1024), (413,), {}),
        "chunked-1MB": (head("POST", COMPLETIONS, length=None, extra="Transfer-Encoding: chunked\r\n")
                        + _chunked(body(user="u" * 1_000_000), 16_384), (413,), {"closed_ok": True}),
        "pipelined-two": (head("POST", COMPLETIONS, body()) + head("GET", "/health"), (200,), {}),
        "expect-100-continue": (head("POST", COMPLETIONS, body(), extra="Expect: 100-continue\r\n"), (200,), {}),
        "upgrade-websocket": (head("GET", "/v1/models", extra="Upgrade: websocket\r\nConnection: Upgrade\r\n"),
                              (200, 400, 426), {"protocol": True}),
    }  # fmt: skip
    for name, (data, statuses, extra) in lies.items():
        if name == "content-length-larger-then-close":  # half the promised body, then the write side closed
            cases.append(Case("http", name, _half_close(data), "raw: " + _short(data)))
            continue
        cases.append(raw_case("http", name, data, *statuses, quick=name == "chunked-100KB", **extra))
    cases += [
        Case("http", "slowloris-body-1-byte-per-100ms", _slowloris(body_only=True), "a body one byte per 100 ms",
             quick=True),
        Case("http", "slowloris-head-1-byte-per-100ms", _slowloris(body_only=False), "the head one byte per 100 ms"),
        Case("http", "slow-clients-50-idle-heads", _idle_heads(50), "50 connections with half a request head"),
        Case("http", "disconnect-mid-body", _disconnect_mid_body, "Content-Length 1000, 100 bytes, close"),
        Case("http", "disconnect-mid-stream", _disconnect_mid_stream, f"a stream of {LONG} tokens left after 2 events",
             "open", quick=True),
        Case("http", "disconnect-before-reading", _disconnect_before_reading,
             f"a completion of {LONG} tokens, the client gone after 0.3 s", "open", quick=True),
        Case("http", "disconnect-while-queued", _disconnect_while_queued,
             "a stream and a completion queued behind 2 streams, their clients gone after 0.3 s", "open"),
    ]  # fmt: skip
    return cases


def _chunked(data: bytes, size: int) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(data[i : i + size]), data[i : i + size]) for i in range(0, len(data), size))
    return out + b"0\r\n\r\n"


def _half_close(data: bytes) -> Callable[[Ctx], tuple[str, str, list[str]]]:
    def run(ctx: Ctx) -> tuple[str, str, list[str]]:
        srv = ctx.server("key")
        with socket.create_connection(("127.0.0.1", srv.port), timeout=ctx.timeout) as sock:
            sock.sendall(data)
            time.sleep(0.3)
            sock.shutdown(socket.SHUT_WR)
            answer = read_response(sock)
        return (*judge(answer, Expect((400, 413), closed_ok=True)), answer.show())

    return run


def _probe(ctx: Ctx, limit: float = 3.0) -> str | None:
    """Why another client was not served within ``limit`` seconds (health, and a 2-token completion), or None."""
    srv = ctx.server("key")
    started = time.monotonic()
    problem = srv.health(limit)
    if problem:
        return problem
    try:
        r = httpx.post(srv.url + COMPLETIONS, content=body(), timeout=limit,
                       headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})  # fmt: skip
    except httpx.HTTPError as exc:
        return f"a 2-token completion: {type(exc).__name__} after {time.monotonic() - started:.1f} s"
    return None if r.status_code == 200 else f"a 2-token completion answered {r.status_code}"


def _while_probing(ctx: Ctx, work: Callable[[], Any]) -> tuple[Any, list[str]]:
    """Run ``work`` in a thread and probe the server meanwhile; (its result, the probes that failed)."""
    box: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: box.setdefault("result", work()), daemon=True)
    thread.start()
    problems = []
    while thread.is_alive():
        problem = _probe(ctx)
        if problem:
            problems.append(problem)
        time.sleep(0.3)
    thread.join()
    return box.get("result"), problems


def _slowloris(body_only: bool) -> Callable[[Ctx], tuple[str, str, list[str]]]:
    def run(ctx: Ctx) -> tuple[str, str, list[str]]:
        data = head("POST", COMPLETIONS, body())
        split = data.index(b"\r\n\r\n") + 4 if body_only else 0
        first, rest = data[:split], data[split:]
        trickle, tail = rest[:30], rest[30:]  # 30 bytes, one per 100 ms: 3 s
        answer, problems = _while_probing(
            ctx, lambda: raw_send(ctx, [first, *(trickle[i : i + 1] for i in range(len(trickle))), tail], pause=0.1)
        )
        outcome, detail = judge(answer, Expect((200,)))
        if problems:
            return "hang", f"others not served while a client trickled: {problems[0]}", answer.show()
        return outcome, detail, answer.show()

    return run


def _idle_heads(n: int) -> Callable[[Ctx], tuple[str, str, list[str]]]:
    def run(ctx: Ctx) -> tuple[str, str, list[str]]:
        srv = ctx.server("key")
        socks = []
        try:
            for _ in range(n):
                sock = socket.create_connection(("127.0.0.1", srv.port), timeout=ctx.timeout)
                sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Le")
                socks.append(sock)
            problem = _probe(ctx)
        finally:
            for sock in socks:
                sock.close()
        if problem:
            return "hang", f"others not served with {n} half-sent heads open: {problem}", []
        return "clean", f"{n} idle connections held, others served", []

    return run


def _auth(srv: Server) -> dict[str, str]:
    return {"Authorization": f"Bearer {srv.key}"} if srv.key else {}


def _gauges(ctx: Ctx, server: str = "key") -> dict[str, float]:
    """The unlabelled samples of /metrics."""
    srv = ctx.server(server)
    r = httpx.get(srv.url + "/metrics", headers=_auth(srv), timeout=ctx.timeout)
    out = {}
    for line in r.text.splitlines():
        parts = line.split()
        if len(parts) == 2 and not line.startswith("#") and "{" not in parts[0]:
            out[parts[0]] = float(parts[1])
    return out


def _settled(ctx: Ctx, limit: float = 5.0, server: str = "key") -> str | None:
    """Why the batch and the queue are not empty within ``limit`` seconds (KV caches not freed), or None."""
    deadline = time.monotonic() + limit
    while True:
        g = _gauges(ctx, server)
        running, waiting = g.get("zipmoe_running_sequences", -1), g.get("zipmoe_queue_length", -1)
        if running == 0 and waiting == 0:
            return None
        if time.monotonic() > deadline:
            return f"running_sequences {running:g}, queue_length {waiting:g} after {limit:g} s"
        time.sleep(0.05)


def _disconnect_mid_body(ctx: Ctx) -> tuple[str, str, list[str]]:
    data = head("POST", COMPLETIONS, body(), length=1000)
    raw_send(ctx, [data[:-20]], read=False)
    return "clean", "closed mid-body", []


# The disconnect cases run on the open server, whose context (the model's, 4,096) allows generations long enough
# (LONG tokens: ~2 s) to outlive their clients; on the keyed server every generation ends within ~0.3 s anyway.
LONG = 400


def _long(stream: bool) -> bytes:
    return body(max_tokens=LONG, stream=stream, ignore_eos=True)


def _occupy(ctx: Ctx, n: int) -> list[threading.Thread]:
    """``n`` long streams of the open server, read to their end in threads: the batch busy."""
    srv = ctx.server("open")

    def stream() -> None:
        with httpx.stream("POST", srv.url + COMPLETIONS, content=_long(True), timeout=ctx.timeout) as r:
            r.read()

    threads = [threading.Thread(target=stream, daemon=True) for _ in range(n)]
    for thread in threads:
        thread.start()
    time.sleep(0.2)
    return threads


def _gone_verdict(ctx: Ctx, before: float, left: float, what: str, threads: list[threading.Thread] = (), n: int = 1,
                  ) -> tuple[str, str, list[str]]:  # fmt: skip
    """``n`` generations cancelled, and the batch empty once the ``threads`` are done: or what went wrong."""
    problem = _settled(ctx, server="open") if not threads else None
    freed = time.monotonic() - left
    for thread in threads:
        thread.join(ctx.timeout)
    problem = problem or _settled(ctx, server="open")
    if problem:
        return "wrong", problem, []
    cancelled = _gauges(ctx, "open").get("zipmoe_requests_cancelled_total", 0) - before
    if cancelled < n:
        return "wrong", f"{what}: {cancelled:g} of {n} generations cancelled (requests_cancelled_total)", []
    when = "" if threads else f" {freed:.2f} s after the client left"
    return "clean", f"{what}: cancelled, batch freed{when}", []


def _disconnect_mid_stream(ctx: Ctx) -> tuple[str, str, list[str]]:
    srv = ctx.server("open")
    before, events = _gauges(ctx, "open").get("zipmoe_requests_cancelled_total", 0), 0
    with httpx.stream("POST", srv.url + COMPLETIONS, content=_long(True), timeout=ctx.timeout) as r:
        if r.status_code != 200:
            return "wrong", f"the stream answered {r.status_code}", [r.read().decode()[:200]]
        for line in r.iter_lines():
            events += line.startswith("data:")
            if events == 2:
                break
    return _gone_verdict(ctx, before, time.monotonic(), f"a stream left after {events} events")


def _disconnect_before_reading(ctx: Ctx) -> tuple[str, str, list[str]]:
    srv = ctx.server("open")
    before = _gauges(ctx, "open").get("zipmoe_requests_cancelled_total", 0)
    with socket.create_connection(("127.0.0.1", srv.port), timeout=ctx.timeout) as sock:
        sock.sendall(head("POST", COMPLETIONS, _long(False), auth=False))
        time.sleep(0.3)  # generating: then the client goes without reading a byte
    return _gone_verdict(ctx, before, time.monotonic(), "a completion left unread")


def _disconnect_while_queued(ctx: Ctx) -> tuple[str, str, list[str]]:
    srv = ctx.server("open")
    before = _gauges(ctx, "open").get("zipmoe_requests_cancelled_total", 0)
    threads = _occupy(ctx, MAX_BATCH)
    for data in (_long(True), _long(False)):
        with socket.create_connection(("127.0.0.1", srv.port), timeout=ctx.timeout) as sock:
            sock.sendall(head("POST", COMPLETIONS, data, auth=False))
            time.sleep(0.3)  # waiting behind the two running, then gone
    return _gone_verdict(ctx, before, time.monotonic(), "a queued stream and a queued completion left", threads, 2)


# -- auth -------------------------------------------------------------------------------------------------------------


def family_auth() -> list[Case]:
    endpoints = [("POST", COMPLETIONS, body()), ("POST", CHAT, chat_body()), ("GET", "/v1/models", None),
                 ("GET", "/v1/models/tiny.zmoe", None), ("GET", "/metrics", None)]  # fmt: skip
    variants: list[tuple[str, Any, int]] = [
        ("missing", None, 401), ("wrong", f"Bearer {KEY}x", 401), ("empty-bearer", "Bearer ", 401),
        ("bearer-only", "Bearer", 401), ("scheme-basic", f"Basic {KEY}", 401), ("scheme-token", f"Token {KEY}", 401),
        ("key-alone", KEY, 401), ("overlong-10KB", "Bearer " + "k" * 10_000, 401), ("prefix", f"Bearer {KEY[:-1]}", 401),
        ("bearer-lowercase", f"bearer {KEY}", 200), ("right", f"Bearer {KEY}", 200),
    ]  # fmt: skip
    cases = []
    for method, path, data in endpoints:
        for name, value, status in variants:
            if path != COMPLETIONS and name not in ("missing", "wrong", "empty-bearer", "right"):
                continue  # every variant on one endpoint; the main ones on all
            quick = name in ("missing", "wrong") and path == COMPLETIONS
            extra = {"code": "invalid_api_key", "check": _www_authenticate} if status == 401 else {}
            if value is not None and value != value.strip():  # httpx will not send it: raw
                data_ = head(method, path, data or b"", auth=False, extra=f"Authorization: {value}\r\n")
                cases.append(raw_case("auth", f"{name} {method} {path}", data_, status, quick=quick, **extra))
                continue
            req = Req(method, path, data, auth=False, headers={"Authorization": value})
            cases.append(http_case("auth", f"{name} {method} {path}", req, status, quick=quick, **extra))
    others = [
        ("key-in-query", Req("POST", f"{COMPLETIONS}?api_key={KEY}", body(), auth=False), (401,)),
        ("key-in-query-key", Req("GET", f"/v1/models?key={KEY}", auth=False), (401,)),
        ("x-api-key-header", Req("GET", "/v1/models", auth=False, headers={"X-Api-Key": KEY}), (401,)),
        ("api-key-header", Req("GET", "/v1/models", auth=False, headers={"api-key": KEY}), (401,)),
        ("bearer-non-ascii", Req("GET", "/v1/models", auth=False, headers={"Authorization": b"Bearer \xff\xfe"}),
         (401,)),
        ("bearer-utf8-key-lookalike", Req("GET", "/v1/models", auth=False,
                                          headers={"Authorization": f"Bearer {KEY[:-1]}é".encode()}), (401,)),
        ("bearer-double-space", Req("GET", "/v1/models", auth=False, headers={"Authorization": f"Bearer  {KEY}"}),
         (200, 401)),
        ("bearer-tab", Req("GET", "/v1/models", auth=False, headers={"Authorization": f"Bearer\t{KEY}"}), (200, 401)),
        ("health-without-key", Req("GET", "/health", auth=False), (200,)),
        ("health-wrong-key", Req("GET", "/health", auth=False, headers={"Authorization": "Bearer nope"}), (200,)),
        ("unknown-path-without-key", Req("GET", "/v1/secret", auth=False), (401, 404)),
        ("wrong-method-without-key", Req("GET", COMPLETIONS, auth=False), (401, 405)),
        ("traversal-without-key", Req("GET", "/v1/models/..%2F..%2Fetc%2Fpasswd", auth=False), (401,)),
        ("open-server-no-key", Req("POST", COMPLETIONS, body(), auth=False, server="open"), (200,)),
        ("open-server-garbage-auth", Req("POST", COMPLETIONS, body(), auth=False, server="open",
                                         headers={"Authorization": "Bearer \x01garbage"}), (200,)),
    ]  # fmt: skip
    for name, req, statuses in others:
        extra = {"code": "invalid_api_key"} if statuses == (401,) else {}
        cases.append(http_case("auth", name, req, *statuses, quick=name == "health-without-key", **extra))
    trailing = head("GET", "/v1/models", auth=False, extra=f"Authorization: Bearer {KEY} \r\n")
    cases.append(raw_case("auth", "bearer-trailing-space", trailing, 200, 401))
    two = head("GET", "/v1/models", auth=False, extra=f"Authorization: Bearer wrong\r\nAuthorization: Bearer {KEY}\r\n")
    cases.append(raw_case("auth", "two-authorization-headers", two, 401, 200))
    cases.append(raw_case("auth", "bearer-100KB", head("GET", "/v1/models", auth=False,
                                                       extra="Authorization: Bearer " + "k" * 100_000 + "\r\n"),
                          401, 400, 431, protocol=True))  # fmt: skip
    cases.append(raw_case("auth", "bearer-nul", head("GET", "/v1/models", auth=False,
                                                     extra=f"Authorization: Bearer {KEY}\x00\r\n"), 400, 401,
                          protocol=True))  # fmt: skip
    return cases


def _www_authenticate(answer: Answer) -> str | None:
    return None if "www-authenticate" in answer.headers else "401 without WWW-Authenticate"


# -- load -------------------------------------------------------------------------------------------------------------


async def _burst(url: str, bodies: list[bytes], *, path: str = COMPLETIONS, timeout: float) -> list[Answer]:
    """All ``bodies`` posted at once; their answers (streams read whole)."""
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(data: bytes) -> Answer:
            try:
                r = await client.post(url + path, content=data, headers={"Authorization": f"Bearer {KEY}"})
                return Answer(r.status_code, dict(r.headers), r.content)
            except httpx.TimeoutException:
                return Answer(error="timeout")
            except httpx.HTTPError as exc:
                return Answer(error=f"{type(exc).__name__}: {exc}")

        return list(await asyncio.gather(*(one(b) for b in bodies)))


def _load_verdict(ctx: Ctx, answers: list[Answer], *, need_503: bool, ok: tuple[int, ...] = (200, 503),
                  ) -> tuple[str, str, list[str]]:  # fmt: skip
    statuses = Counter(a.status if a.status else a.error for a in answers)
    shown = [f"answers: {dict(statuses)}"]
    for a in answers:
        outcome, detail = judge(a, Expect(ok))
        if outcome not in ("clean", "accepted"):
            return outcome, detail, shown + a.show()
    if need_503 and not statuses[503]:
        return "wrong", f"no 503 with {len(answers)} requests at once (max_batch {MAX_BATCH}, queue {MAX_QUEUE})", shown
    problem = _settled(ctx)
    if problem:
        return "wrong", problem, shown
    return "clean", f"{dict(statuses)}; batch freed", shown


def _load_burst(n: int, stream: bool, chat: bool = False) -> Callable[[Ctx], tuple[str, str, list[str]]]:
    def run(ctx: Ctx) -> tuple[str, str, list[str]]:
        data = (chat_body if chat else body)(max_tokens=20, stream=stream, ignore_eos=True)
        answers = asyncio.run(_burst(ctx.server("key").url, [data] * n, path=CHAT if chat else COMPLETIONS,
                                     timeout=ctx.timeout * 2))  # fmt: skip
        return _load_verdict(ctx, answers, need_503=n > MAX_BATCH + MAX_QUEUE)

    return run


def _load_mixed(ctx: Ctx) -> tuple[str, str, list[str]]:
    """Valid and invalid requests at once: the invalid ones are 400 even while the queue is full."""
    good, bad = body(max_tokens=20, ignore_eos=True), body(temperature=-1)
    answers = asyncio.run(_burst(ctx.server("key").url, [good, bad] * 12, timeout=ctx.timeout * 2))
    for a in answers[1::2]:
        outcome, detail = judge(a, Expect((400,)))
        if outcome != "clean":
            return outcome, "an invalid request under load: " + detail, a.show()
    return _load_verdict(ctx, answers[0::2], need_503=True)


def _load_stream_disconnects(n: int, server: str, tokens: int) -> Callable[[Ctx], tuple[str, str, list[str]]]:
    """``n`` streaming clients at once, each leaving at a random point: before the head, mid-stream, or never."""

    def run(ctx: Ctx) -> tuple[str, str, list[str]]:
        srv = ctx.server(server)
        url = srv.url
        rng = random.Random(ctx.seed)
        plans = [(rng.choice(("head", "events", "events", "whole")), rng.uniform(0.0, 0.6), rng.randint(0, 12))
                 for _ in range(n)]  # fmt: skip

        async def main() -> list[tuple[str, Any]]:
            limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=0)
            async with httpx.AsyncClient(timeout=ctx.timeout * 2, limits=limits) as client:

                async def one(plan: tuple[str, float, int]) -> tuple[str, Any]:
                    how, delay, events = plan
                    data = body(max_tokens=tokens, stream=True, ignore_eos=True)
                    try:
                        async with client.stream("POST", url + COMPLETIONS, content=data, headers=_auth(srv)) as r:
                            if r.status_code != 200:
                                return "status", Answer(r.status_code, dict(r.headers), await r.aread())
                            seen = 0
                            async for line in r.aiter_lines():
                                seen += line.startswith("data:")
                                if how == "events" and seen > events:
                                    return "left", seen
                            return "whole", seen
                    except httpx.TimeoutException:
                        return "timeout", None
                    except httpx.HTTPError as exc:
                        return "error", f"{type(exc).__name__}: {exc}"

                async def bounded(plan: tuple[str, float, int]) -> tuple[str, Any]:
                    if plan[0] != "head":
                        return await one(plan)
                    try:  # gone before the answer's head (queued, or in prefill)
                        return await asyncio.wait_for(one(plan), plan[1])
                    except asyncio.TimeoutError:
                        return "left", 0

                return list(await asyncio.gather(*(bounded(p) for p in plans)))

        results = asyncio.run(main())
        kinds = Counter(kind if kind != "status" else value.status for kind, value in results)
        shown = [f"clients: {dict(kinds)}"]
        for kind, value in results:
            if kind == "timeout":
                return "hang", "a streaming client got no answer within the timeout", shown
            if kind == "error":
                return "unclean", value, shown
            if kind == "status":
                outcome, detail = judge(value, Expect((503,)))
                if outcome != "clean":
                    return outcome, detail, shown + value.show()
        problem = _settled(ctx, server=server)
        if problem:
            return "wrong", problem, shown
        return "clean", f"{dict(kinds)}; batch freed", shown

    return run


def _load_sequential_disconnects(n: int) -> Callable[[Ctx], tuple[str, str, list[str]]]:
    def run(ctx: Ctx) -> tuple[str, str, list[str]]:
        for _ in range(n):
            raw_send(ctx, [head("POST", COMPLETIONS, body(max_tokens=30, ignore_eos=True))], read=False)
        problem = _settled(ctx, 10.0)
        return ("wrong", problem, []) if problem else ("clean", f"{n} abandoned requests; batch freed", [])

    return run


def _load_connections(n: int) -> Callable[[Ctx], tuple[str, str, list[str]]]:
    def run(ctx: Ctx) -> tuple[str, str, list[str]]:
        srv = ctx.server("key")
        socks = []
        try:
            for _ in range(n):
                socks.append(socket.create_connection(("127.0.0.1", srv.port), timeout=ctx.timeout))
            problem = _probe(ctx)
        finally:
            for sock in socks:
                sock.close()
        return ("hang", problem, []) if problem else ("clean", f"{n} idle connections, others served", [])

    return run


def family_load() -> list[Case]:
    over = MAX_BATCH + MAX_QUEUE + 6
    return [
        Case("load", f"burst-{over}-completions", _load_burst(over, False), f"{over} completions at once", quick=True),
        Case("load", f"burst-{over}-streams", _load_burst(over, True), f"{over} streaming completions at once"),
        Case("load", f"burst-{over}-chats", _load_burst(over, False, chat=True), f"{over} chat completions at once"),
        Case("load", "burst-within-capacity", _load_burst(MAX_BATCH + MAX_QUEUE, False),
             f"{MAX_BATCH + MAX_QUEUE} completions at once (no 503 needed)"),
        Case("load", "mixed-valid-and-invalid-24", _load_mixed, "12 valid and 12 invalid requests at once"),
        Case("load", "streams-64-random-disconnects", _load_stream_disconnects(64, "key", 40),
             "64 streaming clients of 40 tokens leaving at random points", quick=True),
        Case("load", "streams-64-random-disconnects-long", _load_stream_disconnects(64, "open", LONG),
             f"64 streaming clients of {LONG} tokens (open server) leaving at random points", "open"),
        Case("load", "sequential-disconnects-20", _load_sequential_disconnects(20), "20 requests abandoned unread"),
        Case("load", "idle-connections-200", _load_connections(200), "200 idle connections"),
        Case("load", "after-load-request",
             lambda ctx: (*judge(a := send(ctx, post(COMPLETIONS, body())), Expect((200,))), a.show()),
             "one completion after the load"),
    ]  # fmt: skip


BUILDERS: dict[str, Callable[[], list[Case]]] = {
    "json": family_json, "params": family_params, "context": family_context, "http": family_http,
    "auth": family_auth, "load": family_load,
}  # fmt: skip


# -- running ----------------------------------------------------------------------------------------------------------


def run_case(case: Case, index: int, ctx: Ctx) -> Verdict:
    ctx.server(case.server)
    for s in ctx.servers.values():
        s.tag, s.peak = index, attack._rss_bytes(s.proc.pid) if s.alive else 0
    before = attack.snapshot(ctx.base)
    started = time.monotonic()
    outcome, detail, answer = case.run(ctx)
    seconds = time.monotonic() - started
    rss = max(s.peak for s in ctx.servers.values())
    for s in ctx.servers.values():
        if s.proc is None:
            continue
        if s.memory_killed:
            outcome, detail = "memory", f"the {s.name} server grew above {ctx.rss_limit / GIB:.1f} GiB; killed"
        elif not s.alive:
            rc = s.proc.returncode
            how = signal.Signals(-rc).name if rc < 0 and -rc in signal.valid_signals() else f"exit {rc}"
            outcome, detail = "crash", f"the {s.name} server died ({how})"
        else:
            problem = s.health(ctx.health_timeout)
            if problem is None:
                continue
            if outcome not in FAILURES:
                outcome, detail = "hang", f"after the case: {problem}"
        s.restart()
    writes = attack.outside_writes(before, attack.snapshot(ctx.base), [], ctx.base)
    if writes and outcome not in FAILURES:
        outcome, detail = "outside-write", "; ".join(writes[:3])
    return Verdict(case, index, outcome, detail, answer, seconds, rss)


def attribute_logs(verdicts: list[Verdict], servers: list[Server]) -> None:
    """The server log lines of each case; a traceback among them makes the case a ``traceback``."""
    by_index: dict[Any, list[str]] = {}
    for server in servers:
        for tag, line in server.lines:
            by_index.setdefault(tag, []).append(line)
    for v in verdicts:
        v.log = by_index.get(v.index, [])
        text = "\n".join(v.log)
        if "Traceback (most recent call last)" in text and v.outcome not in ("crash", "memory", "hang"):
            v.outcome, v.detail = "traceback", attack.exception_line(text)


def build_golden(gdir: Path, say: Callable[[str], None]) -> Path:
    """The tiny demo checkpoint packed into ``gdir/tiny.zmoe`` with the CLI (reused when it is there)."""
    container = gdir / "tiny.zmoe"
    if container.exists():
        return container
    gdir.mkdir(parents=True, exist_ok=True)
    say("building the tiny demo checkpoint and packing it")
    for argv in (["demo-checkpoint", str(gdir / "ckpt"), "--preset", "tiny", "--force"],
                 ["pack", str(gdir / "ckpt"), "-o", str(container), "-q", "--force"]):  # fmt: skip
        r = subprocess.run([sys.executable, "-m", "zipmoe", *argv], env=attack.CHILD_ENV, capture_output=True,
                           text=True, timeout=300)  # fmt: skip
        if r.returncode != 0:
            raise SystemExit(f"setup failed: zipmoe {argv[0]}: exit {r.returncode}\n{r.stderr[-3000:]}")
    return container


def quick_subset(cases: list[Case]) -> list[Case]:
    return [c for c in cases if c.quick]


def summarize(verdicts: list[Verdict], families: list[str], ctx: Ctx, seconds: float) -> dict[str, Any]:
    """The summary in the shape of scripts/attack.py's (so that its report and Markdown printers serve)."""
    counts: dict[str, Counter] = {f: Counter() for f in families}
    for v in verdicts:
        counts[v.case.family][v.outcome] += 1
    total: Counter = Counter()
    for c in counts.values():
        total.update(c)
    failures = [v for v in verdicts if v.outcome in FAILURES]
    kinds = Counter((v.outcome, _signature(v)) for v in failures)
    servers = list(ctx.servers.values())
    top = max(verdicts, key=lambda v: v.rss, default=None)
    return {
        "seconds": round(seconds, 1),
        "families": {f: {"tried": sum(c.values()), **{k: c[k] for k in OUTCOMES}} for f, c in counts.items()},
        "total": {"tried": sum(total.values()), **{k: total[k] for k in OUTCOMES}},
        "failures": [
            {"family": v.case.family, "case": v.case.name, "outcome": v.outcome, "detail": v.detail,
             "command": v.case.request, "stderr": v.answer + _log_tail(v.log)}
            for v in failures
        ],
        "failure_kinds": [{"outcome": o, "signature": s, "count": n} for (o, s), n in kinds.most_common()],
        "peak_rss": {"clean_run_bytes": None, "hostile_run_max_bytes": None, "hostile_run_max_case": None,
                     "hostile_run_cases": 0},
        "corruption": {"detected": 0, "missed": 0, "other": 0},
        "server": {
            s.name: {"rss_after_start_bytes": s.rss_after_start, "rss_peak_bytes": s.max_peak, "starts": s.starts,
                     "argv": " ".join(["zipmoe", *s.argv[3:]])}
            for s in servers
        },
        "largest_rss_case": {"case": f"{top.case.family}/{top.case.name}", "bytes": top.rss} if top else None,
    }  # fmt: skip


def _signature(v: Verdict) -> str:
    if v.outcome in ("wrong", "traceback", "unclean"):
        return v.detail[:90]
    return v.outcome


def _log_tail(log: list[str], n: int = 6) -> list[str]:
    text = "\n".join(log)
    if "Traceback (most recent call last)" in text:
        return ["log: " + ln[:200] for ln in log[-n:]]
    return ["log: " + ln[:200] for ln in log[:2]]


def print_server_lines(summary: dict[str, Any]) -> None:
    for name, s in summary["server"].items():
        print(f"{name} server (`{s['argv']}`): {s['rss_after_start_bytes'] / 2**20:.0f} MiB resident after "
              f"start-up, at most {s['rss_peak_bytes'] / 2**20:.0f} MiB during the campaign; started "
              f"{s['starts']} time{'s' if s['starts'] > 1 else ''}.")  # fmt: skip
    top = summary["largest_rss_case"]
    if top:
        print(f"The largest resident memory, {top['bytes'] / 2**20:.0f} MiB, was reached in {top['case']}.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawTextHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="a small subset (~30 cases)")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown (for docs/SECURITY.md)")
    parser.add_argument("--family", action="append", choices=FAMILIES, help="only these families (repeatable)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds before a request is a hang (default 20)")
    parser.add_argument("--health-timeout", type=float, default=5.0, help="seconds /health may take after a case")
    parser.add_argument("--max-rss", type=float, default=3.0, help="GiB of server memory before a kill (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random cases (default 0)")
    parser.add_argument("--match", help="only cases whose 'family/name' contains this text")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--golden", help="build the container here, or reuse it from an earlier run")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (printed at the end)")
    args = parser.parse_args(argv)

    families = [f for f in FAMILIES if f in (args.family or FAMILIES)]
    cases = [c for f in families for c in BUILDERS[f]()]
    if args.quick:
        cases = quick_subset(cases)
    if args.match:
        cases = [c for c in cases if args.match in f"{c.family}/{c.name}"]
    if args.list:
        for c in cases:
            print(f"{c.family}/{c.name}")
        return 0

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    base = Path(tempfile.mkdtemp(prefix="zipmoe-attack-server-"))
    started = time.monotonic()
    ctx = None
    try:
        container = build_golden(Path(args.golden).resolve() if args.golden else base / "golden", say)
        srv_dir = base / "server"
        srv_dir.mkdir()
        shutil.copy(container, srv_dir / "tiny.zmoe")
        (srv_dir / "secret.txt").write_text(SECRET + "\n")
        ctx = Ctx(srv_dir, "tiny.zmoe", args.timeout, args.health_timeout, int(args.max_rss * GIB), args.seed)
        say("starting zipmoe serve")
        ctx.server("key")
        say(f"running {len(cases)} cases against {ctx.servers['key'].url}")
        verdicts = []
        for i, case in enumerate(cases):
            v = run_case(case, i, ctx)
            verdicts.append(v)
            mark = "" if v.outcome in ("clean", "accepted") else f"  <- {v.outcome}: {v.detail[:120]}"
            say(f"[{i + 1:4d}/{len(cases)}] {case.family}/{case.name[:70]}: {v.outcome} ({v.seconds:.1f} s){mark}")
        for server in ctx.servers.values():
            server.stop()
        time.sleep(0.2)  # the log readers see the last lines
        attribute_logs(verdicts, list(ctx.servers.values()))
        summary = summarize(verdicts, families, ctx, time.monotonic() - started)
        if args.json:
            print(json.dumps(summary, indent=2))
        elif args.markdown:
            attack.print_markdown(summary)
            print()
            print_server_lines(summary)
        else:
            attack.print_report(summary)
            print_server_lines(summary)
        return 1 if summary["total"]["tried"] != summary["total"]["clean"] + summary["total"]["accepted"] else 0
    finally:
        if ctx is not None:
            for server in ctx.servers.values():
                server.stop()
        if args.keep:
            print(f"kept {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
