"""The OpenAI-compatible HTTP API of ``zipmoe serve``: a Starlette application over one engine.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (JSON, or server-sent events
ending with ``data: [DONE]`` when ``stream`` is true), ``GET /health`` and ``GET /metrics`` (Prometheus text).
docs/SERVE.md describes them, the parameters and the limits.

Every failure is an answer in the OpenAI error shape (`zipmoe.server.openai_errors`), never a dropped connection or
a dead server: a bad body or parameter is 400 naming it, a missing or wrong API key 401, an unknown path 404, a body
over the size limit 413, a full queue 503 with ``Retry-After``, and a bug 500 (its traceback in the server's log).
A client that disconnects cancels its sequence, which frees its place in the batch and its KV cache.
"""

from __future__ import annotations

import hmac
import json
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from zipmoe.errors import ZipmoeError
from zipmoe.runtime.batching import QueueFullError
from zipmoe.runtime.request import MAX_SEED, PromptError, SamplingError
from zipmoe.server import metrics as metrics_text
from zipmoe.server.metrics import ServerMetrics, engine_families, exposition
from zipmoe.server.openai_errors import (
    INVALID_REQUEST,
    OVERLOADED,
    SERVER_ERROR,
    APIError,
    RequestError,
    context_error,
    error_body,
)
from zipmoe.server.schemas import GenerationRequest, parse_body, parse_chat, parse_completion
from zipmoe.server.worker import Generation, Worker

log = logging.getLogger("zipmoe.server")

DEFAULT_MAX_BODY_BYTES = 1 << 20
# A body over the limit is read on and thrown away up to this many times the limit, so that a client that sends it
# whole still reads its 413 (closing a socket with unread data resets it); past that the connection is closed.
DRAIN_FACTOR = 4
CLIENT_CLOSED = 499  # nginx's status for a request whose client went away (logged, never received)
RETRY_AFTER_SECONDS = 1
# --routing: requests of a synthetic trace, replayed in turn by new sequences, and the tokens of each (longer
# sequences wrap around; `zipmoe.runtime.routing.RoutingReplay`)
TRACE_REQUESTS = 8
TRACE_TOKENS = 1024


class ServerOptionsError(ZipmoeError, ValueError):
    """Server options out of range, or that do not fit the model."""


@dataclass(frozen=True)
class ServerOptions:
    """How the server answers.

    Args:
        model_name: the model id ``/v1/models`` lists and responses carry (requests may name any model).
        max_batch: sequences generated together at most.
        max_queue: requests waiting for a place at most; more are refused with 503.
        max_context: prompt plus completion tokens at most (None: the model's context).
        api_key: the key every endpoint but ``/health`` requires as ``Authorization: Bearer KEY`` (None: open).
        max_body_bytes: the largest request body accepted (larger: 413).
        disconnect_poll_seconds: how often a non-streaming request checks that its client is still there.
        routing: a routing trace spec for benchmarks (``synthetic:qwen`` or a trace file; `parse_routing`).
    """

    model_name: str = "zipmoe"
    max_batch: int = 16
    max_queue: int = 64
    max_context: int | None = None
    api_key: str | None = None
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    disconnect_poll_seconds: float = 0.25
    routing: str | None = None

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_queue", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ServerOptionsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_context is not None and self.max_context < 2:
            raise ServerOptionsError(f"--max-context must be at least 2 tokens, got {self.max_context}")
        if self.api_key is not None and not self.api_key.strip():
            raise ServerOptionsError("--api-key is empty")


def create_app(engine: Any, options: ServerOptions | None = None) -> Starlette:
    """The Starlette application serving ``engine``; its lifespan starts and stops the scheduler's thread.

    ``app.state.server`` is the `Server` (its ``worker`` holds the scheduler). The caller keeps the engine and closes
    it after the application has shut down.

    Raises:
        ServerOptionsError: ``max_context`` above the model's context.
        RoutingError: ``routing`` names no trace that fits the model.
    """
    server = Server(engine, options or ServerOptions())

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        server.worker.start()
        try:
            yield
        finally:
            await run_in_threadpool(server.worker.close)

    guard = server.guard
    routes = [
        Route("/health", guard(server.health, "/health", auth=False), methods=["GET"]),
        Route("/metrics", guard(server.metrics, "/metrics"), methods=["GET"]),
        Route("/v1/models", guard(server.models, "/v1/models"), methods=["GET"]),
        Route("/v1/models/{model:path}", guard(server.model, "/v1/models/{model}"), methods=["GET"]),
        Route("/v1/completions", guard(server.completions, "/v1/completions"), methods=["POST"]),
        Route("/v1/chat/completions", guard(server.chat, "/v1/chat/completions"), methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.server = server
    return app


class Server:
    """The handlers, over one engine and its `Worker`."""

    def __init__(self, engine: Any, options: ServerOptions) -> None:
        self.engine = engine
        self.options = options
        model_context = engine.args.context
        if options.max_context is not None and options.max_context > model_context:
            raise ServerOptionsError(
                f"--max-context {options.max_context} is above the model's context of {model_context} tokens"
            )
        self.context = options.max_context or model_context
        self.tokenizer = engine.tokenizer  # loaded now, not by two threads at once later
        self.metrics_counters = ServerMetrics()
        self.worker = Worker(
            engine, max_batch=options.max_batch, max_queue=options.max_queue, max_context=self.context,
            trace=self._trace(options.routing), metrics=self.metrics_counters,
        )  # fmt: skip
        self.created = int(time.time())
        self._key = options.api_key.encode() if options.api_key is not None else None

    def _trace(self, spec: str | None) -> Any:
        if spec is None:
            return None
        from zipmoe.runtime.routing import parse_routing

        args = self.engine.args
        layers = sum(args.sparse_layers)
        trace = parse_routing(
            spec, num_layers=layers, num_experts=args.n_experts, top_k=args.top_k, requests=TRACE_REQUESTS,
            tokens_per_request=min(self.context, TRACE_TOKENS),
        )  # fmt: skip
        return trace.for_model(layers, args.n_experts, args.top_k)

    # -- the frame of every endpoint ----------------------------------------------------------------------------------

    def guard(
        self, handler: Callable[[Request], Awaitable[Response]], endpoint: str, *, auth: bool = True
    ) -> Callable[[Request], Awaitable[Response]]:
        """``handler`` behind the API key check, with its errors turned into OpenAI error responses and every answer
        counted in the metrics under ``endpoint``."""

        async def endpoint_function(request: Request) -> Response:
            try:
                if auth and not self._authorized(request):
                    raise APIError(
                        "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'",
                        status=401, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
                    )  # fmt: skip
                response = await handler(request)
            except APIError as exc:
                response = _error_response(exc)
            except ClientDisconnect:
                response = Response(status_code=CLIENT_CLOSED)
            except Exception as exc:  # a bug: answered, logged with its traceback, and the server goes on
                log.exception("internal error answering %s", endpoint)
                response = _error_response(
                    APIError(f"internal error ({type(exc).__name__})", status=500, type=SERVER_ERROR,
                             code="internal_error")
                )  # fmt: skip
            self.metrics_counters.request(endpoint, response.status_code)
            return response

        return endpoint_function

    def _authorized(self, request: Request) -> bool:
        if self._key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compared in constant time whatever the scheme, so the time taken tells nothing about the key
        matches = hmac.compare_digest(token.strip().encode("utf-8", "replace"), self._key)
        return matches and scheme.lower() == "bearer"

    # -- endpoints ----------------------------------------------------------------------------------------------------

    async def health(self, request: Request) -> Response:
        if not self.worker.alive:
            return JSONResponse({"status": "error", "message": "the model's scheduler is not running"}, 503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        scheduler = self.worker.scheduler
        families = self.metrics_counters.families() + engine_families(self.engine, scheduler)
        return Response(exposition(families), media_type=metrics_text.CONTENT_TYPE)

    def _model_card(self) -> dict[str, Any]:
        return {
            "id": self.options.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "zipmoe",
            "max_model_len": self.context,
        }

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        if name != self.options.model_name:
            raise APIError(f"The model {name!r} does not exist", status=404, param="model", code="model_not_found")
        return JSONResponse(self._model_card())

    async def completions(self, request: Request) -> Response:
        body = parse_body(await self._read_body(request))
        return await self._generate(request, parse_completion(body))

    async def chat(self, request: Request) -> Response:
        body = parse_body(await self._read_body(request))
        return await self._generate(request, parse_chat(body))

    # -- generation ---------------------------------------------------------------------------------------------------

    async def _read_body(self, request: Request) -> bytes:
        """The body, at most ``max_body_bytes`` (413 beyond, after draining a bounded excess)."""
        limit = self.options.max_body_bytes
        too_large = APIError(f"The request body is larger than {limit:,} bytes", status=413, code="request_too_large")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit * DRAIN_FACTOR:
            raise too_large
        body = bytearray()
        seen = 0
        async for chunk in request.stream():
            seen += len(chunk)
            if seen <= limit:
                body += chunk
            elif seen > limit * DRAIN_FACTOR:
                raise too_large
        if seen > limit:
            raise too_large
        return bytes(body)

    async def _generate(self, request: Request, req: GenerationRequest) -> Response:
        prompt = await run_in_threadpool(self._encode, req)
        max_new = self._max_new_tokens(req, len(prompt))
        sampling = self._sampling(req, max_new)
        try:
            generation = self.worker.submit(prompt, sampling, req.stop)
        except PromptError as exc:
            raise RequestError(str(exc), param=req.prompt_param) from None
        except QueueFullError:
            self.metrics_counters.refuse()
            raise APIError(
                f"The server is busy ({self.options.max_queue} requests waiting); retry later",
                status=503, type=OVERLOADED, code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
            ) from None  # fmt: skip
        self.metrics_counters.prompt(len(prompt))
        reply = _Reply(self.options.model_name, req, len(prompt))
        if req.stream:
            return _EventStream(self._events(generation, reply), on_close=generation.cancel)
        try:
            text = await self._collect(request, generation)
        finally:
            generation.cancel()  # a no-op once finished; a cancelled handler must not leave its sequence running
        if text is None:
            return Response(status_code=CLIENT_CLOSED)
        return JSONResponse(reply.whole(text, generation))

    def _encode(self, req: GenerationRequest) -> list[int]:
        """The prompt's token ids: the text through the tokenizer, the messages through the chat template."""
        from zipmoe.runtime.tokenizer import TokenizerError

        param = req.prompt_param
        try:
            if req.chat:
                ids = self.engine.encode_chat([dict(m) for m in req.messages])
            elif isinstance(req.prompt, str):
                ids = self.tokenizer.encode(req.prompt)
            else:
                ids = list(req.prompt or ())
                vocab = self.engine.args.vocab_size
                bad = next((i for i in ids if i >= vocab), None)
                if bad is not None:
                    raise RequestError(
                        f"prompt holds token id {bad}, outside the model's vocabulary of {vocab}", param=param
                    )
        except (TokenizerError, PromptError) as exc:
            raise RequestError(f"{param}: {exc}", param=param) from None
        if not ids:
            raise RequestError(f"the {param} gave no tokens", param=param)
        return ids

    def _max_new_tokens(self, req: GenerationRequest, prompt_tokens: int) -> int:
        """``max_tokens``, or what the context leaves after the prompt; 400 when they do not fit together."""
        if req.max_tokens is None:
            if prompt_tokens >= self.context:
                raise context_error(self.context, prompt_tokens, 1, req.prompt_param)
            return self.context - prompt_tokens
        if prompt_tokens + req.max_tokens > self.context:
            raise context_error(self.context, prompt_tokens, req.max_tokens, req.prompt_param)
        return req.max_tokens

    def _sampling(self, req: GenerationRequest, max_new_tokens: int) -> Any:
        fields = dict(req.sampling)
        if "seed" not in fields:  # as the OpenAI API: without a seed, sampling differs from one request to the next
            fields["seed"] = secrets.randbelow(MAX_SEED + 1)
        try:
            return self.engine.default_sampling(max_new_tokens=max_new_tokens, stop_at_eos=not req.ignore_eos, **fields)
        except SamplingError as exc:  # the parameters were checked one by one; together they are refused here
            raise RequestError(str(exc)) from None

    async def _collect(self, request: Request, generation: Generation) -> str | None:
        """The whole text of a non-streaming request, or None when its client went away (then it is cancelled)."""
        pieces: list[str] = []
        poll = self.options.disconnect_poll_seconds
        checked = time.monotonic()
        while not generation.finished:
            event = await generation.next_event(poll)
            if event is not None and event[0] == "text":
                pieces.append(event[1])
            if time.monotonic() - checked >= poll:  # every ``poll`` seconds, tokens arriving or not
                if await request.is_disconnected():
                    generation.cancel()
                    return None
                checked = time.monotonic()
        return "".join(pieces)

    async def _events(self, generation: Generation, reply: _Reply) -> AsyncIterator[str]:
        """The server-sent events of a streaming request; an error after the first event is an error event."""
        try:
            if reply.req.chat:  # the role comes first, as OpenAI sends it
                yield _event(reply.first_chunk())
            async for text in generation.texts(self.options.disconnect_poll_seconds):
                yield _event(reply.chunk(text))
            yield _event(reply.chunk(None, generation.finish_reason))
            if reply.req.include_usage:
                yield _event(reply.usage_chunk(generation))
        except APIError as exc:
            yield _event(exc.body())
        yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """A server-sent event stream that calls ``on_close`` however it ends: finished, failed, or its client gone
    (Starlette then cancels the stream, possibly before the generator has even started)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


class _Reply:
    """The response bodies of one request, in the OpenAI API's shapes (completion or chat, whole or chunks)."""

    def __init__(self, model: str, req: GenerationRequest, prompt_tokens: int) -> None:
        self.model = model
        self.req = req
        self.prompt_tokens = prompt_tokens
        self.id = ("chatcmpl-" if req.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if req.chat else "text_completion"

    def usage(self, generation: Generation) -> dict[str, int]:
        completion = len(getattr(generation.result, "tokens", ()))
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    def _head(self, object_: str) -> dict[str, Any]:
        return {"id": self.id, "object": object_, "created": self.created, "model": self.model}

    def whole(self, text: str, generation: Generation) -> dict[str, Any]:
        if self.req.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": generation.finish_reason}  # fmt: skip
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": generation.finish_reason}
        return {**self._head(self.object), "choices": [choice], "usage": self.usage(generation)}

    def _chunk(self, choice: dict[str, Any]) -> dict[str, Any]:
        object_ = "chat.completion.chunk" if self.req.chat else "text_completion"
        body = {**self._head(object_), "choices": [choice]}
        if self.req.include_usage:
            body["usage"] = None  # as OpenAI: null in every chunk but the last
        return body

    def first_chunk(self) -> dict[str, Any]:
        """A chat stream's first chunk: a delta with the role."""
        return self.chunk("", None, role=True)

    def chunk(self, text: str | None, finish_reason: str | None = None, *, role: bool = False) -> dict[str, Any]:
        if self.req.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            return self._chunk({"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason})
        return self._chunk({"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason})

    def usage_chunk(self, generation: Generation) -> dict[str, Any]:
        object_ = "chat.completion.chunk" if self.req.chat else "text_completion"
        return {**self._head(object_), "choices": [], "usage": self.usage(generation)}


def _event(doc: dict[str, Any]) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"


def _error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers or None)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (an unknown path 404, a wrong method 405) in the OpenAI error shape."""
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", "") or ""
    if status == 404:
        message = f"Not found: {request.method} {request.url.path!r}"
    elif status == 405:
        message = f"Method {request.method} is not allowed for {request.url.path!r}"
    else:
        message = str(detail)
    headers = getattr(exc, "headers", None)
    return JSONResponse(
        error_body(message, type=INVALID_REQUEST, code="not_found" if status == 404 else None),
        status_code=status,
        headers=headers,
    )
