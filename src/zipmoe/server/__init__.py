"""``zipmoe serve``: an OpenAI-compatible HTTP server (Starlette on uvicorn) over one engine; docs/SERVE.md.

`zipmoe.server.app.create_app` builds the application; `zipmoe.server.schemas` validates request bodies (torch-free),
`zipmoe.server.worker` bridges the event loop and the scheduler's thread, `zipmoe.server.metrics` writes
``/metrics``, and `zipmoe.server.openai_errors` shapes every error as the OpenAI API does.
"""
