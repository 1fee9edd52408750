"""The profiler's vLLM engine and the model it loads: the checkpoint's config.json (MoE or refused), the
model's fingerprint, starting and stopping the in-process engine, and decode-order evaluation
(`decode_order`: teacher-forced prompts run one token per pass, as decoding requests do)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vllm_alloc.budget import ModelFingerprint
from vllm_alloc.profiler.errors import ProfileError

_EXPERT_COUNT_KEYS = ("num_experts", "n_routed_experts", "num_local_experts")


# -- model ---------------------------------------------------------------------------------------------
def read_moe_config(model: str | Path) -> dict[str, Any]:
    """config.json of a local HF checkpoint, refusing non-MoE models before vLLM is started."""
    path = Path(model).expanduser()
    config_path = path / "config.json"
    if not config_path.is_file():
        raise ProfileError(f"MODEL {path}: no config.json there; pass a local HF-format checkpoint folder")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ProfileError(f"MODEL {path}: cannot read config.json ({exc})") from None
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    merged = {**text, **config}  # multimodal wrappers keep the language model's fields in text_config
    if not any(isinstance(merged.get(k), int) and merged[k] > 1 for k in _EXPERT_COUNT_KEYS):
        raise ProfileError(
            f"MODEL {path} is not a Mixture-of-Experts model: its config.json has none of "
            f"{', '.join(_EXPERT_COUNT_KEYS)} (> 1); Alloc-L profiles routed experts"
        )
    return merged


def fingerprint(config: dict[str, Any], counters: dict[str, Any]) -> ModelFingerprint:
    """The fingerprint as the integration computes it at load: layers and K from the worker's counters,
    E, H, I and the architecture from config.json (the fields vLLM builds the MoE layers from)."""
    E = next(config[k] for k in _EXPERT_COUNT_KEYS if isinstance(config.get(k), int))
    I = config.get("moe_intermediate_size") or config.get("intermediate_size")
    if not isinstance(I, int):
        raise ProfileError(f"config.json has no moe_intermediate_size / intermediate_size (got {I!r})")
    K = int(counters["K"])
    if config.get("num_experts_per_tok") not in (None, K):
        raise RuntimeError(f"config.json says top-k {config['num_experts_per_tok']}, the loaded model {K}")
    return ModelFingerprint(
        architecture=(config.get("architectures") or ["unknown"])[0],
        moe_layers=list(counters["layers"]),
        num_experts=int(E),
        top_k=K,
        hidden_size=int(config["hidden_size"]),
        intermediate_size=int(I),
    )


# -- the engine ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def decode_order(llm: Any, on: bool = True) -> Iterator[None]:
    """Within the block, the in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) prefills every prompt
    one token per pass (vLLM's `long_prefill_token_threshold` = 1), so teacher-forced prompts run as
    decoding requests do: each pass computes every layer of one token per sequence, in position order.
    That is what a request balance spanning layers needs (scope `stream`, one pass per sequence, runs
    layer by layer). Prompt logprobs are the same as in one pass (bf16 noise aside). Needs chunked
    prefill; sequences decode together up to max_num_seqs."""
    if not on:
        yield
        return
    core = getattr(getattr(llm.llm_engine, "engine_core", None), "engine_core", None)
    scheduler = getattr(core, "scheduler", None)
    config = getattr(scheduler, "scheduler_config", None)
    if config is None or not config.enable_chunked_prefill:
        raise RuntimeError(
            "vllm-alloc: decode-order evaluation needs the engine core in this process "
            "(VLLM_ENABLE_V1_MULTIPROCESSING=0) with chunked prefill on"
        )
    before = config.long_prefill_token_threshold
    config.long_prefill_token_threshold = 1
    try:
        yield
    finally:
        config.long_prefill_token_threshold = before


def start_llm(
    model: str, seq_len: int, dtype: str, max_num_seqs: int, budget_file: Path | None = None
) -> Any:
    """The profiler's engine; with `budget_file`, one serving that file for the cap's measurements
    (`CapEvaluator`), whose steps hold max_num_seqs whole sequences (scope `position`'s N streams)."""
    # The engine core in this process: `generate` queues every sequence before the first step, so every
    # configuration's prefill steps hold the same sequences (scope `budget`'s pools are those steps).
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM

    plugin: dict[str, Any] = {"scope": "request"}
    if budget_file is not None:
        plugin["budget_file"] = str(budget_file)
    return LLM(
        model=str(model),
        dtype=dtype,  # type: ignore[arg-type]  # the CLI passes vLLM's own choices through
        max_model_len=seq_len + 1,  # the prompt plus the one token vLLM insists on generating
        max_num_seqs=max_num_seqs,
        max_num_batched_tokens=max(seq_len + 1, 2048, max_num_seqs * (seq_len + 1) if budget_file else 0),
        gpu_memory_utilization=0.3 if on_cpu() else 0.85,
        enforce_eager=True,  # each configuration runs once; compiling or graph capture would not pay
        enable_prefix_caching=False,
        additional_config={"vllm_alloc": plugin},
    )


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def shutdown_llm(llm: Any) -> None:
    """Stop the engine now (not at garbage collection), so no second engine ever overlaps this one."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    if core is not None and hasattr(core, "shutdown"):
        core.shutdown()
