"""vllm_alloc.tiny: every family builds, loads back in transformers, and (e2e) serves in vLLM CPU."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from vllm_alloc.tiny import FAMILIES, build_tokenizer, cached_model

# Routing fields that vLLM reads, per family.
ROUTING: dict[str, dict[str, Any]] = {
    "qwen3_moe": {"norm_topk_prob": True},
    "qwen2_moe": {"norm_topk_prob": False},
    "olmoe": {"norm_topk_prob": False},
    "mixtral": {},  # Mixtral always renormalizes; no field
    "deepseek_v2": {
        "scoring_func": "softmax",
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": False,
        "routed_scaling_factor": 1.0,
    },
    "deepseek_v3": {
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "n_group": 4,
        "topk_group": 2,
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
    },
}
E_FIELD = {
    "mixtral": "num_local_experts",
    "deepseek_v2": "n_routed_experts",
    "deepseek_v3": "n_routed_experts",
}


def _load_hf(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    # The eager experts loop: the default grouped_mm path can index out of bounds on CPU for tiny shapes.
    return AutoModelForCausalLM.from_pretrained(path, experts_implementation="eager")


@pytest.mark.parametrize("family", FAMILIES)
def test_family_builds_and_runs_in_transformers(family: str, tiny_model: Callable[..., Path]) -> None:
    from transformers import AutoTokenizer

    path = tiny_model(family)
    model = _load_hf(path)
    tok = AutoTokenizer.from_pretrained(path)
    ids = tok("def f(x):\n    return x + 1", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], 1024)
    assert torch.isfinite(logits).all()
    assert logits.float().std() > 0  # random weights, not a constant output


@pytest.mark.parametrize("family", FAMILIES)
def test_config_fields(family: str, tiny_model: Callable[..., Path]) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig

    L, H, E, K = 3, 64, 8, 2  # not the defaults, so a field ignoring its argument shows
    path = tiny_model(family, num_layers=L, hidden_size=H, num_experts=E, top_k=K)
    cfg = json.loads((path / "config.json").read_text())
    # config.json names E as the family's real checkpoints do; the loaded config answers to that name too.
    assert cfg[E_FIELD.get(family, "num_experts")] == E
    assert getattr(AutoConfig.from_pretrained(path), E_FIELD.get(family, "num_experts")) == E
    deepseek = family.startswith("deepseek")
    assert cfg["model_type"] == family
    assert cfg["num_experts_per_tok"] == K
    assert cfg["hidden_size"] == H
    # num_layers counts MoE layers; DeepSeek adds its dense first layer.
    assert cfg["num_hidden_layers"] == L + (1 if deepseek else 0)
    with safe_open(path / "model.safetensors", "pt") as f:
        routers = [k for k in f.keys() if k.endswith("gate.weight") and "shared_expert" not in k]  # noqa: SIM118
    assert len(routers) == L
    if deepseek:
        assert cfg["first_k_dense_replace"] == 1
        assert cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"] == 576  # the only size CPU MLA supports
    assert cfg["tie_word_embeddings"] is False
    assert cfg["max_position_embeddings"] == 2048
    for field, value in ROUTING[family].items():
        assert cfg[field] == value, field


def test_router_weights_are_spread(tiny_model: Callable[..., Path]) -> None:
    from safetensors.torch import load_file

    weights = load_file(tiny_model("qwen3_moe") / "model.safetensors")
    gate = weights["model.layers.0.mlp.gate.weight"].float()  # [E, H]
    # std ≈ 2/sqrt(H) so router logits have std ≈ 2 (initializer_range 0.02 would give ≈ 0.2).
    assert 0.1 < gate.std().item() < 0.3


def test_deepseek_v3_score_bias_is_random_fp32(tiny_model: Callable[..., Path]) -> None:
    from safetensors.torch import load_file

    weights = load_file(tiny_model("deepseek_v3") / "model.safetensors")
    # Layer 0 is the dense one; MoE layers 1 and 2 each have a bias over E = 16 experts.
    biases = {k: v for k, v in weights.items() if k.endswith("mlp.gate.e_score_correction_bias")}
    assert sorted(biases) == [f"model.layers.{i}.mlp.gate.e_score_correction_bias" for i in (1, 2)]
    for bias in biases.values():
        assert bias.dtype == torch.float32 and bias.shape == (16,)
        assert bias.abs().min() > 0 and bias.unique().numel() == 16


def test_build_is_deterministic(tmp_path: Path, tiny_model: Callable[..., Path]) -> None:
    from safetensors.torch import load_file

    a = load_file(tiny_model("olmoe", num_layers=1, seed=3) / "model.safetensors")
    b = load_file(cached_model("olmoe", tmp_path, num_layers=1, seed=3) / "model.safetensors")
    c = load_file(cached_model("olmoe", tmp_path, num_layers=1, seed=4) / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.mlp.gate.weight"], c["model.layers.0.mlp.gate.weight"])


def test_cached_model_reuses_the_folder(tmp_path: Path) -> None:
    first = cached_model("mixtral", tmp_path, num_layers=1)
    again = cached_model("mixtral", tmp_path, num_layers=1, top_k=4)  # an explicit default: same key
    other = cached_model("mixtral", tmp_path, num_layers=1, top_k=2)
    assert first == again != other
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


def test_tokenizer_round_trips(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(build_tokenizer(tmp_path))
    text = "Hello, world! def f(x): return x ** 2  # ünïcode 日本語 \t\n"
    ids = tok(text).input_ids
    assert max(ids) < 1024
    assert tok.decode(ids) == text
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    special = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    assert special == [0, 1, 2]
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"family": "gpt2"}, "unknown family"),
        ({"family": "olmoe", "hidden_size": 100}, "hidden_size=100"),
        ({"family": "olmoe", "top_k": 17}, "top_k=17"),
        ({"family": "deepseek_v3", "num_experts": 10, "top_k": 2}, "num_experts=10"),  # not 4 equal groups
        ({"family": "deepseek_v2", "top_k": 9}, "top_k=9"),  # more than the 2 kept groups hold
    ],
)
def test_bad_arguments_name_the_value(tmp_path: Path, kwargs: dict[str, Any], message: str) -> None:
    from vllm_alloc.tiny import build_model

    family = kwargs.pop("family")
    with pytest.raises(ValueError, match=message):
        build_model(family, tmp_path, **kwargs)


@pytest.mark.e2e
def test_qwen3_moe_generates_in_vllm(
    tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Stock vLLM: this checks the checkpoint, not the plugin (which has its own e2e tests).
    monkeypatch.setenv("VLLM_PLUGINS", "")
    monkeypatch.setenv("VLLM_ALLOC_DISABLE", "1")
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(tiny_model("qwen3_moe")),
        dtype="bfloat16",
        max_model_len=256,
        max_num_seqs=4,
        max_num_batched_tokens=256,
        gpu_memory_utilization=0.3,
        enforce_eager=True,
    )
    try:
        params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
        first = llm.generate(["def hello(world):", "The quick brown fox"], params)
        again = llm.generate(["def hello(world):", "The quick brown fox"], params)
    finally:
        # Stop the engine processes now, while pytest still captures output: left to atexit, their shutdown
        # logging writes to closed streams.
        llm.llm_engine.engine_core.shutdown()
    assert [len(o.outputs[0].token_ids) for o in first] == [6, 6]
    # Greedy is reproducible for the same batch (a different batch may change bf16 sums, hence the argmax).
    assert [o.outputs[0].token_ids for o in first] == [o.outputs[0].token_ids for o in again]
