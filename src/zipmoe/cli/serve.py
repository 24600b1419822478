"""``zipmoe serve``: the OpenAI-compatible HTTP server (`zipmoe.server`, Starlette on uvicorn)."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from zipmoe.cli._engine_options import (
    CriticalThresholdOpt,
    DecodedFractionOpt,
    DeviceOpt,
    DtypeOpt,
    IoOpt,
    MemoryBudgetOpt,
    ModeOpt,
    PlanOpt,
    PolicyOpt,
    ScheduleOpt,
    SimulateStorageOpt,
    TiersOpt,
    WarmupOpt,
)
from zipmoe.cli._options import ModelArg, QuietOpt, ThreadsOpt
from zipmoe.cli._output import prepare_codecs, stderr, warn
from zipmoe.errors import ZipmoeError
from zipmoe.runtime.policies import DEFAULT_THRESHOLD

NAME = "serve"
EPILOG = """Examples:

  zipmoe serve qwen-moe.zmoe -m 8GiB                         # http://127.0.0.1:8000/v1

  zipmoe serve Qwen/Qwen1.5-MoE-A2.7B-Chat --port 9000 --max-batch 8 --max-context 4096

  ZIPMOE_API_KEY=secret zipmoe serve model.zmoe --host 0.0.0.0    # every endpoint but /health needs the key

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
    -d '{"model": "m", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 32}'

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (stream: true for server-sent
events), GET /health, GET /metrics (Prometheus). Any OpenAI client works with base_url http://HOST:PORT/v1.
docs/SERVE.md lists the parameters, the errors and the metrics.
"""
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def command(
    container: ModelArg,
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on (0.0.0.0: every interface; set --api-key then).")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on.")] = 8000,
    memory_budget: MemoryBudgetOpt = None,
    max_batch: Annotated[
        int, typer.Option("--max-batch", min=1, max=4096, help="Sequences generated together at most.")
    ] = 16,
    max_queue: Annotated[
        int,
        typer.Option(
            "--max-queue", min=1, max=1_000_000, help="Requests waiting for a place at most; more get HTTP 503."
        ),
    ] = 64,
    max_context: Annotated[
        Optional[int],
        typer.Option(
            "--max-context",
            min=2,
            help="Prompt plus completion tokens at most per request; bounds each KV cache (default: the model's "
            "context).",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        Optional[str],
        typer.Option(
            "--api-key",
            envvar="ZIPMOE_API_KEY",
            help="Require 'Authorization: Bearer KEY' on every endpoint but /health (or set ZIPMOE_API_KEY).",
            show_default=False,
            show_envvar=False,
        ),
    ] = None,
    max_body: Annotated[
        str,
        typer.Option(
            "--max-body", metavar="SIZE", callback=_check_body_size, help="The largest request body (larger: HTTP 413)."
        ),
    ] = "1MiB",
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request (one line each).")] = False,
    tiers: TiersOpt = None,
    decoded_fraction: DecodedFractionOpt = None,
    policy: PolicyOpt = "lfu",
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    threads: ThreadsOpt = None,
    io: IoOpt = "buffered",
    simulate_storage: SimulateStorageOpt = None,
    plan: PlanOpt = None,
    schedule: ScheduleOpt = None,
    mode: ModeOpt = "lossless",
    critical_threshold: CriticalThresholdOpt = DEFAULT_THRESHOLD,
    warmup: WarmupOpt = "pcw",
    routing: Annotated[Optional[str], typer.Option("--routing", hidden=True)] = None,  # benchmarks: replay a trace
    quiet: QuietOpt = False,
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming), batching requests."""
    from zipmoe.extras import RUNTIME, SERVE, require

    require("zipmoe serve", *RUNTIME, *SERVE)
    from zipmoe.cli._engine_options import engine_options
    from zipmoe.cli.models import model_container
    from zipmoe.server.app import ServerOptions
    from zipmoe.sizes import parse_size

    server_options = ServerOptions(
        model_name=container, max_batch=max_batch, max_queue=max_queue, max_context=max_context, api_key=api_key,
        max_body_bytes=parse_size(max_body, flag="--max-body"), routing=routing,
    )  # fmt: skip
    path = model_container(container, quiet=quiet)  # a checkpoint directory or Hub repo: packed into the store once
    options = engine_options(
        device=device, dtype=dtype, memory_budget=memory_budget, tiers=tiers, decoded_fraction=decoded_fraction,
        policy=policy, threads=threads, io=io, simulate_storage=simulate_storage, mode=mode,
        critical_threshold=critical_threshold, warmup=warmup, plan=plan, schedule=schedule,
    )  # fmt: skip
    sock = listen(host, port)  # before the weights load: a port in use fails at once
    try:
        _serve(path, options, server_options, sock, container=container, access_log=access_log, quiet=quiet)
    finally:
        sock.close()


def _serve(path, options, server_options, sock, *, container: str, access_log: bool, quiet: bool) -> None:
    """Load the engine and run uvicorn on ``sock`` until interrupted (Ctrl-C, SIGTERM); then close the engine."""
    import signal

    import uvicorn

    from zipmoe.runtime.engine import Engine
    from zipmoe.server.app import create_app

    prepare_codecs(quiet)
    with Engine(path, options) as engine:
        if engine.storage.warning and not quiet:
            warn(engine.storage.warning)
        app = create_app(engine, server_options)
        host, port = sock.getsockname()[:2]
        if host not in LOCAL_HOSTS and server_options.api_key is None and not quiet:
            warn(f"listening on {host}: the API is open to the network without --api-key")
        shown = f"[{host}]" if ":" in host else host
        stderr.print(f"Serving {container} on http://{shown}:{port} (OpenAI API at /v1)")
        config = uvicorn.Config(
            app, log_level="warning" if quiet else "info", access_log=access_log, timeout_graceful_shutdown=5,
            lifespan="on",
        )  # fmt: skip
        server = uvicorn.Server(config)
        server.run(sockets=[sock])
        # uvicorn raises again the Ctrl-C that stopped it, but asyncio.run drops it when the server's task ends
        # before the cancellation lands: exit as Ctrl-C always does (130) either way.
        if signal.SIGINT in getattr(server, "_captured_signals", ()):
            raise KeyboardInterrupt


def _check_body_size(value: str) -> str:
    from zipmoe.sizes import parse_size

    parse_size(value, flag="--max-body")
    return value


def listen(host: str, port: int) -> Any:
    """A socket bound to ``host:port`` and listening, made before the model loads so that a port in use fails at
    once, in one line.

    Raises:
        ZipmoeError: the address cannot be resolved or bound (in use, not this machine's, a privileged port).
    """
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ZipmoeError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise ZipmoeError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    return sock
