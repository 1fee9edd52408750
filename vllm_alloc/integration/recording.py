"""Router-score recording of `AllocState`, the calibration of the carried balance's θ (the profiler,
through `collective_rpc`): while `recording`, each MoE layer hands its ranking keys to `record` in every
real pass, and `carry_thresholds` turns what was recorded into θ_l(B)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from vllm_alloc.integration.plan import Plan


class ScoreRecording:
    """Mixin of `AllocState` (`integration.state`, where these fields are defined and documented)."""

    plan: Plan | None
    recorded: list[list[np.ndarray]] | None
    recording: bool

    if TYPE_CHECKING:  # from `integration.state`

        def _need_plan(self) -> Plan: ...

    # -- profiling ------------------------------------------------------------------------------------------
    def record_scores(self, on: bool) -> None:
        """Start (clearing what was recorded before) or stop recording each layer's router scores below
        the floor, in every real pass (the calibration of the carried balance's θ)."""
        plan = self._need_plan()
        if on:
            self.recorded = [[] for _ in range(plan.budget_file.model.num_moe_layers)]
        self.recording = on

    def record(self, column: int, keys: torch.Tensor) -> None:
        """Record one layer call's ranking keys [T, K]: each token's candidates below its top-K_base."""
        assert self.recorded is not None and self.plan is not None
        ranked = torch.sort(keys.float(), dim=1, descending=True).values[:, self.plan.k_base :]
        self.recorded[column].append(ranked.cpu().numpy())

    def carry_thresholds(self, rows: dict[int, list[int]], offset: float) -> dict[int, list[float]]:
        """θ_l(B) for the allocation rows given ({B: K(B)}) from the recorded scores: per layer the bar
        at which the recorded tokens keep K_l − K_base − offset extras on average (`carry.threshold_for`)."""
        from vllm_alloc.routing.carry import threshold_for

        plan = self._need_plan()
        if not self.recorded or not all(self.recorded):
            raise RuntimeError("vllm-alloc: no router scores recorded (vllm_alloc_record_scores(True) first)")
        extras = [np.concatenate(r) for r in self.recorded]
        return {
            int(B): [threshold_for(extras[l], k - plan.k_base - offset) for l, k in enumerate(ks)]
            for B, ks in rows.items()
        }
