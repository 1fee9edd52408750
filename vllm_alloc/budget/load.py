"""Getting a budget file: finding it (a path, or a shipped name under CONFIGS_DIR), reading it, parsing
and validating it with pydantic's errors reworded as `BudgetFileError` (the file, the field in JSON terms,
the fix), and building the two files that need no profiler run: the uniform one (`uniform_budget_file`)
and one solved from a sensitivity matrix (`from_sensitivity`). The schema itself is `file.BudgetFile`.
"""

from __future__ import annotations

import json
import typing
import warnings
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from vllm_alloc.budget.alloc_l import solve, uniform
from vllm_alloc.budget.errors import FIX_PROFILE, BudgetFileError
from vllm_alloc.budget.file import BudgetFile, ModelFingerprint, _check_k_base, _check_matrix
from vllm_alloc.budget.records import UNIFORM, Sensitivity

# Where shipped budget files live (the repo's top-level configs/). Looked up at call time in this module,
# so tests and deployments point it elsewhere by assigning `vllm_alloc.budget.load.CONFIGS_DIR` (not a
# name re-exported from the package, which `resolve_budget_file` never reads).
# In a wheel the top-level configs/ folder ships as the package data folder vllm_alloc/configs.
_PACKAGE = Path(__file__).resolve().parent.parent  # vllm_alloc/
_PACKAGED_CONFIGS = _PACKAGE / "configs"
CONFIGS_DIR: Path = _PACKAGED_CONFIGS if _PACKAGED_CONFIGS.is_dir() else _PACKAGE.parent / "configs"


def _loc_text(loc: tuple[int | str, ...]) -> str:
    """('allocations', 3, 'k') -> 'allocations[3].k'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _schema_at(loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The schema class of the object at `loc`, to list its valid keys for an unknown one."""
    cls: type[BaseModel] = BudgetFile
    for part in loc:
        if isinstance(part, int):
            continue
        info = cls.model_fields.get(part)
        if info is None:
            return None
        options = (info.annotation, *typing.get_args(info.annotation))  # Model, or list[Model]
        models = [t for t in options if isinstance(t, type) and issubclass(t, BaseModel)]
        if not models:
            return None
        cls = models[0]
    return cls


_JSON_TYPES = {  # pydantic's strict type errors, in the words of the JSON a person edits
    "int_type": 'integer, e.g. 4 (not "4", 4.0 or true)',
    "float_type": 'number, e.g. 0.5 (not "0.5" or true)',
    "string_type": "string in double quotes",
    "list_type": "array [...]",
    "model_type": "object {...}",
    "dict_type": "object {...}",
}


def _from_validation_error(exc: ValidationError, path: str | Path | None) -> BudgetFileError:
    errors = exc.errors()
    err = errors[0]
    loc = _loc_text(err["loc"])
    cause = err.get("ctx", {}).get("error")
    fix = f"correct the value, or {FIX_PROFILE}"
    if isinstance(cause, BudgetFileError):
        field = ".".join(p for p in (loc, cause.field) if p) or None
        message, fix = cause.message, cause.fix
    elif err["type"] == "extra_forbidden":
        field, message = loc, "unknown key"
        schema = _schema_at(err["loc"][:-1])
        known = f" (valid keys: {', '.join(schema.model_fields)})" if schema else ""
        fix = f"remove the key or correct its spelling{known}"
    elif err["type"] == "missing":
        field, message, fix = loc, "required field is missing", f"add it, or {FIX_PROFILE}"
    elif loc == "format_version":
        field, message = loc, f"format_version {err.get('input')!r} is not supported; this vllm-alloc reads 1"
        fix = "re-create the file with this version's `vllm-alloc profile`"
    elif err["type"] in _JSON_TYPES:  # strict mode: the value has the wrong JSON type, nothing is converted
        got = json.dumps(err.get("input"), default=repr, ensure_ascii=False)
        got = got[:80] + "…" if len(got) > 80 else got
        field, message = loc or None, f"expected a JSON {_JSON_TYPES[err['type']]}, got {got}"
        fix = f"write the value with that JSON type (budget files are read strictly), or {FIX_PROFILE}"
    else:
        detail = str(cause) if cause is not None else err["msg"]
        got = repr(err.get("input"))
        field, message = loc or None, f"{detail} (got {got[:80] + '…' if len(got) > 80 else got})"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s) after this one)"
    return BudgetFileError(path, field, message, fix)


def parse_budget_file(data: Any, path: str | Path | None = None) -> BudgetFile:
    """Validate already-decoded JSON; every problem becomes a BudgetFileError naming `path`."""
    if not isinstance(data, dict):
        raise BudgetFileError(path, None, f"top level is a {type(data).__name__}, not a JSON object")
    try:
        budget_file = BudgetFile.model_validate(data)
    except ValidationError as exc:
        raise _from_validation_error(exc, path) from None
    budget_file._source = None if path is None else str(path)
    return budget_file


def resolve_budget_file(path_or_name: str | Path) -> Path:
    """A path if one exists, else a shipped file `<name>` or `<name>.json` under CONFIGS_DIR."""
    path = Path(path_or_name).expanduser()
    if path.exists():
        return path
    name = str(path_or_name)
    if Path(name).name == name:  # a bare name, not a path: try the shipped configs
        for shipped in (CONFIGS_DIR / name, CONFIGS_DIR / f"{name}.json"):
            if shipped.is_file():
                return shipped
    names = sorted(p.stem for p in CONFIGS_DIR.glob("*.json")) if CONFIGS_DIR.is_dir() else []
    raise BudgetFileError(
        path_or_name,
        None,
        f"no such file, and no shipped budget file of that name in {CONFIGS_DIR} "
        f"(shipped: {', '.join(names) or 'none'})",
        "pass the path of a budget file or a shipped name, or make one with `vllm-alloc profile`",
    )


def load_budget_file(path_or_name: str | Path) -> BudgetFile:
    """Load and validate a budget file by path, or by the name of a shipped one (`<name>[.json]` in
    CONFIGS_DIR; an existing path wins over a shipped name)."""
    path, text = read_budget_file(path_or_name)
    budget_file = parse_budget_text(text, path)
    unconfirmed = budget_file.unconfirmed()
    if unconfirmed:
        warnings.warn(
            f"budget file {path}: B = {unconfirmed} ship allocations chosen and certified on the same "
            "held-out sequences (profiled before the guard's confirmation split), which favours lucky "
            "winners; profile the model again with this version of vllm-alloc",
            UserWarning,
            stacklevel=2,
        )
    return budget_file


def read_budget_file(path_or_name: str | Path) -> tuple[Path, str]:
    """The path and text of a budget file (`load_budget_file` without the validation)."""
    path = resolve_budget_file(path_or_name)
    try:
        return path, path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise BudgetFileError(
            path, None, f"cannot read it ({exc})", "check the path and its permissions"
        ) from None


def parse_budget_text(text: str, path: str | Path | None) -> BudgetFile:
    """Validate the text of a budget file; BudgetFileError names `path` and the field."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BudgetFileError(
            path,
            None,
            f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}",
            f"repair the JSON, or {FIX_PROFILE}",
        ) from None
    return parse_budget_file(data, path)


def _build(data: dict[str, Any]) -> BudgetFile:
    return parse_budget_file({"format_version": 1, **data})


def uniform_budget_file(model: ModelFingerprint, k_base: int = 1, **settings: Any) -> BudgetFile:
    """The uniform budget file for `model`: K(B) = alloc_l.uniform for every B, no sensitivities.
    `settings` are further BudgetFile fields (weights, scope, default_budget, notes)."""
    L, K = model.num_moe_layers, model.top_k
    _check_k_base(k_base, K)
    allocations = [
        {"budget": B, "k": uniform(L, K, B, k_min=k_base), "chosen": UNIFORM}
        for B in range(L * k_base, L * K + 1)
    ]
    return _build({"model": model, "k_base": k_base, "allocations": allocations, **settings})


def from_sensitivity(
    model: ModelFingerprint, sensitivity: Sensitivity, k_base: int = 1, **settings: Any
) -> BudgetFile:
    """The budget file whose K(B) = alloc_l.solve(sensitivity.matrix) for every B (chosen = protocol).

    B = A is pinned to all K even where the DP would leave experts unused (a measured row that is not
    decreasing in k): b = 1.0 is defined as the stock model. No held-out candidates are recorded here;
    the profiler adds them.
    """
    L, K = model.num_moe_layers, model.top_k
    _check_k_base(k_base, K)
    _check_matrix("sensitivities[0].matrix", sensitivity.matrix, L, K)  # before solve() sees it
    solved = solve(sensitivity.matrix, k_min=k_base)
    solved[L * K] = [K] * L
    allocations = [{"budget": B, "k": ks, "chosen": sensitivity.protocol} for B, ks in solved.items()]
    data = {"model": model, "k_base": k_base, "sensitivities": [sensitivity], "allocations": allocations}
    return _build({**data, **settings})
