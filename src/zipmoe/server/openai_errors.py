"""Errors in the OpenAI API's shape: ``{"error": {"message", "type", "param", "code"}}`` with an HTTP status.

Every refusal of the server is an `APIError`: the handlers raise it, and one exception handler (`zipmoe.server.app`)
turns it into the JSON body clients of the OpenAI API parse (the ``openai`` package raises ``BadRequestError``,
``AuthenticationError``... from the status and reads ``message``). Messages are one line and say what was expected
and what was got, as everywhere in zipmoe. Torch-free and Starlette-free.
"""

from __future__ import annotations

from typing import Any

from zipmoe.errors import ZipmoeError

# OpenAI's error types
INVALID_REQUEST = "invalid_request_error"
SERVER_ERROR = "server_error"
OVERLOADED = "server_overloaded"


class APIError(ZipmoeError):
    """A request the server refuses, as the OpenAI API reports it.

    Args:
        message: one line: what is wrong, naming the parameter and the value.
        status: the HTTP status (400 for bad input).
        type: the OpenAI error type (`INVALID_REQUEST` ...).
        param: the request parameter at fault (``temperature``, ``messages``), or None.
        code: a machine-readable code (``context_length_exceeded``), or None.
        headers: extra response headers (``Retry-After``).
    """

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = INVALID_REQUEST,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body of the response."""
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


class RequestError(APIError, ValueError):
    """A request body or parameter the API refuses: HTTP 400 (``invalid_request_error``)."""

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message, param=param, code=code)


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``, as the OpenAI API answers a failed request."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def context_error(context: int, prompt_tokens: int, completion_tokens: int, param: str) -> RequestError:
    """The error of a request that does not fit the context, in OpenAI's words (both numbers, and the split)."""
    return RequestError(
        f"This model's maximum context length is {context} tokens. However, you requested "
        f"{prompt_tokens + completion_tokens} tokens ({prompt_tokens} in the {param}, {completion_tokens} in the "
        "completion). Please reduce the length of the messages or completion.",
        param=param,
        code="context_length_exceeded",
    )
