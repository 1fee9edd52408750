"""The budget file: its schema, its validation, the allocations K(B) it ships (Alloc-L's DP) and where
shipped files are found. No vLLM import: `show`, `profile` and the tests use it on machines without vLLM.

The names below are the package's public face; its modules import one another directly (never through
this facade), in one direction: errors <- records <- file <- load, and alloc_l (the DP) for file and load.

  errors.py    BudgetFileError (file, field, fix), `_fail`, the strict pydantic base `_Schema`
  records.py   the rows: Allocation (K(B) at one B) and what was measured to choose it (Calibration,
               Sensitivity, PairedTest, Candidate, CapTest, Guard); the never-worse-than-uniform rule
  file.py      ModelFingerprint and BudgetFile: the whole file's checks, b -> B, the device tables, dump
  load.py      find (CONFIGS_DIR), read, parse (pydantic errors reworded), uniform_budget_file,
               from_sensitivity
  alloc_l.py   Alloc-L: the DP that solves K(B) from a sensitivity matrix, and the uniform allocation
"""

from vllm_alloc.budget.errors import BudgetFileError
from vllm_alloc.budget.file import BudgetFile, ModelFingerprint
from vllm_alloc.budget.load import (
    from_sensitivity,
    load_budget_file,
    parse_budget_file,
    parse_budget_text,
    read_budget_file,
    resolve_budget_file,
    uniform_budget_file,
)
from vllm_alloc.budget.records import (
    UNIFORM,
    Allocation,
    Calibration,
    Candidate,
    CapTest,
    Guard,
    PairedTest,
    Sensitivity,
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
