"""What the per-process state knows of the model and allocates for it once it is loaded: `LayerInfo`, one
MoE layer as vLLM builds it, and `Plan`, the budget file with the persistent device buffers and tables the
runner hook writes and the MoE layers read (updated in place, so graph capture and compile see one
address)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from vllm_alloc.budget import BudgetFile
from vllm_alloc.routing import device_budget


@dataclass
class LayerInfo:
    """What the state needs to know of one MoE layer; filled as vLLM builds the model."""

    name: str
    layer_id: int
    num_experts: int
    top_k: int
    hidden_size: int
    intermediate_size: int
    column: int = -1  # position among the MoE layers (column of the allocation table)


@dataclass
class Plan:
    """Everything fixed at start-up once the model is loaded: the budget file and device buffers."""

    budget_file: BudgetFile
    source: str  # where the allocation came from, for logs ("configs/x.json" or "uniform")
    scope: str
    weights: str
    default_budget: float
    table: torch.Tensor  # [A + 1, L] int32: row B = K(B); rows below L·K_base are 0 (padding)
    token_budget: torch.Tensor  # [N] int64: absolute budget B of each token, 0 = padding
    token_group: torch.Tensor  # [N] int64 in [0, N): reallocation group of each token
    used: torch.Tensor  # [L, A + 1] float64: routed activations performed
    full: torch.Tensor  # [L, A + 1] float64: activations the full model would have performed
    all_full: torch.Tensor  # [] bool: every token of the pass at b = 1.0 (read by captured graphs)
    not_full: torch.Tensor  # [] bool: not all_full, written beside it (no per-layer logical_not in graphs)
    # [A + 1] bool, host: False where the budget file turns Alloc-T off at B (each token of a request at
    # that B is then its own group, so it keeps exactly its top-K_l).
    reallocating: np.ndarray
    # The carried balance (`vllm_alloc.routing.carry`): θ_l(B), where each B carries (host), α, the balance of
    # each request slot ([S + 1, L], row 0 scratch) and each token's slot (0 = not carried).
    carry_theta: torch.Tensor  # [A + 1, L] float64
    carrying: np.ndarray  # [A + 1] bool, host
    carry_alpha: float
    carry_pool: str  # "layer": a balance per (request, layer); "request": column 0 for all its layers
    carry_group: int  # decode tokens carry where at most this many share a group
    balance: torch.Tensor  # [S + 1, L] int64
    token_slot: torch.Tensor  # [N] int64
    # The distinct-expert cap (`vllm_alloc.routing.cap`): the share ρ_l(B) in thousandths (SCALE where B is
    # not
    # capped), which B are capped (host), each token's cap group + 1 (0 = not capped), and its counters:
    # pairs dropped [L, A + 1] and layer calls by distinct experts touched [L, E + 1].
    cap_table: torch.Tensor  # [A + 1, L] int64
    capping: np.ndarray  # [A + 1] bool, host
    token_cap: torch.Tensor  # [N] int64
    cap_dropped: torch.Tensor  # [L, A + 1] float64
    distinct: torch.Tensor  # [L, E + 1] float64
    # On CPU, numpy views of the buffers the host Alloc-T path reads or counts into (same memory); None on
    # devices. `full` has none: AllocState.fill counts it once per pass for every layer, in torch.
    host: dict[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        if self.table.device.type == "cpu":
            names: tuple[str, ...] = ("table", "token_budget", "token_group", "used", "carry_theta")
            names += ("balance", "token_slot", "cap_table", "token_cap", "cap_dropped", "distinct")
            self.host = {name: getattr(self, name).numpy() for name in names}

    @property
    def alloc_t_weights(self) -> str:
        """`alloc_t.reallocate`'s weights mode: `raw` keeps the raw weights it is given, as `topk` does."""
        return "kept" if self.weights == "kept" else "topk"

    def device_carry(self) -> device_budget.Carry | None:
        """The carried balance's buffers for the device path, or None where no budget carries."""
        if not self.carrying.any():
            return None
        return device_budget.Carry(
            self.token_slot, self.balance, self.carry_theta, self.carry_alpha, self.one_bank
        )

    def device_cap(self) -> device_budget.Cap:
        """The cap's buffers and counters for the device path (the cap itself only where some B is)."""
        return device_budget.Cap(
            self.token_cap, self.cap_table, self.E, self.cap_dropped, self.distinct, bool(self.capping.any())
        )

    @property
    def E(self) -> int:
        return self.budget_file.model.num_experts

    @property
    def one_bank(self) -> bool:
        """Whether a request has one balance for all its layers (column 0 of its row)."""
        return self.carry_pool == "request"

    @property
    def A(self) -> int:
        return self.budget_file.model.full_activations

    @property
    def K(self) -> int:
        return self.budget_file.model.top_k

    @property
    def k_base(self) -> int:
        return self.budget_file.k_base
