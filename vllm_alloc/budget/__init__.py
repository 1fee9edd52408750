"""The budget file: its schema, its validation, the allocations K(B) it ships (Alloc-L's DP) and where
shipped files are found. No vLLM import: `show`, `profile` and the tests use it on machines without vLLM.

The names below are the package's public face; its modules import one another directly.
"""

from vllm_alloc.budget.file import (
    UNIFORM,
    Allocation,
    BudgetFile,
    BudgetFileError,
    Calibration,
    Candidate,
    CapTest,
    Guard,
    ModelFingerprint,
    PairedTest,
    Sensitivity,
    from_sensitivity,
    load_budget_file,
    parse_budget_file,
    parse_budget_text,
    read_budget_file,
    resolve_budget_file,
    uniform_budget_file,
)

__all__ = [
    "UNIFORM",
    "Allocation",
    "BudgetFile",
    "BudgetFileError",
    "Calibration",
    "Candidate",
    "CapTest",
    "Guard",
    "ModelFingerprint",
    "PairedTest",
    "Sensitivity",
    "from_sensitivity",
    "load_budget_file",
    "parse_budget_file",
    "parse_budget_text",
    "read_budget_file",
    "resolve_budget_file",
    "uniform_budget_file",
]
