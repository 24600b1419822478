"""`zipmoe bench serve`: a load generator against a live `zipmoe serve`, with the real ``openai`` client.

For each number of concurrent streams (1, 4, 8, 16 by default) a fresh server is started on a free port (so every
level starts from the same cold cache), one unmeasured round warms its cache, and then each stream sends
``requests`` streamed completions one after another, all streams at once. Each request asks for ``max_tokens``
tokens with ``ignore_eos`` (so every one generates exactly that many) after a prompt of ``prompt_tokens`` bytes of
text (the byte-level tokenizer of the demo presets makes one token of each). Reported per level:

* aggregate tokens/s: completion tokens of the measured rounds over their wall time;
* TTFT (request sent to first token) and TPOT ((last token - first token) / (tokens - 1)) per request, p50 / p95;
* from ``/metrics``, over the measured rounds only: bytes read from storage per generated token, the expert uses
  served by each tier, and the mean batch size of the forward passes;
* the server's peak resident memory.

The server replays a synthetic routing trace (``--routing``, hidden in ``zipmoe serve``): every new sequence takes
the next request of the trace, so concurrent sequences choose different experts as a real router's would.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from zipmoe.errors import ZipmoeError

LEVELS = (1, 4, 8, 16)
SERVER_START_SECONDS = 300  # loading the dense weights and compiling kernels, on a slow machine
_SERVING = re.compile(r"Serving .* on (http://\S+) \(OpenAI API")
_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$")


class ServerError(ZipmoeError):
    """The server under benchmark did not start, or died."""


@dataclass
class LevelResult:
    """One number of concurrent streams, measured rounds only (seconds, bytes)."""

    streams: int
    requests: int
    completion_tokens: int
    wall_seconds: float
    ttft: list[float] = field(default_factory=list)
    tpot: list[float] = field(default_factory=list)
    bytes_read: float = 0.0
    served_from: dict[str, float] = field(default_factory=dict)  # expert uses by the tier (or storage) serving them
    mean_batch: float = 0.0
    peak_rss: int = 0  # the server process's high-water resident memory (Linux), bytes

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.wall_seconds if self.wall_seconds else 0.0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_read / self.completion_tokens if self.completion_tokens else 0.0

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc.pop("ttft"), doc.pop("tpot")
        return doc | {
            "tokens_per_second": self.tokens_per_second,
            "bytes_read_per_token": self.bytes_per_token,
            "ttft_p50": percentile(self.ttft, 50),
            "ttft_p95": percentile(self.ttft, 95),
            "tpot_p50": percentile(self.tpot, 50),
            "tpot_p95": percentile(self.tpot, 95),
        }


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile with linear interpolation (numpy's default), 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition as ``{'name{labels}': value}`` (comments skipped)."""
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = _SAMPLE.match(line.strip())
        if m:
            out[m[1] + (m[2] or "")] = float(m[3])
    return out


def _labelled(metrics: dict[str, float], name: str, label: str) -> dict[str, float]:
    """The samples of ``name`` by the value of ``label``."""
    found = {}
    for key, value in metrics.items():
        if key.startswith(name + "{") and (m := re.search(rf'{label}="([^"]*)"', key)):
            found[m[1]] = value
    return found


class Server:
    """``zipmoe serve CONTAINER ARGS`` in a child process on a free port, until `stop`."""

    def __init__(self, container: str, args: Sequence[str], log: Callable[[str], None] | None = None) -> None:
        command = [sys.executable, "-m", "zipmoe", "serve", container, "--port", "0", *args]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        deadline = time.monotonic() + SERVER_START_SECONDS
        while time.monotonic() < deadline:
            line = self.process.stderr.readline()
            if not line:
                break
            self.lines.append(line.rstrip())
            if m := _SERVING.search(line):
                self.url = m[1]
                self._drain()
                return
        self.stop()
        raise ServerError(f"zipmoe serve did not start: {' / '.join(self.lines[-3:]) or 'no output'}")

    def _drain(self) -> None:
        """Keep reading the server's stderr so that its logging never blocks on a full pipe."""
        import threading

        def read() -> None:
            for line in self.process.stderr:
                self.lines.append(line.rstrip())
                del self.lines[:-20]

        threading.Thread(target=read, daemon=True).start()

    def metrics(self) -> dict[str, float]:
        import httpx

        return parse_metrics(httpx.get(self.url + "/metrics", timeout=60).text)

    def peak_rss(self) -> int:
        """The server's high-water resident set size (VmHWM; 0 where /proc is not there)."""
        try:
            with open(f"/proc/{self.process.pid}/status", encoding="ascii") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
        except (OSError, StopIteration, ValueError):
            return 0

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def _request(client: Any, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """One streamed completion: (TTFT, TPOT, completion tokens)."""
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    stream = await client.completions.create(
        model="zipmoe", prompt=prompt, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices and chunk.choices[0].text:
            first = first if first is not None else now
            last = now
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    if first is None:
        raise ServerError("a request produced no text")
    return first - sent, (last - first) / max(tokens - 1, 1), tokens


def prompt_text(stream: int, round_: int, length: int) -> str:
    """A distinct prompt of ``length`` ASCII characters (one token each with a byte-level tokenizer)."""
    words = f"request {round_} of stream {stream}: the cache keeps what the batch shares. "
    return (words * (length // len(words) + 1))[:length]


async def _level(url: str, streams: int, requests: int, max_tokens: int, prompt_tokens: int, round0: int):
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=3600, max_retries=0)
    results: list[tuple[float, float, int]] = []

    async def one_stream(s: int) -> None:
        for r in range(requests):
            results.append(await _request(client, prompt_text(s, round0 + r, prompt_tokens), max_tokens))

    start = time.perf_counter()
    await asyncio.gather(*(one_stream(s) for s in range(streams)))
    wall = time.perf_counter() - start
    await client.close()
    return results, wall


def run_level(
    server: Server, streams: int, *, requests: int, max_tokens: int, prompt_tokens: int, warmup: bool = True
) -> LevelResult:
    """Warm the server with one round of ``streams`` requests, then measure ``requests`` rounds."""
    if warmup:
        asyncio.run(_level(server.url, streams, 1, max_tokens, prompt_tokens, round0=1000))
    before = server.metrics()
    results, wall = asyncio.run(_level(server.url, streams, requests, max_tokens, prompt_tokens, round0=0))
    after = server.metrics()

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    served_after = _labelled(after, "zipmoe_expert_uses_total", "source")
    served_before = _labelled(before, "zipmoe_expert_uses_total", "source")
    steps = delta("zipmoe_batch_steps_total")
    return LevelResult(
        streams=streams,
        requests=len(results),
        completion_tokens=sum(t for _, _, t in results),
        wall_seconds=wall,
        ttft=[r[0] for r in results],
        tpot=[r[1] for r in results],
        bytes_read=delta("zipmoe_storage_read_bytes_total"),
        served_from={k: v - served_before.get(k, 0.0) for k, v in served_after.items()},
        mean_batch=delta("zipmoe_batch_sequences_total") / steps if steps else 0.0,
        peak_rss=server.peak_rss(),
    )


def run_serve_bench(
    container: str,
    *,
    server_args: Sequence[str],
    levels: Sequence[int] = LEVELS,
    requests: int = 2,
    max_tokens: int = 32,
    prompt_tokens: int = 32,
    on_level: Callable[[str], None] | None = None,
) -> list[LevelResult]:
    """Every level on a fresh server started with ``server_args`` (budget, storage, routing ...)."""
    rows = []
    for streams in levels:
        if on_level is not None:
            on_level(f"{streams} stream{'s' if streams > 1 else ''}")
        server = Server(container, [*server_args, "--max-batch", str(max(levels))])
        try:
            rows.append(run_level(server, streams, requests=requests, max_tokens=max_tokens,
                                  prompt_tokens=prompt_tokens))  # fmt: skip
        finally:
            server.stop()
    return rows
