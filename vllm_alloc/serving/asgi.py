"""ASGI plumbing shared by the middleware and the admin route: types, body reading and replay, headers,
and vLLM-shaped error replies. No budget logic lives here."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from vllm_alloc.values import BUDGET_KEY

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

MESSAGES_PATH = "/v1/messages"  # Anthropic Messages API: its errors have their own shape


def header_values(scope: Scope, header: str) -> list[bytes]:
    """Every value of `header` in the request, in order."""
    name = header.lower().encode()
    return [v for k, v in scope["headers"] if k.lower() == name]


async def read_body(receive: Receive) -> tuple[bytes, bool]:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


def replay(body: bytes, receive: Receive) -> Receive:
    """`receive` that hands over `body` first, then the real channel: http.disconnect must reach vLLM."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def send_error(send: Send, status: int, message: str, path: str, param: str = BUDGET_KEY) -> None:
    # The shape of vLLM's own errors on that route, so clients (openai.BadRequestError,
    # anthropic.BadRequestError) read it like vLLM's: ErrorResponse, or on /v1/messages the
    # AnthropicErrorResponse vLLM translates it into (anthropic/api_router.py, translate_error_response).
    error: dict[str, Any]
    if path == MESSAGES_PATH:
        error = {"type": "error", "error": {"type": _ERROR_TYPES[status], "message": message}}
    else:
        error = {"error": {"message": message, "type": _ERROR_TYPES[status], "param": param, "code": status}}
    await send_json(send, status, error)


_ERROR_TYPES = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
                405: "MethodNotAllowed", 503: "ServiceUnavailableError"}  # fmt: skip


async def send_json(send: Send, status: int, obj: Any) -> None:
    payload = json.dumps(obj).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def logger() -> Any:
    from vllm_alloc.integration import compat

    return compat.logger("vllm_alloc")
