"""Train the embedded default model: a small Qwen3-MoE on the Python standard library's source, on CPU.

Random-weight checkpoints (vllm_alloc.tiny) cannot show whether a budget preserves quality; this one has
learned something, so perplexity under a budget means something. Everything is offline and deterministic
from --seed: the text is the stdlib of the running Python (no download), split into train / validation /
calibration / test by a hash of each file's path, and the model is trained from scratch for a fixed
number of steps. The output folder is exactly what vLLM loads (config, bf16 safetensors, tokenizer) plus
`data_manifest.json` (which files are in which split), `training.json` (config, losses, perplexities,
timings) and `eval_sample.json` (a fixed token slice of the validation split, for a fast test).

    python scripts/train_default_model.py --out models/default --seed 0 --steps 4000 --threads 2

The run is reproducible for a fixed thread count: a different count changes the order of floating-point
reductions, so losses then agree to a few decimals, not bit for bit. --max-minutes is a safety net that
stops early (the cosine schedule is then cut short and the run no longer reproduces on other machines).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import platform
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from vllm_alloc.tiny import EOS_TOKEN, PAD_TOKEN, build_tokenizer

# Folders of the stdlib that are not representative library code: tests (huge, repetitive), codec tables
# (numbers), generated pydoc topics (prose dumped as one string), and installed third-party packages
# (they differ between machines).
EXCLUDED_DIRS = frozenset(
    {"site-packages", "test", "tests", "idle_test", "encodings", "pydoc_data", "__phello__", "__pycache__"}
)
# Split by a hash of the relative path, not by position in the sorted list, so a file added or removed in
# a Python patch release moves no other file between splits. Out of every 20 buckets:
SPLIT_BUCKETS = {0: "validation", 1: "calibration", 2: "test"}  # the other 17 buckets are "train"
SPLITS = ("train", "validation", "calibration", "test")
SEQ_LEN = 256
EVAL_SAMPLE_SEQS = 8  # sequences of the validation split written to eval_sample.json


def stdlib_files() -> tuple[Path, list[str]]:
    """The stdlib root and its .py files (relative POSIX paths, sorted) outside EXCLUDED_DIRS."""
    root = Path(sysconfig.get_paths()["stdlib"])
    rel = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
        and not p.relative_to(root).parts[0].startswith("config-")
    )
    if not rel:
        raise RuntimeError(f"no .py files under the stdlib folder {root}; cannot build the training data")
    return root, rel


def split_of(rel_path: str) -> str:
    bucket = int(hashlib.sha256(rel_path.encode()).hexdigest()[:8], 16) % 20
    return SPLIT_BUCKETS.get(bucket, "train")


def build_data(tokenizer: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Token sequences [N, SEQ_LEN] per split, and the manifest that documents them.

    Each split's files are concatenated in sorted order, each followed by the end-of-text token, and the
    stream is cut into non-overlapping SEQ_LEN windows (the tail shorter than a window is dropped).
    """
    root, files = stdlib_files()
    sep = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    streams: dict[str, list[int]] = {s: [] for s in SPLITS}
    manifest_splits: dict[str, dict[str, Any]] = {
        s: {"files": [], "chars": 0, "sha256": hashlib.sha256()} for s in SPLITS
    }
    for rel in files:
        text = (root / rel).read_text(encoding="utf-8", errors="replace")
        split = split_of(rel)
        streams[split].extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        streams[split].append(sep)
        entry = manifest_splits[split]
        entry["files"].append(rel)
        entry["chars"] += len(text)
        entry["sha256"].update(rel.encode() + b"\0" + text.encode() + b"\0")
    seqs: dict[str, torch.Tensor] = {}
    for split, ids in streams.items():
        n = len(ids) // SEQ_LEN
        seqs[split] = torch.tensor(ids[: n * SEQ_LEN], dtype=torch.long).view(n, SEQ_LEN)
        entry = manifest_splits[split]
        entry.update(sha256=entry["sha256"].hexdigest(), tokens=len(ids), sequences=n)
    manifest = {
        "source": "Python standard library .py files (sysconfig.get_paths()['stdlib'])",
        "python": platform.python_version(),
        "excluded_dirs": sorted(EXCLUDED_DIRS),
        "split_rule": (
            "bucket = int(sha256(relative_path)[:8], 16) % 20; "
            + ", ".join(f"{b} -> {s}" for b, s in SPLIT_BUCKETS.items())
            + ", else train"
        ),
        "use": {
            "train": "model training",
            "validation": "validation loss during training, the perplexity in training.json",
            "calibration": "reserved for the budget profiler (vllm-alloc profile)",
            "test": "reserved for the quality benchmark",
        },
        "sequence": f"files concatenated in sorted order, each followed by {PAD_TOKEN}, cut into "
        f"non-overlapping windows of {SEQ_LEN} tokens",
        "all_files_sha256": hashlib.sha256("\n".join(files).encode()).hexdigest(),
        "splits": {
            s: {k: v for k, v in e.items() if k != "files"} | {"files": e["files"]}
            for s, e in manifest_splits.items()
        },
    }
    return seqs, manifest


def make_config(args: argparse.Namespace, vocab_size: int, eos: int, pad: int) -> Any:
    from transformers import Qwen3MoeConfig

    H = args.hidden_size
    if H % 32 or H % args.head_dim:
        raise ValueError(f"--hidden-size {H} must be a multiple of 32 (vLLM CPU MoE) and of --head-dim")
    heads = H // args.head_dim
    return Qwen3MoeConfig(
        vocab_size=vocab_size,
        hidden_size=H,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        head_dim=args.head_dim,
        intermediate_size=2 * H,  # dense MLP size, unused: every layer is sparse
        moe_intermediate_size=args.moe_intermediate_size,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        norm_topk_prob=True,
        output_router_logits=True,  # adds the load-balancing loss during training; off in the saved config
        router_aux_loss_coef=args.aux_loss_coef,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        initializer_range=0.02,
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,
    )


@torch.no_grad()
def evaluate(model: Any, seqs: torch.Tensor, batch_size: int) -> float:
    """Mean next-token cross-entropy (nats) over all predicted positions of `seqs`."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        batch = seqs[i : i + batch_size]
        logits = model(input_ids=batch).logits.float()
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total += loss.item()
        count += batch[:, 1:].numel()
    model.train()
    return total / count


def unigram_loss(train: torch.Tensor, val: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy of the add-one unigram model of the training tokens on `val`: the bar to clear."""
    counts = torch.bincount(train.flatten(), minlength=vocab_size).double() + 1.0
    logp = (counts / counts.sum()).log()
    return -logp[val[:, 1:].flatten()].mean().item()


def lr_at(step: int, args: argparse.Namespace) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> None:
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    build_tokenizer(out, args.vocab_size)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(out)
    t0 = time.perf_counter()
    seqs, manifest = build_data(tokenizer)
    print(
        "data: "
        + ", ".join(f"{s} {len(v)} seqs" for s, v in seqs.items())
        + f" ({time.perf_counter() - t0:.0f} s to tokenize)",
        flush=True,
    )
    config = make_config(
        args, len(tokenizer), tokenizer.convert_tokens_to_ids(EOS_TOKEN), tokenizer.pad_token_id
    )
    # grouped_mm: one grouped GEMM per projection instead of a Python loop over experts; on CPU (torch 2.13)
    # it matches the eager loop to 1e-10 in loss and gradients and trains ~3x faster.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, experts_implementation="grouped_mm")
    model.train()
    n_params = sum(p.numel() for p in model.parameters())

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
    optim = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
        eps=1e-8,
    )
    val_quick = seqs["validation"][: args.eval_seqs]
    gen = torch.Generator().manual_seed(args.seed)
    order = torch.empty(0, dtype=torch.long)
    train_seqs = seqs["train"]
    history: list[dict[str, float]] = []
    ema_loss = None
    start = time.perf_counter()
    bar = tqdm(range(args.steps), desc="train", dynamic_ncols=True, mininterval=5.0)
    steps_done = 0
    for step in bar:
        if len(order) < args.batch_size:  # a fresh seeded permutation per epoch
            order = torch.cat([order, torch.randperm(len(train_seqs), generator=gen)])
        batch, order = train_seqs[order[: args.batch_size]], order[args.batch_size :]
        for group in optim.param_groups:
            group["lr"] = lr_at(step, args)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            outputs = model(input_ids=batch, labels=batch)
        outputs.loss.backward()  # includes router_aux_loss_coef * load-balancing loss
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        optim.step()
        optim.zero_grad(set_to_none=True)
        steps_done = step + 1
        lm_loss = outputs.loss.item() - args.aux_loss_coef * outputs.aux_loss.item()
        ema_loss = lm_loss if ema_loss is None else 0.95 * ema_loss + 0.05 * lm_loss
        elapsed = time.perf_counter() - start
        bar.set_postfix(
            loss=f"{ema_loss:.3f}",
            aux=f"{outputs.aux_loss.item():.3f}",
            tok_s=f"{steps_done * batch.numel() / elapsed:.0f}",
        )
        if steps_done % args.eval_every == 0 or steps_done == args.steps:
            val = evaluate(model, val_quick, args.batch_size)
            history.append(
                {
                    "step": steps_done,
                    "train_loss_ema": round(ema_loss, 4),
                    "val_loss": round(val, 4),
                    "elapsed_s": round(elapsed, 1),
                }
            )
            tqdm.write(
                f"step {steps_done}: train {ema_loss:.4f} val {val:.4f} "
                f"(ppl {math.exp(val):.2f}) lr {lr_at(step, args):.2e} {elapsed / 60:.1f} min"
            )
        if args.max_minutes and elapsed > 60 * args.max_minutes:
            tqdm.write(f"stopping at step {steps_done}: --max-minutes {args.max_minutes} reached")
            break
    bar.close()
    train_time = time.perf_counter() - start
    save(model, config, tokenizer, seqs, manifest, args, n_params, steps_done, train_time, history, out)


def save(
    model: Any,
    config: Any,
    tokenizer: Any,
    seqs: dict[str, torch.Tensor],
    manifest: dict[str, Any],
    args: argparse.Namespace,
    n_params: int,
    steps_done: int,
    train_time: float,
    history: list[dict[str, float]],
    out: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    config.output_router_logits = False  # inference needs no aux loss
    model.generation_config.do_sample = False
    model.to(torch.bfloat16).save_pretrained(out)
    # transformers 5 writes E as `num_local_experts`; Qwen3-MoE checkpoints (and vLLM) say `num_experts`.
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["num_experts"] = cfg.pop("num_local_experts", cfg.get("num_experts"))
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    (out / "data_manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    # Final numbers come from the saved bf16 checkpoint, reloaded and run in fp32: what users get.
    saved = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    val_seqs = seqs["validation"][: args.final_eval_seqs]
    train_seqs = seqs["train"][: args.final_eval_seqs]  # the first sequences: seen at most once or twice
    val_loss = evaluate(saved, val_seqs, args.batch_size)
    train_loss = evaluate(saved, train_seqs, args.batch_size)
    uni = unigram_loss(seqs["train"], val_seqs, len(tokenizer))
    sample = seqs["validation"][:EVAL_SAMPLE_SEQS]
    sample_loss = evaluate(saved, sample, EVAL_SAMPLE_SEQS)
    chars_per_token = manifest["splits"]["validation"]["chars"] / manifest["splits"]["validation"]["tokens"]
    tokens_seen = steps_done * args.batch_size * SEQ_LEN
    (out / "eval_sample.json").write_text(
        json.dumps(
            {
                "what": f"the first {EVAL_SAMPLE_SEQS} sequences of the validation split"
                " (data_manifest.json)",
                "perplexity_fp32_from_bf16_checkpoint": round(math.exp(sample_loss), 4),
                "input_ids": sample.tolist(),
            }
        )
        + "\n"
    )
    report = {
        "model": {
            "architecture": "Qwen3MoeForCausalLM",
            "parameters": n_params,
            "L": config.num_hidden_layers,
            "E": config.num_experts,
            "K": config.num_experts_per_tok,
            "H": config.hidden_size,
            "I": config.moe_intermediate_size,
            "vocab_size": config.vocab_size,
            "head_dim": config.head_dim,
        },
        "args": vars(args),
        "seed": args.seed,
        "steps": steps_done,
        "tokens_seen": tokens_seen,
        "epochs": round(tokens_seen / seqs["train"].numel(), 3),
        "wall_time_s": round(train_time, 1),
        "tokens_per_s": round(tokens_seen / train_time, 1),
        "final": {
            "eval_sequences": len(val_seqs),
            "train_loss": round(train_loss, 4),
            "train_perplexity": round(math.exp(train_loss), 3),
            "val_loss": round(val_loss, 4),
            "val_perplexity": round(math.exp(val_loss), 3),
            "val_unigram_perplexity": round(math.exp(uni), 3),
            "val_bits_per_byte_approx": round(val_loss / math.log(2) / chars_per_token, 4),
            "eval_sample_perplexity": round(math.exp(sample_loss), 4),
        },
        "history": history,
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    (out / "training.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["final"], indent=1))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="models/default", help="output folder (what vLLM loads)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4000, help="optimizer steps (fixes the LR schedule)")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=0.0,
        help="stop early after this many minutes of training (0: never)",
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--batch-size", type=int, default=8, help=f"sequences of {SEQ_LEN} tokens per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="final LR as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="gradient-norm clip")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (slower than fp32 on CPUs without AMX)")
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-seqs", type=int, default=32, help="validation sequences for progress evals")
    p.add_argument("--final-eval-seqs", type=int, default=128, help="sequences for the final numbers")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--layers", type=int, default=4, help="decoder layers, all MoE (L)")
    p.add_argument("--experts", type=int, default=16, help="routed experts per layer (E)")
    p.add_argument("--top-k", type=int, default=4, help="experts per token (K)")
    p.add_argument("--moe-intermediate-size", type=int, default=64, help="expert size (I)")
    p.add_argument("--aux-loss-coef", type=float, default=0.01, help="router load-balancing loss weight")
    return p.parse_args(argv)


if __name__ == "__main__":
    train(parse_args())
    sys.exit(0)
