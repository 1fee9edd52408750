"""HTTP side of per-request budgets: the ASGI middleware, and the `vllm-alloc serve` subcommand.

`ActivationBudgetMiddleware` runs in every vLLM API-server process (`--middleware
vllm_alloc.server.ActivationBudgetMiddleware`). On POST to the text-generation endpoints (BUDGET_PATHS)
it reads the `X-Activation-Budget` header and the body's `vllm_xargs.activation_budget`, refuses invalid
values with HTTP 400 (vLLM's error JSON, naming the valid range), writes the applied budget b into
`vllm_xargs` as a float (the server default when the request names none), salts the prefix cache per
budget, and echoes b in the `X-Activation-Budget-Applied` response header. From there vLLM carries b as
`SamplingParams.extra_args` to the worker (DESIGN.md §3).

No route in BUDGET_PATHS ignores a budget silently: each hands `vllm_xargs` (and `cache_salt`) to the
request vLLM 0.32 builds SamplingParams from, or refuses the budget:
  /v1/chat/completions, /v1/completions, /v1/responses  their own request models
  /v1/messages    AnthropicMessagesRequest.vllm_xargs and .cache_salt, copied into the
                  ChatCompletionRequest it runs (vllm/entrypoints/anthropic/serving.py,
                  _build_base_request); 400s use vLLM's Anthropic error shape there
  /invocations    SageMaker: vLLM tries ChatCompletionRequest, then CompletionRequest, then the pooling
                  requests (vllm/entrypoints/serve/sagemaker/api_router.py, invocations;
                  generate/factories.py). A body with `messages`, `prompt` or `prompt_embeds` is a
                  generation request and gets a budget; any other goes to a pooling handler, where a
                  budget would be ignored, so one that carries a budget is refused with 400.
On every other POST route (vLLM 0.32 also generates on /v1/chat/completions/batch, /inference/v1/generate,
/generative_scoring and /cohere/v2/chat) a budget header is refused with 400, since nothing there would
apply it. A `vllm_xargs` budget in such a body still reaches SamplingParams where vLLM passes
`vllm_xargs` on, and the engine then applies it and salts the prefix cache
(`integration/requests_check.py`).

The launcher (`vllm-alloc serve`) lives in `vllm_alloc.launch`; this module only exposes its parser,
so `cli.py` finds every subcommand by the module named in DESIGN.md.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from hashlib import sha256
from typing import Any

from vllm_alloc.integration.config import PluginConfig, Settings, resolve_settings
from vllm_alloc.requests import BUDGET_KEY, BudgetError, parse_budget, valid_range

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

BUDGET_HEADER = "X-Activation-Budget"
APPLIED_HEADER = "X-Activation-Budget-Applied"
MESSAGES_PATH = "/v1/messages"  # Anthropic Messages API
INVOCATIONS_PATH = "/invocations"  # SageMaker: generation or pooling, by the body (module docstring)
BUDGET_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", MESSAGES_PATH, INVOCATIONS_PATH}
)
# The keys vLLM's ChatCompletionRequest / CompletionRequest need, the types /invocations tries first.
_GENERATION_KEYS = ("messages", "prompt", "prompt_embeds")
# A budget header, repeated or folded into one list (RFC 9110 §5.3), is refused past this size before it
# is split or decoded: room for several copies of the longest budget text.
_MAX_HEADER_BYTES = 256

# vLLM refuses cache salts longer than this or containing these characters (validate_cache_salt).
_MAX_CACHE_SALT = 128
_SALT_PREFIX = "activation_budget="


def settings_from_vllm_config(vllm_config: Any) -> Settings:
    """The budget settings the worker will use, resolved from the API server's VllmConfig by the same
    code (`vllm_alloc.integration.config`); without a budget file the minimum is 1/K, K the model's
    top-k (the uniform allocation at K_base = 1)."""
    model_config = getattr(vllm_config, "model_config", None)
    hf_config = getattr(model_config, "hf_text_config", None) or getattr(model_config, "hf_config", None)
    return resolve_settings(getattr(vllm_config, "additional_config", None), top_k=model_top_k(hf_config))


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
        self._settings: Settings | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if scope["path"] not in BUDGET_PATHS:
            if _header_values(scope):
                # A route that would ignore the header: say so rather than serve at the wrong budget.
                await _send_400(
                    send,
                    f"{BUDGET_HEADER} is not applied on {scope['path']}; activation budgets apply on "
                    f"{', '.join(sorted(BUDGET_PATHS))}. Send this request without the header",
                    scope["path"],
                )
                return
            await self.app(scope, receive, send)
            return
        body, disconnected = await _read_body(receive)
        if disconnected:
            return  # the client left before sending its request; nothing to answer
        settings = self.settings(scope)
        try:
            new_body, budget = rewrite_body(_header_values(scope), body, settings, scope["path"])
        except BudgetRequestError as e:
            await _send_400(send, str(e), scope["path"])
            return

        sent = False

        async def replay() -> Message:
            # First the (rewritten) body, then the real channel: http.disconnect must reach vLLM.
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": new_body, "more_body": False}
            return await receive()

        if budget is None:  # not a JSON object, or not generation: vLLM answers it as without the plugin
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

    def settings(self, scope: Scope) -> Settings:
        """Resolved once, on the first request: vLLM builds the middleware before the engine config
        exists, but by the first request the app state holds it (`app.state.vllm_config`)."""
        if self._settings is None:
            vllm_config = getattr(getattr(scope.get("app"), "state", None), "vllm_config", None)
            try:
                self._settings = settings_from_vllm_config(vllm_config)
            except Exception as e:  # a bad config stops the engine at start-up; never fail requests on it
                _logger().warning("vllm-alloc: cannot resolve budget settings (%s); accepting (0, 1]", e)
                self._settings = PluginConfig().resolve()  # no file, model unknown: (0, 1], default 1.0
        return self._settings


def rewrite_body(
    header_values: list[bytes], body: bytes, settings: Settings, path: str
) -> tuple[bytes, float | None]:
    """(new body, applied b) for one request to `path`, given the values of its budget header(s);
    (body, None) when the body is not a JSON object, or is an /invocations body vLLM does not generate
    for and that names no budget.

    BudgetRequestError (HTTP 400) for an invalid header or body budget, when both are given and differ,
    or when a budget comes with an /invocations body that is not a generation request.
    """
    lo = settings.min_budget
    from_header = header_budget(header_values, lo)
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
    if path == INVOCATIONS_PATH and not any(key in data for key in _GENERATION_KEYS):
        if from_header is None and from_body is None:
            return body, None  # a pooling request: no budget applies, and none was asked for
        raise BudgetRequestError(
            f"an activation budget applies only to text generation; this {INVOCATIONS_PATH} body has none "
            f"of the keys {', '.join(_GENERATION_KEYS)}, so vLLM serves it with a pooling handler, which "
            f"would ignore the budget. Send it without {BUDGET_HEADER} and vllm_xargs.{BUDGET_KEY}"
        )
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


def header_budget(values: list[bytes], min_budget: float | None) -> float | None:
    """b from the values of every X-Activation-Budget header of a request; None when there is none.

    A proxy may fold repeated headers into one comma-separated list (RFC 9110 §5.3), so `0.5, 0.5` and
    two headers of 0.5 are the same request: every element must be a valid budget and all must be equal
    as numbers (`0.5, 0.50` is fine), else 400 naming the values. Empty elements are skipped, as RFC 9110
    §5.6.1 asks of list headers.
    """
    if not values:
        return None
    size = sum(len(v) for v in values) + len(values) - 1  # as one folded header
    if size > _MAX_HEADER_BYTES:  # checked before splitting, so a megabyte header costs nothing
        raise BudgetRequestError(
            f"{BUDGET_HEADER} header is {size} bytes long (at most {_MAX_HEADER_BYTES}); "
            f"expected {valid_range(min_budget)}"
        )
    items = [item for v in values for item in (part.strip() for part in v.split(b",")) if item]
    # Nothing but commas and spaces: one empty value, refused as not a number.
    distinct = sorted({_parse(item, min_budget, f"{BUDGET_HEADER} header") for item in items or [b""]})
    if len(distinct) > 1:
        raise BudgetRequestError(
            f"{BUDGET_HEADER} header has different values ({', '.join(map(format_budget, distinct))}), "
            f"sent as repeated or comma-separated headers; send one value, {valid_range(min_budget)}"
        )
    return distinct[0]


def cache_salt(client_salt: Any, budget: float) -> Any:
    """The request's cache_salt under budget b: prefix-cache KV computed at one budget must never serve
    another (the experts that produced it differ). b = 1.0 keeps the client's salt (or none), so
    full-budget requests share the stock namespace. A malformed client salt is returned unchanged for
    vLLM to refuse with its own message. Idempotent: a salt this already made for b comes back as it is
    (the middleware salts first, then the engine's front end salts every request, whatever its route)."""
    if budget == 1.0 or (client_salt is not None and not (isinstance(client_salt, str) and client_salt)):
        return client_salt
    ours = f"{_SALT_PREFIX}{format_budget(budget)}"
    if client_salt is None:
        return ours
    if f"{client_salt};".startswith(f"{ours};"):
        return client_salt
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


def _header_values(scope: Scope) -> list[bytes]:
    name = BUDGET_HEADER.lower().encode()
    return [v for k, v in scope["headers"] if k.lower() == name]


async def _read_body(receive: Receive) -> tuple[bytes, bool]:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"", True
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), False


async def _send_400(send: Send, message: str, path: str) -> None:
    # The shape of vLLM's own errors on that route, so clients (openai.BadRequestError,
    # anthropic.BadRequestError) read it like vLLM's: ErrorResponse, or on /v1/messages the
    # AnthropicErrorResponse vLLM translates it into (anthropic/api_router.py, translate_error_response).
    error: dict[str, Any]
    if path == MESSAGES_PATH:
        error = {"type": "error", "error": {"type": "BadRequestError", "message": message}}
    else:
        error = {"error": {"message": message, "type": "BadRequestError", "param": BUDGET_KEY, "code": 400}}
    payload = json.dumps(error).encode()
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
