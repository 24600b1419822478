"""The bridge between the event loop that answers HTTP and the thread that runs the model.

One `BatchScheduler` (`zipmoe.runtime.batching`) runs in a dedicated thread (`Worker`) and steps every admitted
sequence together. Each request is a `Generation`: the scheduler's thread decodes its tokens to text with a
`StopMatcher` (stop strings held back and cut, OpenAI's semantics; returning True from ``on_token`` ends the sequence
there, so no token is made past a stop string) and hands text and the final result to the request's
``asyncio.Queue`` through ``loop.call_soon_threadsafe``; the handler awaits that queue. A handler whose client went
away cancels its generation (`Worker.cancel`), which frees the sequence's place and its KV cache at the scheduler's
next step.

With a routing trace (the hidden ``--routing`` of ``zipmoe serve``, for benchmarks), each new sequence replays the
next request of the trace, round robin, in place of the router.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections.abc import AsyncIterator
from typing import Any

from zipmoe.runtime.stops import StopMatcher
from zipmoe.server.metrics import ServerMetrics
from zipmoe.server.openai_errors import SERVER_ERROR, APIError

log = logging.getLogger("zipmoe.server")

TEXT = "text"
DONE = "done"
JOIN_SECONDS = 30.0  # how long closing waits for the scheduler's thread to end its step


class WorkerError(APIError):
    """The model's thread failed: HTTP 500, for this request and the next."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=500, type=SERVER_ERROR, code="internal_error")


class Generation:
    """One request's sequence: its scheduler `Sequence`, and the text and result the scheduler's thread sends.

    Made by `Worker.submit`; iterate `texts` on the event loop, then read `result` and `finish_reason`.
    """

    def __init__(self, worker: Worker, loop: asyncio.AbstractEventLoop, matcher: StopMatcher) -> None:
        self.worker = worker
        self.loop = loop
        self.matcher = matcher
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.sequence: Any = None
        self.result: Any = None  # the `GenerationResult`, once done
        self.finished = False  # the final result has been received on the loop
        self.cancelled = False
        self.error: BaseException | None = None  # a failure in this sequence's callbacks

    # -- the scheduler's thread ---------------------------------------------------------------------------------------

    def on_token(self, token: int) -> bool:
        """Decode ``token`` and send its text; True (end the sequence) once a stop string has appeared."""
        try:
            text, stopped = self.matcher.push(token)
        except Exception as exc:  # a tokenizer failure ends this sequence, not the scheduler
            self.error = exc
            return True
        self.worker.metrics.token()
        if text:
            self._send(TEXT, text)
        return stopped

    def on_done(self, result: Any) -> None:
        """Send what the matcher still holds, then the result."""
        if not self.matcher.stopped and self.error is None:
            try:
                tail = self.matcher.flush()
            except Exception as exc:
                self.error = exc
            else:
                if tail:
                    self._send(TEXT, tail)
        self._send(DONE, result)

    def _send(self, kind: str, value: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is shutting down and nobody waits
            pass

    # -- the event loop -----------------------------------------------------------------------------------------------

    async def next_event(self, timeout: float) -> tuple[str, Any] | None:
        """The next (`TEXT`, text) or (`DONE`, result), or None after ``timeout`` seconds without one.

        Raises:
            WorkerError: the scheduler's thread has died, or this sequence failed.
        """
        try:
            kind, value = await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            self.worker.check()
            return None
        if kind == DONE:
            self.finished = True
            self.result = value
            failure = self.error or getattr(self.sequence, "error", None)
            if failure is not None:
                log.error("generation failed: %s: %s", type(failure).__name__, failure)
                raise WorkerError(f"the generation failed ({type(failure).__name__}: {failure})")
        return kind, value

    async def texts(self, poll: float = 1.0) -> AsyncIterator[str]:
        """The text as it is made, until the sequence ends (then `result` is set)."""
        while not self.finished:
            event = await self.next_event(poll)
            if event is not None and event[0] == TEXT:
                yield event[1]

    @property
    def finish_reason(self) -> str:
        """``stop`` (end-of-sequence token or a stop string) or ``length`` (max_tokens reached)."""
        if self.matcher.stopped:
            return "stop"
        return getattr(self.result, "finish_reason", None) or "stop"

    def cancel(self) -> None:
        """End the sequence now if it is still running (its KV cache is freed); no-op once finished."""
        self.worker.cancel(self)


class Worker:
    """The scheduler of an engine, run in its own thread between `start` and `close`.

    Args:
        engine: a `zipmoe.runtime.engine.Engine` (not used by anything else while the worker runs).
        max_batch: sequences generated together at most.
        max_queue: sequences waiting for a place at most; one more is refused (`QueueFullError`, HTTP 503).
        max_context: prompt plus completion tokens at most per sequence (None: the model's context).
        trace: a `RoutingTrace` fitted to the model whose requests new sequences replay in turn, or None.
        metrics: the server's counters (tokens are counted here).
    """

    def __init__(
        self,
        engine: Any,
        *,
        max_batch: int = 16,
        max_queue: int = 64,
        max_context: int | None = None,
        trace: Any = None,
        metrics: ServerMetrics | None = None,
    ) -> None:
        self.engine = engine
        self.scheduler = engine.scheduler(max_batch=max_batch, max_queue=max_queue, max_context=max_context)
        self.trace = trace
        self.metrics = metrics or ServerMetrics()
        self._requests = itertools.count()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.failure: BaseException | None = None

    def start(self) -> None:
        """Start the scheduler's thread."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="zipmoe-scheduler", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        try:
            self.scheduler.serve_forever(self._stop)
        except BaseException as exc:  # reported to every request from now on; the HTTP server stays up
            self.failure = exc
            log.exception("the scheduler's thread failed")

    def close(self, timeout: float = JOIN_SECONDS) -> None:
        """Stop the scheduler's thread (sequences still running end where they are)."""
        self._stop.set()
        self.scheduler.wake()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.failure is None

    def check(self) -> None:
        """Raise `WorkerError` when the scheduler's thread is not running."""
        if not self.alive:
            reason = f" ({type(self.failure).__name__}: {self.failure})" if self.failure else ""
            raise WorkerError(f"the model's scheduler is not running{reason}")

    def submit(self, prompt: list[int], sampling: Any, stop: tuple[str, ...] = ()) -> Generation:
        """Admit a sequence; call on the event loop.

        Args:
            prompt: its token ids (they fit the context with ``sampling.max_new_tokens``: the caller checked).
            sampling: its `SamplingOptions`.
            stop: stop strings, cut from the text.

        Raises:
            WorkerError: the scheduler's thread is not running.
            QueueFullError: ``max_queue`` sequences are waiting already.
            PromptError: the scheduler refuses the prompt (over the context).
        """
        self.check()
        generation = Generation(self, asyncio.get_running_loop(), StopMatcher(self.engine.tokenizer, stop))
        replay = None
        if self.trace is not None:
            from zipmoe.runtime.routing import RoutingReplay

            replay = RoutingReplay(self.trace, next(self._requests) % len(self.trace.requests))
        generation.sequence = self.scheduler.submit(
            list(prompt), sampling, on_token=generation.on_token, on_done=generation.on_done, replay=replay
        )
        return generation

    def cancel(self, generation: Generation) -> None:
        """Cancel ``generation`` if it has not finished (thread-safe; counted once)."""
        if generation.finished or generation.cancelled or generation.sequence is None:
            return
        generation.cancelled = True
        self.metrics.cancel()
        self.scheduler.cancel(generation.sequence)
