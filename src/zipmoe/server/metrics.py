"""``GET /metrics``: the server's counters and the engine's, in the Prometheus text exposition format (0.0.4).

The format is a few lines per metric (``# HELP``, ``# TYPE``, then ``name{label="value"} number``), so it is written
here rather than with prometheus_client: one dependency less, and the engine's counters (`PipelineStats`, the
storage's busy time, the scheduler's batches) are read when scraped instead of mirrored into a registry. Every
metric is named ``zipmoe_*``; counters end in ``_total``; docs/SERVE.md lists them. Torch-free.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
RATE_WINDOW_SECONDS = 10.0  # zipmoe_generation_tokens_per_second: tokens over this many seconds


@dataclass
class Family:
    """One metric: its name, ``counter`` or ``gauge``, a help line, and its samples (labels, value)."""

    name: str
    type: str
    help: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)

    def add(self, value: float, **labels: str) -> Family:
        self.samples.append((labels, value))
        return self


def exposition(families: Iterable[Family]) -> str:
    """The text exposition of ``families``: HELP and TYPE lines, then one line per sample; ends with a newline."""
    lines = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for labels, value in family.samples:
            label_text = ",".join(f'{key}="{_escape_label(str(v))}"' for key, v in labels.items())
            lines.append(
                f"{family.name}{{{label_text}}} {_number(value)}" if labels else f"{family.name} {_number(value)}"
            )
    return "\n".join(lines) + "\n"


class ServerMetrics:
    """The server's own counters: requests by endpoint and status, tokens in and out, cancellations, refusals.

    Thread-safe: tokens are counted from the scheduler's thread, requests from the event loop.
    """

    def __init__(self, window: float = RATE_WINDOW_SECONDS) -> None:
        self._lock = threading.Lock()
        self.window = window
        self.requests: Counter[tuple[str, int]] = Counter()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.cancelled = 0
        self.queue_full = 0
        self.started = time.time()
        self._recent: deque[tuple[int, int]] = deque()  # (whole second, tokens made in it), the last `window` s

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[endpoint, status] += 1

    def token(self, count: int = 1) -> None:
        """``count`` tokens were generated now."""
        second = int(time.monotonic())
        with self._lock:
            self.generation_tokens += count
            if self._recent and self._recent[-1][0] == second:
                self._recent[-1] = (second, self._recent[-1][1] + count)
            else:
                self._recent.append((second, count))
            self._trim(second)

    def prompt(self, count: int) -> None:
        with self._lock:
            self.prompt_tokens += count

    def cancel(self) -> None:
        with self._lock:
            self.cancelled += 1

    def refuse(self) -> None:
        """A request was refused because the queue was full."""
        with self._lock:
            self.queue_full += 1

    def tokens_per_second(self) -> float:
        """Tokens generated per second over the last `window` seconds (the current second included)."""
        now = time.monotonic()
        with self._lock:
            self._trim(int(now))
            total = sum(count for _, count in self._recent)
        return total / self.window

    def _trim(self, second: int) -> None:
        while self._recent and self._recent[0][0] <= second - self.window:
            self._recent.popleft()

    def families(self) -> list[Family]:
        with self._lock:
            requests = Family("zipmoe_requests_total", "counter", "HTTP requests answered, by endpoint and status.")
            for (endpoint, status), count in sorted(self.requests.items()):
                requests.add(count, endpoint=endpoint, status=str(status))
            out = [
                requests,
                Family("zipmoe_requests_cancelled_total", "counter", "Generations cancelled: the client went away.")
                .add(self.cancelled),
                Family("zipmoe_requests_rejected_total", "counter", "Requests refused with 503: the queue was full.")
                .add(self.queue_full),
                Family("zipmoe_prompt_tokens_total", "counter", "Prompt tokens of the requests admitted.")
                .add(self.prompt_tokens),
                Family("zipmoe_generation_tokens_total", "counter", "Tokens generated.").add(self.generation_tokens),
                Family("zipmoe_start_time_seconds", "gauge", "When the server started (Unix time).").add(self.started),
            ]  # fmt: skip
        out.append(
            Family(
                "zipmoe_generation_tokens_per_second",
                "gauge",
                f"Tokens generated per second over the last {self.window:g} seconds.",
            ).add(self.tokens_per_second())
        )
        return out


def engine_families(engine: Any, scheduler: Any) -> list[Family]:
    """The engine's metrics: the scheduler's queue and batches, the expert cache per tier, storage and decode.

    Args:
        engine: a `zipmoe.runtime.engine.Engine` (its ``pipeline.stats`` and ``storage`` are read).
        scheduler: its `BatchScheduler` (``waiting``, ``active``, ``stats``).
    """
    stats = engine.pipeline.stats
    hits, misses = dict(stats.hits), dict(stats.misses)  # copies: the scheduler's thread updates them
    served = dict(stats.served_from)
    batch = scheduler.stats
    out = [
        Family("zipmoe_queue_length", "gauge", "Requests waiting for a place in the batch.").add(scheduler.waiting),
        Family("zipmoe_running_sequences", "gauge", "Sequences being generated.").add(scheduler.active),
        Family("zipmoe_batch_size_mean", "gauge", "Sequences per forward pass, on average since the start.")
        .add(batch.mean_batch),
        Family("zipmoe_batch_steps_total", "counter", "Batched forward passes run.").add(batch.steps),
        Family("zipmoe_batch_sequences_total", "counter",
               "Sequences in the forward passes, summed (over zipmoe_batch_steps_total: the mean batch size).")
        .add(batch.batch_sizes),
    ]  # fmt: skip
    finished = Family("zipmoe_sequences_finished_total", "counter", "Sequences retired, by finish reason.")
    for reason, count in sorted(dict(batch.finished).items()):
        finished.add(count, reason=reason)
    out.append(finished)
    hit_family = Family("zipmoe_expert_cache_hits_total", "counter", "Expert representations found in a tier.")
    miss_family = Family("zipmoe_expert_cache_misses_total", "counter", "Expert representations not in their tier.")
    for kind in sorted(set(hits) | set(misses)):
        hit_family.add(hits.get(kind, 0), tier=kind)
        miss_family.add(misses.get(kind, 0), tier=kind)
    served_family = Family(
        "zipmoe_expert_uses_total", "counter", "Expert uses, by the cheapest place that served each."
    )
    for where, count in sorted(served.items()):
        served_family.add(count, source=where)
    storage = engine.storage.snapshot()
    out += [
        hit_family,
        miss_family,
        served_family,
        Family("zipmoe_storage_read_bytes_total", "counter", "Expert bytes read from storage.").add(
            stats.total_bytes_read
        ),
        Family("zipmoe_storage_busy_seconds_total", "counter", "Time with at least one expert read in flight.").add(
            storage.busy_seconds
        ),
        Family("zipmoe_decoded_bytes_total", "counter", "BF16 expert bytes produced by decoding.").add(
            stats.bytes_decoded
        ),
        Family(
            "zipmoe_compute_stall_seconds_total", "counter", "Time the compute thread waited for experts being fetched."
        ).add(stats.stall_seconds),
    ]
    out.append(
        Family("zipmoe_decode_busy_seconds_total", "counter", "Time the decode thread spent decoding expert records.")
        .add(stats.decode_seconds)
    )  # fmt: skip
    return out


def _number(value: float) -> str:
    if isinstance(value, bool):
        value = int(value)
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape_label(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
