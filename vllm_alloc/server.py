"""HTTP side of per-request budgets: the ASGI middleware, and the `vllm-alloc serve` subcommand.

`ActivationBudgetMiddleware` runs in every vLLM API-server process (`--middleware
vllm_alloc.server.ActivationBudgetMiddleware`). On POST to the OpenAI generation endpoints it reads the
`X-Activation-Budget` header and the body's `vllm_xargs.activation_budget`, refuses invalid values with
HTTP 400 (vLLM's error JSON, naming the valid range), writes the applied budget b into `vllm_xargs` as a
float (the server default when the request names none), salts the prefix cache per budget, and echoes b
in the `X-Activation-Budget-Applied` response header. From there vLLM carries b as
`SamplingParams.extra_args` to the worker (DESIGN.md §3).

The launcher (`vllm-alloc serve`) lives in `vllm_alloc.launch`; this module only exposes its parser,
so `cli.py` finds every subcommand by the module named in DESIGN.md.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from hashlib import sha256
from typing import Any

from vllm_alloc.requests import BUDGET_KEY, MAX_BUDGET_TEXT, BudgetError, parse_budget, valid_range

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BUDGET_HEADER = "X-Activation-Budget"
APPLIED_HEADER = "X-Activation-Budget-Applied"
BUDGET_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})

# vLLM refuses cache salts longer than this or containing these characters (validate_cache_salt).
_MAX_CACHE_SALT = 128
_SALT_PREFIX = "activation_budget="


@dataclass(frozen=True)
class BudgetSettings:
    """What the middleware needs to know of the served model and the plugin configuration."""

    min_budget: float | None  # the model's smallest valid b (K_base / K); None: unknown, (0, 1]
    default_budget: float  # b of requests that name none


def settings_from_vllm_config(vllm_config: Any) -> BudgetSettings:
    """Resolve the budget settings the worker will use, from the API server's VllmConfig.

    The same precedence as the worker (`AllocState.finalize`): `--additional-config` over VLLM_ALLOC_*
    variables over the budget file's own defaults; no budget file = the uniform allocation at
    K_base = 1, whose minimum is 1/K with K the model's top-k.
    """
    from vllm_alloc.budget import load_budget_file
    from vllm_alloc.integration.config import PluginConfig

    config = PluginConfig.from_additional_config(getattr(vllm_config, "additional_config", None))
    if config.budget_file:
        budget_file = load_budget_file(config.budget_file)
        default = config.default_budget if config.default_budget is not None else budget_file.default_budget
        return BudgetSettings(min_budget=budget_file.min_budget, default_budget=float(default))
    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    K = model_top_k(hf_config)
    default = config.default_budget if config.default_budget is not None else 1.0
    return BudgetSettings(min_budget=1.0 / K if K else None, default_budget=float(default))


def model_top_k(hf_config: Any) -> int | None:
    """K of an HF config object or config.json dict; None when it names none (not an MoE we know)."""
    for name in ("num_experts_per_tok", "moe_topk", "top_k"):
        value = hf_config.get(name) if isinstance(hf_config, dict) else getattr(hf_config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
            return value
    return None


class BudgetRequestError(Exception):
    """A request the middleware answers itself with HTTP 400."""


class ActivationBudgetMiddleware:
    """Pure ASGI middleware (not BaseHTTPMiddleware: it must rewrite the body and still pass
    `http.disconnect` through, so vLLM aborts generation when a streaming client goes away)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._settings: BudgetSettings | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in BUDGET_PATHS:
            await self.app(scope, receive, send)
            return
        body, disconnected = await _read_body(receive)
        if disconnected:
            return  # the client left before sending its request; nothing to answer
        settings = self.settings(scope)
        try:
            new_body, budget = rewrite_body(_header_value(scope), body, settings)
        except BudgetRequestError as e:
            await _send_400(send, str(e))
            return

        sent = False

        async def replay() -> Message:
            # First the (rewritten) body, then the real channel: http.disconnect must reach vLLM.
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": new_body, "more_body": False}
            return await receive()

        if budget is None:  # body not a JSON object: vLLM answers it as it would without the plugin
            await self.app(scope, replay, send)
            return
        scope = dict(scope)
        scope["headers"] = [(k, v) for k, v in scope["headers"] if k != b"content-length"] + [
            (b"content-length", str(len(new_body)).encode())
        ]
        applied = format_budget(budget).encode()

        async def send_with_budget(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", []), (APPLIED_HEADER.lower().encode(), applied)]
            await send(message)

        await self.app(scope, replay, send_with_budget)

    def settings(self, scope: Scope) -> BudgetSettings:
        """Resolved once, on the first request: vLLM builds the middleware before the engine config
        exists, but by the first request the app state holds it (`app.state.vllm_config`)."""
        if self._settings is None:
            vllm_config = getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)
            try:
                self._settings = settings_from_vllm_config(vllm_config)
            except Exception as e:  # a bad config stops the engine at start-up; never fail requests on it
                _logger().warning("vllm-alloc: cannot resolve budget settings (%s); accepting (0, 1]", e)
                self._settings = BudgetSettings(min_budget=None, default_budget=1.0)
        return self._settings


def rewrite_body(header: bytes | None, body: bytes, settings: BudgetSettings) -> tuple[bytes, float | None]:
    """(new body, applied b) for one request; (body, None) when the body is not a JSON object.

    BudgetRequestError (HTTP 400) for an invalid header or body budget, or when both are given and differ.
    """
    lo = settings.min_budget
    from_header = None
    if header is not None:
        # Checked before parsing, so a megabyte header is refused without decoding it.
        if len(header) > MAX_BUDGET_TEXT:
            raise BudgetRequestError(
                f"{BUDGET_HEADER} header is {len(header)} bytes long; expected {valid_range(lo)} "
                f"of at most {MAX_BUDGET_TEXT} characters"
            )
        from_header = _parse(header, lo, f"{BUDGET_HEADER} header")
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("vllm_xargs", {}), dict | None):
        # vLLM's own validation answers malformed requests; a header budget is still checked above.
        return body, None
    xargs = dict(data.get("vllm_xargs") or {})
    raw = xargs.get(BUDGET_KEY)
    from_body = None if raw is None else _parse(raw, lo, f"vllm_xargs.{BUDGET_KEY}")
    if from_header is not None and from_body is not None and from_header != from_body:
        raise BudgetRequestError(
            f"{BUDGET_HEADER} header ({format_budget(from_header)}) and vllm_xargs.{BUDGET_KEY} "
            f"({format_budget(from_body)}) disagree; send one of them, or the same {valid_range(lo)}"
        )
    budget = from_header if from_header is not None else from_body
    if budget is None:
        budget = settings.default_budget
    xargs[BUDGET_KEY] = budget
    data["vllm_xargs"] = xargs
    salt = cache_salt(data.get("cache_salt"), budget)
    if salt is not None:
        data["cache_salt"] = salt
    return json.dumps(data).encode(), budget


def cache_salt(client_salt: Any, budget: float) -> Any:
    """The request's cache_salt under budget b: prefix-cache KV computed at one budget must never serve
    another (the experts that produced it differ). b = 1.0 keeps the client's salt (or none), so
    full-budget requests share the stock namespace. A malformed client salt is returned unchanged for
    vLLM to refuse with its own message."""
    if budget == 1.0 or (client_salt is not None and not (isinstance(client_salt, str) and client_salt)):
        return client_salt
    ours = f"{_SALT_PREFIX}{format_budget(budget)}"
    if client_salt is None:
        return ours
    combined = f"{ours};{client_salt}"
    if len(combined) > _MAX_CACHE_SALT and len(client_salt) <= _MAX_CACHE_SALT:
        # Still one namespace per (client salt, budget), within vLLM's length limit.
        combined = f"{ours};{sha256(client_salt.encode()).hexdigest()}"
    return combined


def format_budget(b: float) -> str:
    """b as echoed and salted: the shortest text that parses back to the same float."""
    return repr(float(b))


def _parse(raw: Any, min_budget: float | None, source: str) -> float:
    try:
        return parse_budget(raw, min_budget=min_budget, source=source)
    except BudgetError as e:
        raise BudgetRequestError(str(e)) from None


def _header_value(scope: Scope) -> bytes | None:
    """The budget header's value; repeated headers that differ are one invalid value (400)."""
    name = BUDGET_HEADER.lower().encode()
    values = {v.strip() for k, v in scope["headers"] if k.lower() == name}
    if len(values) > 1:
        # Joined, so the error says what arrived (and an oversized join is refused as oversized).
        return b",".join(sorted(values))
    return values.pop() if values else None


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


async def _send_400(send: Send, message: str) -> None:
    # The shape of vLLM's ErrorResponse, so clients (openai.BadRequestError) read it like vLLM's own.
    payload = json.dumps(
        {"error": {"message": message, "type": "BadRequestError", "param": BUDGET_KEY, "code": 400}}
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": payload, "more_body": False})


def _logger() -> Any:
    from vllm_alloc.integration import compat

    return compat.logger("vllm_alloc")


def add_parser(subparsers: Any) -> Any:
    """The `serve` subcommand (cli.py dispatch); the launcher itself is in `vllm_alloc.launch`."""
    from vllm_alloc.launch import add_parser as add_serve_parser

    return add_serve_parser(subparsers)
