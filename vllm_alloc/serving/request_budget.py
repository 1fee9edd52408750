"""A request's budget, as the middleware reads it: from the `X-Activation-Budget` header, from the JSON
body (`vllm_xargs.activation_budget`, or `sampling_params.extra_args.activation_budget` on
/inference/v1/generate), or from a multipart form's `vllm_xargs` field. Each is checked as the values module
checks a budget (a number in (0, 1], not below the model's minimum); a bad one raises BudgetRequestError,
which the middleware answers with HTTP 400 naming the field and the valid range. `rewrite_body` writes the
applied budget and its cache salt into a body (serving/middleware.py's docstring says which route carries
the budget where).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from vllm_alloc.integration.config import Settings
from vllm_alloc.values import BUDGET_KEY, BudgetError, cache_salt, format_budget, parse_budget, valid_range

BUDGET_HEADER = "X-Activation-Budget"
INVOCATIONS_PATH = "/invocations"  # SageMaker: generation or pooling, by the body
GENERATE_PATH = "/inference/v1/generate"  # the budget sits in the body's sampling_params
# Where a body's budget reaches SamplingParams.extra_args: `vllm_xargs` on every other budget route.
XARGS = ("vllm_xargs",)
XARGS_FIELD = f"vllm_xargs.{BUDGET_KEY}"  # the body's budget on those routes, as error messages name it
EXTRA_ARGS = {GENERATE_PATH: ("sampling_params", "extra_args")}
# The keys vLLM's ChatCompletionRequest / CompletionRequest need, the types /invocations tries first.
GENERATION_KEYS = ("messages", "prompt", "prompt_embeds")
# A budget header, repeated or folded into one list (RFC 9110 §5.3), is refused past this size before it
# is split or decoded: room for several copies of the longest budget text.
MAX_HEADER_BYTES = 256


class BudgetRequestError(Exception):
    """A request the middleware answers itself with HTTP 400."""


def rewrite_body(
    header_values: list[bytes],
    body: bytes,
    settings: Settings,
    path: str,
    aliases: Mapping[str, float] | None = None,
) -> tuple[bytes, float | None]:
    """(new body, applied b) for one request to `path`, given the values of its budget header(s) and the
    budget aliases served ({model name: b}); (body, None) when the body is not a JSON object, holds the
    budget's dict in something else than an object (left for vLLM to refuse), or is an /invocations body
    vLLM does not generate for and that names no budget.

    BudgetRequestError (HTTP 400) for an invalid header or body budget, when header, body and the model's
    alias name different budgets, when a budget comes with an /invocations body that is not a
    generation request, or sits in a top-level `vllm_xargs` on /inference/v1/generate.
    """
    lo = settings.min_budget
    from_header = header_budget(header_values, lo)
    data = json_object(body)
    *outer, leaf = EXTRA_ARGS.get(path, XARGS)
    parent: Any = data  # the object that holds the budget's dict: the body, or its sampling_params
    for name in outer:
        parent = parent.get(name) if isinstance(parent, dict) else None
    if data is None or not isinstance(parent, dict) or not isinstance(parent.get(leaf, {}), dict | None):
        # vLLM's own validation answers malformed requests; a header budget is still checked above.
        return body, None
    field = ".".join((*outer, leaf, BUDGET_KEY))
    xargs = dict(parent.get(leaf) or {})
    raw = xargs.get(BUDGET_KEY)
    from_body = None if raw is None else parse_value(raw, lo, field)
    if outer:  # GenerateRequest drops a top-level vllm_xargs
        refuse_dropped_budget(data, lo, path, f"send the budget as {field} or in the {BUDGET_HEADER} header")
    model = data.get("model")
    from_alias = (aliases or {}).get(model) if isinstance(model, str) else None
    if path == INVOCATIONS_PATH and not any(key in data for key in GENERATION_KEYS):
        if from_header is None and from_body is None and from_alias is None:
            return body, None  # a pooling request: no budget applies, and none was asked for
        raise BudgetRequestError(
            f"an activation budget applies only to text generation; this {INVOCATIONS_PATH} body has none "
            f"of the keys {', '.join(GENERATION_KEYS)}, so vLLM serves it with a pooling handler, which "
            f"would ignore the budget. Send it without {BUDGET_HEADER} and {field}, "
            "and with a model name that is not a budget alias"
        )
    if from_alias is not None:
        for source, b in ((f"{BUDGET_HEADER} header", from_header), (field, from_body)):
            if b is not None and b != from_alias:
                raise BudgetRequestError(
                    f"model {model!r} is a budget alias (b = {format_budget(from_alias)}), and the {source} "
                    f"({format_budget(b)}) disagrees; send one of them, or the same budget"
                )
        from_header = from_alias
    if from_header is not None and from_body is not None and from_header != from_body:
        raise BudgetRequestError(
            f"{BUDGET_HEADER} header ({format_budget(from_header)}) and {field} "
            f"({format_budget(from_body)}) disagree; send one of them, or the same {valid_range(lo)}"
        )
    budget = from_header if from_header is not None else from_body
    if budget is None:
        budget = settings.default_budget
    xargs[BUDGET_KEY] = budget
    parent[leaf] = xargs
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
    if size > MAX_HEADER_BYTES:  # checked before splitting, so a megabyte header costs nothing
        raise BudgetRequestError(
            f"{BUDGET_HEADER} header is {size} bytes long (at most {MAX_HEADER_BYTES}); "
            f"expected {valid_range(min_budget)}"
        )
    items = [item for v in values for item in (part.strip() for part in v.split(b",")) if item]
    # Nothing but commas and spaces: one empty value, refused as not a number.
    distinct = sorted({parse_value(item, min_budget, f"{BUDGET_HEADER} header") for item in items or [b""]})
    if len(distinct) > 1:
        raise BudgetRequestError(
            f"{BUDGET_HEADER} header has different values ({', '.join(map(format_budget, distinct))}), "
            f"sent as repeated or comma-separated headers; send one value, {valid_range(min_budget)}"
        )
    return distinct[0]


def parse_value(raw: Any, min_budget: float | None, source: str) -> float:
    try:
        return parse_budget(raw, min_budget=min_budget, source=source)
    except BudgetError as e:
        raise BudgetRequestError(str(e)) from None


def xargs_budget(xargs: Any, min_budget: float | None) -> float | None:
    """The budget in a `vllm_xargs` dict, checked as on the budget routes (BudgetRequestError for an
    invalid one); None where it names none, or `xargs` is no dict."""
    raw = xargs.get(BUDGET_KEY) if isinstance(xargs, dict) else None
    return None if raw is None else parse_value(raw, min_budget, XARGS_FIELD)


def refuse_dropped_budget(data: Any, min_budget: float | None, path: str, instead: str) -> None:
    """400 for a `vllm_xargs` budget in a body whose route drops `vllm_xargs`: an invalid one with its
    range, as on the budget routes; a valid one because nothing would apply it (`instead`: what to do)."""
    if xargs_budget(data.get("vllm_xargs") if isinstance(data, dict) else None, min_budget) is not None:
        raise BudgetRequestError(
            f"{XARGS_FIELD} is not applied on {path}: vLLM drops vllm_xargs there; {instead}"
        )


def json_object(body: bytes) -> dict[str, Any] | None:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) else None


def form_fields(body: bytes, content_type: bytes, names: tuple[str, ...]) -> dict[str, str] | None:
    """The text of a multipart form's fields among `names`, from one parse of the body (an audio upload
    may be large); None where the body is no multipart form."""
    if not content_type.lower().startswith(b"multipart/form-data"):
        return None
    from email import message_from_bytes, policy

    form = message_from_bytes(b"Content-Type: " + content_type + b"\r\n\r\n" + body, policy=policy.HTTP)
    fields: dict[str, str] = {}
    for part in form.iter_parts() if form.is_multipart() else ():
        name = part.get_param("name", header="content-disposition")
        if name in names and name not in fields:  # the first of a repeated field, as before
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                fields[str(name)] = payload.decode("utf-8", "replace")
    return fields


def form_budget(text: str | None, min_budget: float | None) -> float | None:
    """The budget in a form's `vllm_xargs` field (JSON text, as vLLM's audio routes parse it), checked as
    on the budget routes: BudgetRequestError for an invalid one; None where the form names none (or its
    `vllm_xargs` is not a JSON object, which vLLM refuses itself)."""
    try:
        xargs = json.loads(text) if text is not None else None
    except ValueError:
        return None
    return xargs_budget(xargs, min_budget)
