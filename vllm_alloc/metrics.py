"""Prometheus metrics of the plugin, exported on the server's /metrics.

The MoE layers run in the worker process, the /metrics endpoint in the API server: worker-side values
reach it through prometheus_client's multiprocess mode, which needs PROMETHEUS_MULTIPROC_DIR set before
any vLLM process starts (`vllm-alloc serve` does that). Values are recorded only from real forward
passes (never warm-up or dummy runs) and only on tensor-parallel rank 0.

  vllm_alloc:routed_activations_total{layer, budget}  routed (token, expert) pairs computed
  vllm_alloc:full_activations_total{layer, budget}    pairs the full model would have computed
  vllm_alloc:cap_dropped_pairs_total{layer, budget}   pairs Alloc-T kept that the distinct-expert cap
                                                      dropped (`vllm_alloc.routing.cap`)
  vllm_alloc:distinct_experts{layer}                  histogram: experts one pass's kept pairs touch in
                                                      a layer (passes with some token below b = 1.0)
  vllm_alloc:request_budget                           histogram of request budgets b
  vllm_alloc:default_budget                           b of requests that name none (API server)
  vllm_alloc:budget_file_info{file, sha}              1 for the budget file served, 0 for earlier ones
  vllm_alloc:admin_changes_total{result}              admin-route changes, "applied" or "refused"

`layer` is the model's decoder-layer index; `budget` is B / A (the absolute budget as a fraction of the
full activation count A), printed with 4 significant digits.
"""

from __future__ import annotations

from typing import Any

BUDGET_BUCKETS = (0.1, 0.2, 0.25, 0.3, 0.33, 0.4, 0.5, 0.6, 0.67, 0.75, 0.8, 0.9, 0.95, 1.0)

_metrics: dict[str, Any] = {}
_series: dict[tuple[int, str], tuple[Any, Any]] = {}  # (layer, budget label) -> (used, full)


def _get() -> dict[str, Any]:
    if not _metrics:
        from prometheus_client import Counter, Histogram

        _metrics["used"] = Counter(
            "vllm_alloc:routed_activations",
            "Routed (token, expert) pairs computed, per MoE layer and budget.",
            ["layer", "budget"],
        )
        _metrics["full"] = Counter(
            "vllm_alloc:full_activations",
            "Routed (token, expert) pairs the full model would have computed, per MoE layer and budget.",
            ["layer", "budget"],
        )
        _metrics["requests"] = Histogram(
            "vllm_alloc:request_budget",
            "Activation budget b of requests, as applied.",
            buckets=BUDGET_BUCKETS,
        )
    return _metrics


def _serving() -> dict[str, Any]:
    """The API server's metrics (created on first use, so worker processes never export them)."""
    if not _server_metrics:
        from prometheus_client import Counter, Gauge

        _server_metrics["default"] = Gauge(
            "vllm_alloc:default_budget",
            "Budget b of requests that name none.",
            multiprocess_mode="mostrecent",
        )
        _server_metrics["file"] = Gauge(
            "vllm_alloc:budget_file_info",
            "1 for the budget file served (uniform: none), 0 for those served before.",
            ["file", "sha"],
            multiprocess_mode="mostrecent",
        )
        _server_metrics["changes"] = Counter(
            "vllm_alloc:admin_changes",
            "Changes asked of the admin route, by result: applied or refused.",
            ["result"],
        )
    return _server_metrics


_server_metrics: dict[str, Any] = {}
_file_labels: list[tuple[str, str]] = []


def set_serving(settings: Any) -> None:
    """Export the default budget and budget file now served (`integration.config.Settings`)."""
    m = _serving()
    m["default"].set(settings.default_budget)
    bf = settings.budget_file
    labels = (settings.source, bf.fingerprint_hash() if bf is not None else "")
    for old in _file_labels:
        if old != labels:
            m["file"].labels(*old).set(0)
    m["file"].labels(*labels).set(1)
    if labels not in _file_labels:
        _file_labels.append(labels)


def count_admin_change(result: str) -> None:
    _serving()["changes"].labels(result).inc()


def budget_label(fraction: float) -> str:
    return f"{fraction:.4g}"


def add_activations(layer: int, budget: float, used: float, full: float) -> None:
    key = (layer, budget_label(budget))
    series = _series.get(key)
    if series is None:  # labels() costs a lock and a dict lookup per call: resolve each series once
        m = _get()
        labels = {"layer": str(layer), "budget": key[1]}
        series = _series[key] = (m["used"].labels(**labels), m["full"].labels(**labels))
    if used:
        series[0].inc(used)
    series[1].inc(full)


def add_cap_dropped(layer: int, budget: float, pairs: float) -> None:
    m = _get()
    if "dropped" not in m:
        from prometheus_client import Counter

        m["dropped"] = Counter(
            "vllm_alloc:cap_dropped_pairs",
            "Routed pairs Alloc-T kept that the distinct-expert cap dropped, per MoE layer and budget.",
            ["layer", "budget"],
        )
    m["dropped"].labels(layer=str(layer), budget=budget_label(budget)).inc(pairs)


def distinct_buckets(num_experts: int) -> tuple[float, ...]:
    """Histogram buckets for 1 … E distinct experts: every value up to 16, then about 1.5× apart."""
    edges, v = [], 1
    while v < num_experts:
        edges.append(v)
        v = v + 1 if v < 16 else int(v * 1.5)
    return (*edges, num_experts)


def observe_distinct(layer: int, distinct: int, passes: int, num_experts: int) -> None:
    """`passes` layer calls of MoE layer `layer` whose kept pairs touched `distinct` experts."""
    m = _get()
    if "distinct" not in m:  # created at the first flush, once E is known
        from prometheus_client import Histogram

        m["distinct"] = Histogram(
            "vllm_alloc:distinct_experts",
            "Distinct routed experts a forward pass touches in a MoE layer (passes with a budget below 1.0).",
            ["layer"],
            buckets=distinct_buckets(num_experts),
        )
    series = m["distinct"].labels(layer=str(layer))
    for _ in range(passes):  # no bulk observe in prometheus_client; passes is a few per flush
        series.observe(distinct)


def observe_request_budget(b: float) -> None:
    _get()["requests"].observe(b)
