"""HTTP side of per-request budgets: the ASGI middleware.

`ActivationBudgetMiddleware` runs in every vLLM API-server process (`--middleware
vllm_alloc.serving.middleware.ActivationBudgetMiddleware`). On POST to the routes in BUDGET_PATHS it reads
the `X-Activation-Budget` header and the body's budget (`vllm_xargs.activation_budget`, or wherever the
route's request model carries it), refuses invalid values with HTTP 400 (vLLM's error JSON, naming the
field and the valid range), writes the applied budget b into the body as a float (the server default when
the request names none), salts the prefix cache per budget, and echoes b in the
`X-Activation-Budget-Applied` response header. From there vLLM carries b as `SamplingParams.extra_args` to
the worker (DESIGN.md §3).

No route in BUDGET_PATHS ignores a budget silently: each hands the budget (and `cache_salt`) to the
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
  /v1/chat/completions/batch  BatchChatCompletionRequest declares no vllm_xargs, but keeps unknown
                  fields (OpenAIBaseModel, extra="allow"), and to_chat_completion_request copies them
                  into each conversation's ChatCompletionRequest (openai/chat_completion/protocol.py),
                  whose to_sampling_params passes vllm_xargs on; cache_salt is a field of its own.
  /inference/v1/generate  GenerateRequest holds the SamplingParams itself: the budget goes in
                  `sampling_params.extra_args.activation_budget` (scale_out/token_in_token_out/
                  protocol.py), next to its own cache_salt. GenerateRequest drops unknown fields, so a
                  top-level `vllm_xargs` budget would be ignored there: refused with 400.
On /generative_scoring and /cohere/v2/chat (_XARGS_DROPPED) vLLM builds SamplingParams without vllm_xargs
(generate/generative_scoring/serving.py, create_generative_scoring; cohere/serving.py,
_build_base_chat_completion), so a budget there, header or body, is refused with 400: a valid one because
nothing would apply it, an invalid one with its range, as on the budget routes. On every other POST route
a budget header is refused the same way. The audio routes (/v1/audio/transcriptions, /translations,
_FORM_XARGS) take `vllm_xargs` as a multipart form field (JSON text) and pass it on: a budget there is
checked as on the budget routes (400 with the range), and a valid one passes untouched and is echoed;
the engine applies it and salts the prefix cache (`integration/requests_check.py`).

Budget aliases (`budget_aliases` in the settings, `vllm-alloc serve --budget-aliases 0.75,0.5`): at
start-up (the ASGI lifespan) the middleware adds NAME@0.75 and NAME@0.5 to the model names vLLM serves
(NAME: the first served name), so /v1/models lists them and every route accepts them. A request to
NAME@b on a route in BUDGET_PATHS runs at b; a header or body budget that disagrees is refused with 400.
On the routes in UNBUDGETED_GENERATION, which generate but pass no budget on, a request naming an alias is
refused with 400 rather than run at another budget.

The admin route (ADMIN_PATH, `vllm_alloc.serving.admin`) is answered here too.
"""

from __future__ import annotations

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
from vllm_alloc.serving.request_budget import (
    BUDGET_HEADER,
    GENERATE_PATH,
    INVOCATIONS_PATH,
    BudgetRequestError,
    form_budget,
    form_fields,
    header_budget,
    json_object,
    refuse_dropped_budget,
    rewrite_body,
)
from vllm_alloc.values import format_budget

APPLIED_HEADER = "X-Activation-Budget-Applied"
BUDGET_PATHS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/chat/completions/batch",
        MESSAGES_PATH,
        INVOCATIONS_PATH,
        GENERATE_PATH,
    }
)
# Routes where vLLM 0.32 generates but drops `vllm_xargs` (module docstring): a body budget is refused.
_XARGS_DROPPED = frozenset({"/generative_scoring", "/cohere/v2/chat"})
# Routes where vLLM 0.32 generates but passes no budget on (module docstring): a budget alias is refused.
# Audio routes take a multipart form: vLLM parses its `vllm_xargs` field (JSON text) and passes it on.
_FORM_XARGS = frozenset({"/v1/audio/transcriptions", "/v1/audio/translations"})
UNBUDGETED_GENERATION = _XARGS_DROPPED | _FORM_XARGS


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
        await self.app(scope, replayed, _echoing(send, budget))

    async def _other_post(self, scope: Scope, receive: Receive, send: Send) -> None:
        """A POST outside BUDGET_PATHS: refuse a budget header, and where vLLM generates, a budget alias
        and a body budget vLLM would drop."""
        path = scope["path"]
        settings = self.settings(scope)  # also resolves the aliases on a server whose lifespan did not run
        values = header_values(scope, BUDGET_HEADER)
        try:
            if values:
                header_budget(values, settings.min_budget)  # an invalid one is refused with its range
                # A route that would ignore the header: say so rather than serve at the wrong budget.
                raise BudgetRequestError(
                    f"{BUDGET_HEADER} is not applied on {path}; activation budgets apply on "
                    f"{', '.join(sorted(BUDGET_PATHS))}. Send this request without the header"
                )
        except BudgetRequestError as e:
            await _send_400(send, str(e), path)
            return
        if path not in UNBUDGETED_GENERATION or not (self.aliases or path in _XARGS_DROPPED | _FORM_XARGS):
            await self.app(scope, receive, send)
            return
        body, disconnected = await read_body(receive)
        if disconnected:
            return
        form = form_fields(
            body, next(iter(header_values(scope, "content-type")), b""), ("model", "vllm_xargs")
        )
        data = json_object(body) if form is None else None
        model = (form if form is not None else data or {}).get("model")
        in_form = None
        try:
            if model in self.aliases:
                raise BudgetRequestError(
                    f"model {model!r} is a budget alias (b = {format_budget(self.aliases[model])}), and "
                    f"{path} cannot apply a budget; budget aliases apply on "
                    f"{', '.join(sorted(BUDGET_PATHS))}. Name the model {self.base_name(model)!r} here"
                )
            if path in _XARGS_DROPPED:
                refuse_dropped_budget(
                    data,
                    settings.min_budget,
                    path,
                    f"activation budgets apply on {', '.join(sorted(BUDGET_PATHS))}. Send this request "
                    "without it",
                )
            if path in _FORM_XARGS:
                in_form = form_budget(form.get("vllm_xargs") if form else None, settings.min_budget)
        except BudgetRequestError as e:
            await _send_400(send, str(e), path)
            return
        # A valid form budget reaches SamplingParams untouched (the engine salts the prefix cache for it,
        # integration/requests_check.py); echo it as on the budget routes.
        await self.app(scope, replay(body, receive), send if in_form is None else _echoing(send, in_form))

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


def _echoing(send: Send, budget: float) -> Send:
    """`send` with the applied budget echoed in the response's headers."""
    applied = format_budget(budget).encode()

    async def send_with_budget(message: Message) -> None:
        if message["type"] == "http.response.start":
            message = dict(message)
            message["headers"] = [*message.get("headers", []), (APPLIED_HEADER.lower().encode(), applied)]
        await send(message)

    return send_with_budget


async def _send_400(send: Send, message: str, path: str) -> None:
    await send_error(send, 400, message, path)
