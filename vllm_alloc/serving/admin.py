"""The admin route: change the server's default budget, reload its budget file or load another, at runtime.

    GET  /vllm-alloc/admin    what the server serves now (default budget, budget file, aliases, ...)
    POST /vllm-alloc/admin    {"default_budget": 0.5} and/or {"budget_file": "path or shipped name"}
                              (the file it serves now, to reload it; null: the uniform allocation)

Off unless the API server has VLLM_ALLOC_ADMIN_KEY (`vllm-alloc serve --admin-key-file FILE` sets it);
then every call must carry `Authorization: Bearer <key>`: 403 without a key configured, 401 with a wrong
one. A change is validated in full before anything changes: the API server reads the file once and
resolves the settings (field errors name the file and field); every worker then checks the same text
against its model (`vllm_alloc_reconfigure(change, apply=False)`), and only when all accept do they take
it (`apply=True`). A refusal is HTTP 400 with the message, and the old settings keep serving. Workers run
the call between forward passes (vLLM's engine core handles it between steps), so no pass mixes two
allocations; requests already accepted keep the budget they were admitted at. The API server then serves
with the new settings (the middleware's defaults and checks, the front end's cache salts). Each change is
logged and counted in /metrics (`vllm_alloc:admin_changes_total{result}`, `vllm_alloc:default_budget`,
`vllm_alloc:budget_file_info{file, sha}`).

One API-server process only: with `--api-server-count` > 1 the others would keep their old defaults, so
the route answers 503 there.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from typing import TYPE_CHECKING, Any

from vllm_alloc import envs, metrics
from vllm_alloc.serving.asgi import (
    Receive,
    Scope,
    Send,
    header_values,
    logger,
    read_body,
    send_error,
    send_json,
)
from vllm_alloc.values import BudgetError, format_budget, parse_budget

if TYPE_CHECKING:
    from vllm_alloc.integration.config import PluginConfig, Settings
    from vllm_alloc.serving.middleware import ActivationBudgetMiddleware

ADMIN_PATH = "/vllm-alloc/admin"
KEYS = ("default_budget", "budget_file")
RPC = "vllm_alloc_reconfigure"
_LOCK = asyncio.Lock()  # one change at a time


async def handle(mw: ActivationBudgetMiddleware, scope: Scope, receive: Receive, send: Send) -> None:
    refusal = _refusal(scope)
    if refusal is not None:
        await send_error(send, *refusal, ADMIN_PATH, param="authorization")
        return
    settings = mw.settings(scope)
    if scope["method"] == "GET":
        await send_json(send, 200, describe(mw, settings))
        return
    if scope["method"] != "POST":
        await send_error(send, 405, f"{ADMIN_PATH} takes GET or POST, not {scope['method']}", ADMIN_PATH)
        return
    state = getattr(scope.get("app"), "state", None)
    if _api_servers(state) > 1:
        await send_error(
            send,
            503,
            f"{ADMIN_PATH} changes one API-server process, and this server runs "
            f"{_api_servers(state)} (--api-server-count); restart it with the new settings instead",
            ADMIN_PATH,
        )
        return
    body, disconnected = await read_body(receive)
    if disconnected:
        return
    async with _LOCK:
        try:
            change = parse_change(body)
            config, new, rpc_change = prepare(mw.config, settings, mw.top_k, change)
            engine = getattr(state, "engine_client", None)
            if engine is None:
                raise AdminError("this server has no engine to reconfigure")
            await _workers(engine, rpc_change, apply=False)
            await _workers(engine, rpc_change, apply=True)
        except (AdminError, ValueError) as e:
            metrics.count_admin_change("refused")
            logger().warning("vllm-alloc: admin change refused: %s", e)
            await send_error(send, 400, str(e), ADMIN_PATH, param="body")
            return
        mw.use(config, new)
        from vllm_alloc.integration.requests_check import use_settings

        use_settings(getattr(engine, "input_processor", None), new)
        metrics.count_admin_change("applied")
        metrics.set_serving(new)
        logger().info(
            "vllm-alloc: admin change applied: default budget %s (was %s), budget file %s (was %s)",
            format_budget(new.default_budget),
            format_budget(settings.default_budget),
            new.source,
            settings.source,
        )
    await send_json(send, 200, describe(mw, new))


class AdminError(ValueError):
    """A change the route refuses (HTTP 400)."""


def parse_change(body: bytes) -> dict[str, Any]:
    """The change a POST asks for: a JSON object with `default_budget` and/or `budget_file`."""
    try:
        change = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        change = None
    if not isinstance(change, dict) or not change or set(change) - set(KEYS):
        raise AdminError(
            f"{ADMIN_PATH} takes a JSON object with keys {' and/or '.join(KEYS)}, e.g. "
            '{"default_budget": 0.5} or {"budget_file": "/path/budget.json"} (null: the uniform allocation)'
            f"; got {body[:200]!r}"
        )
    if "default_budget" in change:
        try:
            change["default_budget"] = parse_budget(change["default_budget"], source="default_budget")
        except BudgetError as e:
            raise AdminError(str(e)) from None
    if "budget_file" in change and not (
        change["budget_file"] is None or isinstance(change["budget_file"], str)
    ):
        raise AdminError(
            f"budget_file={change['budget_file']!r} is not valid; expected the path of a budget file, the "
            "name of one shipped in configs/, or null for the uniform allocation"
        )
    return change


def prepare(
    config: PluginConfig, current: Settings, top_k: int | None, change: dict[str, Any]
) -> tuple[PluginConfig, Settings, dict[str, Any]]:
    """The new configuration (from `config`, serving as `current`), its settings as this process resolves
    them (a new file read and validated here once), and the change every worker gets (the file's text, so
    all of them check the same bytes). Without `budget_file` the file served now stays, as loaded: a
    default-budget change never picks up edits made to the file on disk. ValueError (BudgetFileError,
    BudgetError) names the file, field or value."""
    from vllm_alloc.budget import read_budget_file

    rpc_change = dict(change)
    if change.get("budget_file") is not None:
        path, text = read_budget_file(change["budget_file"])
        rpc_change["budget_file"] = {"source": str(path.resolve()), "text": text}
    config, loaded = config.changed(current.budget_file, rpc_change)  # as every worker will
    return config, config.resolve(top_k=top_k, loaded=loaded), rpc_change


async def _workers(engine: Any, change: dict[str, Any], apply: bool) -> None:
    """Every worker checks (or takes) the change; AdminError with the first refusal. A worker answers a
    refusal with {"error": message} (`integration._reconfigure`)."""
    try:
        answers = await engine.collective_rpc(RPC, args=(change, apply))
    except Exception as e:  # an unexpected failure: the engine's utility-call error
        raise AdminError(f"the workers could not {'apply' if apply else 'check'} the change: {e}") from None
    for answer in answers or []:
        if isinstance(answer, dict) and "error" in answer:
            raise AdminError(answer["error"])


def describe(mw: ActivationBudgetMiddleware, settings: Settings) -> dict[str, Any]:
    bf = settings.budget_file
    return {
        "default_budget": settings.default_budget,
        "min_budget": settings.min_budget,
        "budget_file": settings.source,
        "budget_file_sha": bf.fingerprint_hash() if bf is not None else None,
        "scope": settings.scope,
        "weights": settings.weights,
        "aliases": mw.aliases,
    }


def _refusal(scope: Scope) -> tuple[int, str] | None:
    key = envs.VLLM_ALLOC_ADMIN_KEY
    if key is None:
        return 403, (
            f"{ADMIN_PATH} is off: start the server with VLLM_ALLOC_ADMIN_KEY set "
            "(vllm-alloc serve --admin-key-file FILE) to enable it"
        )
    given = header_values(scope, "authorization")
    if not hmac.compare_digest(given[-1] if given else b"", f"Bearer {key}".encode()):
        return (
            401,
            f"{ADMIN_PATH} needs the header `Authorization: Bearer <admin key>`; the key given is not it",
        )
    return None


def _api_servers(state: Any) -> int:
    parallel = getattr(getattr(state, "vllm_config", None), "parallel_config", None)
    count = getattr(parallel, "_api_process_count", 1)
    return count if isinstance(count, int) else 1
