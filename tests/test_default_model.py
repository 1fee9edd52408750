"""The committed default model (models/default, trained by scripts/train_default_model.py).

Checks the issue's constraints on the checkpoint and that it is a trained model, not random weights: its
perplexity on a fixed slice of the validation split matches what training recorded and sits far below the
unigram baseline. Fast (one forward pass of 8 × 256 tokens); the vLLM serving test lives with the budget file.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

MODEL = Path(__file__).resolve().parent.parent / "models" / "default"
MAX_SAFETENSORS_BYTES = 15 * 1024 * 1024
# Stated in training.json at save time; a fresh fp32 run of the same bf16 weights may differ only by
# reduction order (threads, torch version), far below 1 %.
RECORDED_TOLERANCE = 0.01
# Absolute bar (docs/default-model.md): training ended at validation perplexity 23.4 (this slice: 24.5) with a
# unigram perplexity of 519; 30 leaves room for numeric drift and still fails an untrained or broken model
# (random weights sit near the vocabulary size, 2048), and the 400-step model this one replaced (90).
PPL_MAX = 30.0


def _json(name: str) -> dict:
    path = MODEL / name
    if not path.is_file():
        pytest.fail(f"{path} is missing; run scripts/train_default_model.py (docs/default-model.md)")
    return json.loads(path.read_text())


def test_checkpoint_meets_the_issue_constraints() -> None:
    cfg = _json("config.json")
    assert cfg["architectures"] == ["Qwen3MoeForCausalLM"]
    assert cfg["num_experts"] >= 16
    assert cfg["num_experts_per_tok"] >= 4
    # Every layer is sparse: decoder_sparse_step 1 and no dense (mlp_only) layers, so L = num_hidden_layers.
    assert cfg["decoder_sparse_step"] == 1 and cfg["mlp_only_layers"] == []
    assert cfg["num_hidden_layers"] >= 4
    assert cfg["hidden_size"] % 32 == 0, "the vLLM CPU MoE backend needs H % 32 == 0"
    weights = MODEL / "model.safetensors"
    assert weights.is_file()
    assert weights.stat().st_size <= MAX_SAFETENSORS_BYTES
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (MODEL / name).is_file(), name


def test_manifest_splits_are_disjoint_and_nonempty() -> None:
    manifest = _json("data_manifest.json")
    splits = manifest["splits"]
    assert set(splits) == {"train", "validation", "calibration", "test"}
    seen: set[str] = set()
    for name, split in splits.items():
        assert split["files"] and split["sequences"] > 0, name
        assert seen.isdisjoint(split["files"]), f"{name} shares files with another split"
        seen.update(split["files"])


def test_perplexity_on_validation_slice() -> None:
    from transformers import AutoModelForCausalLM

    sample = _json("eval_sample.json")
    training = _json("training.json")
    ids = torch.tensor(sample["input_ids"])  # [8, 256] token ids of the validation split
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    ppl = math.exp(loss.item())
    recorded = sample["perplexity_fp32_from_bf16_checkpoint"]
    assert abs(ppl - recorded) <= RECORDED_TOLERANCE * recorded, (ppl, recorded)
    assert ppl < PPL_MAX, ppl
    assert ppl < training["final"]["val_unigram_perplexity"] / 4, "barely better than unigram"
