"""Tiny random-weight MoE checkpoints (HF format) that vLLM CPU loads, for tests, the demo and benchmarks.

No model hub is reachable where these run, so everything is built offline: a byte-level BPE tokenizer trained
on the Python standard library's own source, and a model built from a config with seeded random weights.

Layer count: `num_layers` is the number of **MoE** layers, L, in every family. DeepSeek checkpoints get one
extra dense decoder layer in front (`first_k_dense_replace=1`, as in the real models), so their
`num_hidden_layers` is L + 1; every other family has `num_hidden_layers == L` with every layer sparse.

vLLM CPU constraints baked in here (see the research notes, section 5):
  - H % 32 == 0, or the CPU grouped-GEMM MoE backend refuses the model;
  - DeepSeek uses MLA, and CPU MLA supports only kv_lora_rank + qk_rope_head_dim == 576 (512 + 64).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import shutil
import sys
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from vllm_alloc.profiler.calibration import stdlib_corpus

FAMILIES: tuple[str, ...] = ("qwen3_moe", "qwen2_moe", "olmoe", "mixtral", "deepseek_v2", "deepseek_v3")

# Bump when a change here alters what build_model writes: it is part of every cached_model key.
CACHE_VERSION = 2

SPECIAL_TOKENS: tuple[str, ...] = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|im_end|>"  # ends a chat turn, so /v1/chat/completions stops where a chat model would
PAD_TOKEN = "<|endoftext|>"

# ChatML, the format of Qwen's instruct models; enough for /v1/chat/completions to render a prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


HEAD_DIM = 32
# Router logits are gate(RMSNorm(x)), and RMSNorm makes every entry of x about unit-size, so logit std is
# about std(W_gate)·sqrt(H). Aim for std ≈ 2: spread enough that experts have distinct, well separated scores
# (initializer_range 0.02 would give ≈ 0.2 and a near-uniform softmax), not so much that softmax is one-hot
# or sigmoid saturates at 1.0.
ROUTER_LOGIT_STD = 2.0
# DeepSeek-V3 adds this bias to sigmoid scores (in (0, 1)) to choose experts but not to weight them; real
# checkpoints have biases of the order of the score gaps, so some choices change and the path is exercised.
SCORE_BIAS_STD = 0.1

_DEEPSEEK_GROUPS = {"n_group": 4, "topk_group": 2}


@lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    # Cached per process: build_model calls this once per model, and training takes about a second.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),  # ids 0, 1, 2, in this order
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text round-trips
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_corpus(), trainer=trainer)
    if tok.get_vocab_size() > vocab_size:
        raise RuntimeError(
            f"trained tokenizer has {tok.get_vocab_size()} tokens, above vocab_size={vocab_size}"
        )
    return tok.to_str()


def build_tokenizer(out_dir: Path, vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE tokenizer (deterministic) and save it as a PreTrainedTokenizerFast folder."""
    min_vocab = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_vocab:
        raise ValueError(
            f"vocab_size={vocab_size} is too small; expected >= {min_vocab} (256 bytes + specials)"
        )
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[SPECIAL_TOKENS[1]],
        model_max_length=2048,
    )
    tok.chat_template = CHAT_TEMPLATE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(out_dir)
    return out_dir


def _family_config(
    family: str, L: int, H: int, E: int, K: int, I: int, vocab_size: int, eos: int, pad: int
) -> tuple[Any, dict[str, Any]]:
    """The transformers config class of `family` and its kwargs (before user overrides)."""
    import transformers

    heads = H // HEAD_DIM
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "hidden_size": H,
        "num_hidden_layers": L,
        "num_attention_heads": heads,
        "num_key_value_heads": max(1, heads // 2),  # GQA, as in the real models
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "initializer_range": 0.02,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "bos_token_id": None,
    }
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig, {
            **common,
            "head_dim": HEAD_DIM,
            "intermediate_size": 2 * H,  # dense MLP size, unused while every layer is sparse
            "moe_intermediate_size": I,
            "num_experts": E,
            "num_experts_per_tok": K,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": True,
        }
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig, {
            **common,
            "intermediate_size": 2 * H,
            "moe_intermediate_size": I,
            "shared_expert_intermediate_size": 2 * I,  # one shared expert, gated by shared_expert_gate
            "num_experts": E,
            "num_experts_per_tok": K,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "norm_topk_prob": False,
        }
    if family == "olmoe":
        # OLMoE and Mixtral have no dense MLP: intermediate_size is the expert size.
        return transformers.OlmoeConfig, {
            **common,
            "intermediate_size": I,
            "num_experts": E,
            "num_experts_per_tok": K,
            "norm_topk_prob": False,
        }
    if family == "mixtral":
        return transformers.MixtralConfig, {
            **common,
            "head_dim": HEAD_DIM,
            "intermediate_size": I,
            "num_local_experts": E,
            "num_experts_per_tok": K,
        }
    # DeepSeek V2 / V3: MLA attention, one dense layer in front, one shared expert, group-limited top-k.
    deepseek = {
        **common,
        "num_hidden_layers": L + 1,
        "num_key_value_heads": heads,  # MLA has no GQA; vLLM reads it only for the KV-cache shape check
        "intermediate_size": 2 * H,  # the dense first layer
        "moe_intermediate_size": I,
        "n_routed_experts": E,
        "num_experts_per_tok": K,
        "n_shared_experts": 1,
        "first_k_dense_replace": 1,
        "moe_layer_freq": 1,
        **_DEEPSEEK_GROUPS,
        "q_lora_rank": None,
        "kv_lora_rank": 512,  # with qk_rope_head_dim 64: 576, the only size CPU MLA supports
        "qk_rope_head_dim": 64,
        "qk_nope_head_dim": HEAD_DIM,
        "v_head_dim": HEAD_DIM,
    }
    if family == "deepseek_v2":
        return transformers.DeepseekV2Config, {
            **deepseek,
            "scoring_func": "softmax",
            "topk_method": "group_limited_greedy",
            "norm_topk_prob": False,
            "routed_scaling_factor": 1.0,
        }
    # deepseek_v3: HF's router is always sigmoid + e_score_correction_bias and ignores these two fields,
    # but vLLM reads them (topk_method "noaux_tc" is what creates the bias parameter).
    return transformers.DeepseekV3Config, {
        **deepseek,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "norm_topk_prob": True,
        "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": 0,  # no MTP layer weights are written
    }


def _check_shape(family: str, L: int, H: int, E: int, K: int, I: int, vocab_size: int) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    if L < 1:
        raise ValueError(f"num_layers={L} is out of range; expected >= 1")
    if H < HEAD_DIM or H % 32:
        raise ValueError(
            f"hidden_size={H} is not supported; expected a multiple of 32 (vLLM CPU MoE backend)"
        )
    if I < 1:
        raise ValueError(f"moe_intermediate_size={I} is out of range; expected >= 1")
    if not 1 <= K <= E:
        raise ValueError(f"top_k={K} is out of range for num_experts={E}; expected 1 <= top_k <= num_experts")
    if family.startswith("deepseek"):
        g, tg = _DEEPSEEK_GROUPS["n_group"], _DEEPSEEK_GROUPS["topk_group"]
        # Group-limited top-k keeps topk_group of n_group groups, so K must fit in the kept experts; V3 scores
        # a group by its top-2 experts, so groups need at least 2.
        if E % g or E // g < 2 or tg * E // g < K:
            raise ValueError(
                f"num_experts={E}, top_k={K} do not fit {family}'s {g} expert groups with {tg} kept; "
                f"expected num_experts a multiple of {g}, >= {2 * g}, and top_k <= {tg} * num_experts / {g}"
            )


def build_model(
    family: str,
    out_dir: Path,
    *,
    num_layers: int = 2,
    hidden_size: int = 128,
    num_experts: int = 16,
    top_k: int = 4,
    moe_intermediate_size: int = 64,
    vocab_size: int = 1024,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    **overrides: Any,
) -> Path:
    """Write a random-weight `family` checkpoint (config, safetensors, tokenizer) into `out_dir`.

    `num_layers` is the number of MoE layers (DeepSeek adds a dense first layer, see the module docstring).
    `overrides` are config fields that replace the defaults here (e.g. `norm_topk_prob=True`).
    """
    L, H, E, K, I = num_layers, hidden_size, num_experts, top_k, moe_intermediate_size
    _check_shape(family, L, H, E, K, I, vocab_size)
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    out_dir = Path(out_dir)
    build_tokenizer(out_dir, vocab_size)
    tok = PreTrainedTokenizerFast.from_pretrained(out_dir)
    config_cls, fields = _family_config(
        family, L, H, E, K, I, vocab_size, tok.convert_tokens_to_ids(EOS_TOKEN), tok.pad_token_id
    )
    config = config_cls(**{**fields, **overrides})

    # Build in fp32 so the init (and its seed) does not depend on `dtype`; cast at the end.
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            # The router of every family is `mlp.gate` in transformers 5 (saved under each family's name).
            if name.endswith(".mlp.gate.weight"):
                param.normal_(0.0, ROUTER_LOGIT_STD / math.sqrt(H), generator=gen)
        model.to(dtype)
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                # fp32 as in the real DeepSeek-V3 checkpoints (vLLM allocates it fp32 too); non-zero random
                # so the biased-choice path differs from plain top-k.
                buf.data = torch.randn(buf.shape, generator=gen, dtype=torch.float32) * SCORE_BIAS_STD
    model.generation_config.do_sample = False
    model.save_pretrained(out_dir)
    if family == "qwen3_moe":
        # transformers 5 writes E as `num_local_experts`; real Qwen3-MoE checkpoints, and tools that read
        # config.json directly, say `num_experts`. Loading maps it back (Qwen3MoeConfig.attribute_map).
        cfg_path = out_dir / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["num_experts"] = cfg.pop("num_local_experts")
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return out_dir


def default_cache_dir() -> Path:
    """`$VLLM_ALLOC_TEST_CACHE`, else ~/.cache/vllm-alloc/tiny."""
    env = os.environ.get("VLLM_ALLOC_TEST_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "vllm-alloc" / "tiny"


def cached_model(family: str, cache_dir: Path | None = None, **kwargs: Any) -> Path:
    """build_model(family, ..., **kwargs) once per cache dir; returns the model folder.

    The folder name hashes every build argument (defaults filled in), CACHE_VERSION and the Python version
    (the tokenizer corpus is the stdlib). The model is built in a temporary folder and renamed into place,
    so a parallel process sees either no folder or a complete one.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {', '.join(FAMILIES)}")
    bound = inspect.signature(build_model).bind(family, Path(), **kwargs)
    bound.apply_defaults()
    args = {k: v for k, v in bound.arguments.items() if k not in ("family", "out_dir", "overrides")}
    args.update(bound.arguments.get("overrides", {}))
    key = json.dumps(
        {"family": family, "args": args, "version": CACHE_VERSION, "python": sys.version_info[:2]},
        sort_keys=True,
        default=str,  # torch.dtype and friends
    )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=root))
    tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache may be shared (CI, containers)
    try:
        build_model(family, tmp, **kwargs)
        (tmp / "tiny_build.json").write_text(key + "\n")  # what was built, for a person reading the cache
        try:
            tmp.rename(final)
        except OSError:
            if not final.is_dir():  # not "another process won the race": a real error
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
