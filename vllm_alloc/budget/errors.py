"""How a budget file is refused: `BudgetFileError`, the one error a user sees (the file, the field, the
fix), `_fail`, which raises it from a validator, and `_Schema`, the strict pydantic base of every schema
class, whose own refusals (unknown keys, NaN, a value of the wrong JSON type) `load._from_validation_error`
rewords as a BudgetFileError.

The leaf of the budget-file modules: `records`, `file` and `load` import it, it imports none of them.
"""

from __future__ import annotations

import typing
from pathlib import Path

from pydantic import BaseModel, ConfigDict

FIX_PROFILE = "re-run `vllm-alloc profile` for this model"


class BudgetFileError(ValueError):
    """A budget file that cannot be used: carries `path`, `field` (e.g. `allocations[3].k`), `message`
    and `fix`. A ValueError, so pydantic validators may raise it and callers may catch either."""

    def __init__(self, path: str | Path | None, field: str | None, message: str, fix: str = FIX_PROFILE):
        # args mirror __init__ so the exception pickles across the processes vLLM spawns.
        super().__init__(path, field, message, fix)
        self.path = None if path is None else str(path)
        self.field = field
        self.message = message.rstrip(".")
        self.fix = fix

    def __str__(self) -> str:
        where = f"budget file {self.path}" if self.path else "budget file"
        field = f": field '{self.field}'" if self.field else ""
        return f"{where}{field}: {self.message}. Fix: {self.fix}"


def _fail(field: str, message: str, fix: str = FIX_PROFILE) -> typing.NoReturn:
    raise BudgetFileError(None, field, message, fix)


class _Schema(BaseModel):
    # Inherited by every schema class: unknown keys (typos), NaN/inf and values of the wrong JSON type are
    # errors, not silently kept or converted (a budget file is written by a program; a string where a
    # number belongs is a bug or a hand edit gone wrong). Strict still takes a JSON integer for a float.
    # A list default is written `Field(default=[])` in the subclasses: the same to pydantic as `= []` (it
    # copies a default for every instance), but ruff's RUF012 sees a pydantic model only where its
    # BaseModel base is in the same module, and this one is not.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
