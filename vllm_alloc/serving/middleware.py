"""HTTP side of per-request budgets: the ASGI middleware.

`ActivationBudgetMiddleware` runs in every vLLM API-server process (`--middleware
vllm_alloc.serving.middleware.ActivationBudgetMiddleware`). On POST to the text-generation endpoints
(BUDGET_PATHS)
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

Budget aliases (`budget_aliases` in the settings, `vllm-alloc serve --budget-aliases 0.75,0.5`): at
start-up (the ASGI lifespan) the middleware adds NAME@0.75 and NAME@0.5 to the model names vLLM serves
(NAME: the first served name), so /v1/models lists them and every route accepts them. A request to
NAME@b on a route in BUDGET_PATHS runs at b; a header or body budget that disagrees is refused with 400.
On the routes in UNBUDGETED_GENERATION, which generate but pass no budget on, a request naming an alias is
refused with 400 rather than run at another budget.

The admin route (ADMIN_PATH, `vllm_alloc.serving.admin`) is answered here too.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from vllm_alloc import metrics
from vllm_alloc.integration.config import PluginConfig, Settings, alias_names, config_from_vllm_config
from vllm_alloc.serving import admin
from vllm_alloc.serving.admin import ADMIN_PATH
from vllm_alloc.serving.asgi import (
    MESSAGES_PATH,
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    header_values,
    logger,
    read_body,
    replay,
    send_error,
)
from vllm_alloc.values import BUDGET_KEY, BudgetError, cache_salt, format_budget, parse_budget, valid_range

BUDGET_HEADER = "X-Activation-Budget"
APPLIED_HEADER = "X-Activation-Budget-Applied"
INVOCATIONS_PATH = "/invocations"  # SageMaker: generation or pooling, by the body (module docstring)
BUDGET_PATHS = frozenset(
    {"/v1/chat/completions", "/v1/completions", "/v1/responses", MESSAGES_PATH, INVOCATIONS_PATH}
)
# Routes where vLLM 0.32 generates but passes no budget on (module docstring): a budget alias is refused.
UNBUDGETED_GENERATION = frozenset(
    {
        "/v1/chat/completions/batch",
        "/inference/v1/generate",
        "/generative_scoring",
        "/cohere/v2/chat",
        "/v1/audio/transcriptions",  # form data (multipart): the model is a form field
        "/v1/audio/translations",
    }
)
# The keys vLLM's ChatCompletionRequest / CompletionRequest need, the types /invocations tries first.
_GENERATION_KEYS = ("messages", "prompt", "prompt_embeds")
# A budget header, repeated or folded into one list (RFC 9110 §5.3), is refused past this size before it
# is split or decoded: room for several copies of the longest budget text.
_MAX_HEADER_BYTES = 256


class BudgetRequestError(Exception):
    """A request the middleware answers itself with HTTP 400."""


class ActivationBudgetMiddleware:
    """Pure ASGI middleware (not BaseHTTPMiddleware: it must rewrite the body and still pass
    `http.disconnect` through, so vLLM aborts generation when a streaming client goes away)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._settings: Settings | None = None
        self.config = PluginConfig()  # as configured; the admin route changes it
        self.top_k: int | None = None
        self.aliases: dict[str, float] = {}  # model name NAME@b -> b

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, self._starting(scope, send))
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == ADMIN_PATH:
            await admin.handle(self, scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if scope["path"] not in BUDGET_PATHS:
            await self._other_post(scope, receive, send)
            return
        body, disconnected = await read_body(receive)
        if disconnected:
            return  # the client left before sending its request; nothing to answer
        settings = self.settings(scope)
        try:
            new_body, budget = rewrite_body(
                header_values(scope, BUDGET_HEADER), body, settings, scope["path"], self.aliases
            )
        except BudgetRequestError as e:
            await _send_400(send, str(e), scope["path"])
            return

        replayed = replay(new_body, receive)
        if budget is None:  # not a JSON object, or not generation: vLLM answers it as without the plugin
            await self.app(scope, replayed, send)
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

        await self.app(scope, replayed, send_with_budget)

    async def _other_post(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A POST outside BUDGET_PATHS: refuse a budget header, and a budget alias where vLLM generates."""
        if header_values(scope, BUDGET_HEADER):
            # A route that would ignore the header: say so rather than serve at the wrong budget.
            await _send_400(
                send,
                f"{BUDGET_HEADER} is not applied on {scope['path']}; activation budgets apply on "
                f"{', '.join(sorted(BUDGET_PATHS))}. Send this request without the header",
                scope["path"],
            )
            return
        self.settings(scope)  # resolves the aliases on a server whose lifespan did not run
        if scope["path"] not in UNBUDGETED_GENERATION or not self.aliases:
            await self.app(scope, receive, send)
            return
        body, disconnected = await read_body(receive)
        if disconnected:
            return
        model = _request_model(body, next(iter(header_values(scope, "content-type")), b""))
        if model in self.aliases:
            await _send_400(
                send,
                f"model {model!r} is a budget alias (b = {format_budget(self.aliases[model])}), and "
                f"{scope['path']} cannot apply a budget; budget aliases apply on "
                f"{', '.join(sorted(BUDGET_PATHS))}. Name the model {self.base_name(model)!r} here",
                scope["path"],
            )
            return
        await self.app(scope, replay(body, receive), send)

    def _starting(self, scope: Scope, send: Send) -> Send:
        """`send` for the lifespan: once vLLM has started, resolve the settings and serve the aliases."""

        async def send_startup(message: Message) -> None:
            if message["type"] == "lifespan.startup.complete":
                try:
                    self.settings(scope, strict=True)
                except Exception as e:  # settings the server cannot serve: vLLM stops with this message
                    message = {"type": "lifespan.startup.failed", "message": f"vllm-alloc: {e}"}
            await send(message)

        return send_startup

    def settings(self, scope: Scope, strict: bool = False) -> Settings:
        """Resolved once, at start-up (or on the first request where no lifespan runs): vLLM builds the
        middleware before the engine config exists, but by then the app state holds it
        (`app.state.vllm_config`). Also serves the budget aliases (`serve_aliases`). `strict` (start-up):
        a bad setting raises; otherwise it is logged and the server accepts (0, 1]."""
        if self._settings is None:
            state = getattr(scope.get("app"), "state", None)
            vllm_config = getattr(state, "vllm_config", None)
            try:
                self.config, self.top_k = config_from_vllm_config(vllm_config)
                settings = self.config.resolve(top_k=self.top_k)
            except Exception as e:  # a bad config stops the engine at start-up; never fail requests on it
                if strict:
                    raise
                logger().warning("vllm-alloc: cannot resolve budget settings (%s); accepting (0, 1]", e)
                self.config = PluginConfig()
                settings = self.config.resolve()  # no file, model unknown: (0, 1], default 1.0
            self.aliases = serve_aliases(state, settings)
            self._settings = settings
            if state is not None:  # a served app: export what it serves
                metrics.set_serving(settings)
        return self._settings

    def use(self, config: PluginConfig, settings: Settings) -> None:
        """Serve from now on with these settings (the admin route, after every worker took them)."""
        self.config, self._settings = config, settings

    def base_name(self, alias: str) -> str:
        return alias[: alias.rindex("@")]


def serve_aliases(state: Any, settings: Settings) -> dict[str, float]:
    """{NAME@b: b} for the settings' aliases of the first served model name NAME, each added to the
    names vLLM serves (`openai_serving_models.base_model_paths`, which /v1/models lists and every route
    checks a request's model against) unless the server already serves it (`--served-model-name`)."""
    models = getattr(state, "openai_serving_models", None)
    paths = getattr(models, "base_model_paths", None)
    if not settings.aliases or not paths:
        return {}
    base = paths[0]
    aliases = alias_names(base.name, settings.aliases)
    served = {p.name for p in paths}
    for name in aliases:
        if name not in served:
            paths.append(type(base)(name=name, model_path=base.model_path))
    logger().info(
        "vllm-alloc: serving budget aliases %s", ", ".join(f"{n} (b = {b!r})" for n, b in aliases.items())
    )
    return aliases


def rewrite_body(
    header_values: list[bytes],
    body: bytes,
    settings: Settings,
    path: str,
    aliases: Mapping[str, float] | None = None,
) -> tuple[bytes, float | None]:
    """(new body, applied b) for one request to `path`, given the values of its budget header(s) and the
    budget aliases served ({model name: b}); (body, None) when the body is not a JSON object, or is an
    /invocations body vLLM does not generate for and that names no budget.

    BudgetRequestError (HTTP 400) for an invalid header or body budget, when header, body and the model's
    alias name different budgets, or when a budget comes with an /invocations body that is not a
    generation request.
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
    model = data.get("model")
    from_alias = (aliases or {}).get(model) if isinstance(model, str) else None
    if path == INVOCATIONS_PATH and not any(key in data for key in _GENERATION_KEYS):
        if from_header is None and from_body is None and from_alias is None:
            return body, None  # a pooling request: no budget applies, and none was asked for
        raise BudgetRequestError(
            f"an activation budget applies only to text generation; this {INVOCATIONS_PATH} body has none "
            f"of the keys {', '.join(_GENERATION_KEYS)}, so vLLM serves it with a pooling handler, which "
            f"would ignore the budget. Send it without {BUDGET_HEADER} and vllm_xargs.{BUDGET_KEY}, "
            "and with a model name that is not a budget alias"
        )
    if from_alias is not None:
        for source, b in ((f"{BUDGET_HEADER} header", from_header), (f"vllm_xargs.{BUDGET_KEY}", from_body)):
            if b is not None and b != from_alias:
                raise BudgetRequestError(
                    f"model {model!r} is a budget alias (b = {format_budget(from_alias)}), and the {source} "
                    f"({format_budget(b)}) disagrees; send one of them, or the same budget"
                )
        from_header = from_alias
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


def _parse(raw: Any, min_budget: float | None, source: str) -> float:
    try:
        return parse_budget(raw, min_budget=min_budget, source=source)
    except BudgetError as e:
        raise BudgetRequestError(str(e)) from None


def _request_model(body: bytes, content_type: bytes) -> Any:
    """The `model` of a JSON object body, or the `model` field of a multipart form; None otherwise."""
    if content_type.lower().startswith(b"multipart/form-data"):
        from email import message_from_bytes, policy

        form = message_from_bytes(b"Content-Type: " + content_type + b"\r\n\r\n" + body, policy=policy.HTTP)
        for part in form.iter_parts() if form.is_multipart() else ():
            if part.get_param("name", header="content-disposition") == "model":
                payload = part.get_payload(decode=True)
                return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else None
        return None
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data.get("model") if isinstance(data, dict) else None


async def _send_400(send: Send, message: str, path: str) -> None:
    await send_error(send, 400, message, path)
