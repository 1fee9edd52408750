"""The counters of `AllocState`: the device counters read back (`counters`, for tests and
`collective_rpc`) and copied to Prometheus (`flush`, each budget's new requests too).

Counters live on the device (`used`, `full`: [L, A + 1], activations performed and the full-budget
count, per layer and per absolute budget) and are copied to Prometheus outside the forward pass.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from vllm_alloc.integration import compat
from vllm_alloc.integration.plan import LayerInfo, Plan

COUNTERS = ("used", "full", "cap_dropped", "distinct")  # device counters flushed to Prometheus


class CounterFlush:
    """Mixin of `AllocState` (`integration.state`, where these fields are defined and documented)."""

    layers: dict[str, LayerInfo]
    plan: Plan | None
    flushed: dict[str, np.ndarray] | None
    seen_requests: set[str]

    def counters(self) -> dict[str, Any]:
        """Cumulative counters by model layer index and absolute budget (tests, `collective_rpc`)."""
        plan = self.plan
        if plan is None:
            return {"layers": [], "A": 0, "used": [], "full": [], "cap_dropped": [], "distinct": []}
        infos = sorted(self.layers.values(), key=lambda i: i.column)
        return {
            "layers": [i.layer_id for i in infos],
            "A": plan.A,
            "K": plan.K,
            "used": plan.used.cpu().tolist(),
            "full": plan.full.cpu().tolist(),
            "cap_dropped": plan.cap_dropped.cpu().tolist(),
            "distinct": plan.distinct.cpu().tolist(),
        }

    def flush(self) -> None:
        """Copy counter deltas to Prometheus (TP rank 0 only, so ranks do not double-count)."""
        from vllm_alloc import metrics

        plan = self.plan
        if plan is None or self.flushed is None or compat.tp_rank() != 0:
            return
        now = {name: getattr(plan, name).cpu().numpy() for name in COUNTERS}  # outside the forward pass
        delta = {name: now[name] - self.flushed[name] for name in COUNTERS}
        self.flushed = {name: now[name].copy() for name in COUNTERS}
        infos = sorted(self.layers.values(), key=lambda i: i.column)
        d_used, d_full = delta["used"], delta["full"]
        for column, B in zip(*np.nonzero(d_full), strict=True):
            metrics.add_activations(
                layer=infos[column].layer_id,
                budget=B / plan.A,
                used=float(d_used[column, B]),
                full=float(d_full[column, B]),
            )
        dropped, distinct = delta["cap_dropped"], delta["distinct"]
        for column, B in zip(*np.nonzero(dropped), strict=True):
            metrics.add_cap_dropped(infos[column].layer_id, B / plan.A, float(dropped[column, B]))
        for column, n in zip(*np.nonzero(distinct), strict=True):
            metrics.observe_distinct(infos[column].layer_id, int(n), int(distinct[column, n]), plan.E)

    def _observe_new_requests(self, req_ids: list[str], budgets: np.ndarray) -> None:
        from vllm_alloc import metrics

        plan = self.plan
        assert plan is not None
        current = set(req_ids)
        if compat.tp_rank() != 0:
            self.seen_requests = current
            return
        for req_id, B in zip(req_ids, budgets.tolist(), strict=True):
            if req_id not in self.seen_requests:
                metrics.observe_request_budget(B / plan.A)
        self.seen_requests = current | (self.seen_requests if len(self.seen_requests) < 65536 else set())
