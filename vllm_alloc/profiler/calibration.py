"""Calibration data for `vllm-alloc profile`: read, tokenize, chunk into sequences, split.

Accepted `--calib` files (by extension):
  .txt                 plain text
  .jsonl               one JSON object per line with a string field "text" (other fields ignored)
  .npy / .pt           a 1-D integer array of token ids (numpy / torch.save)
  .tokens              token ids as decimal integers separated by whitespace
Without `--calib`, the default is the Python standard library's own top-level modules (sorted by name),
the corpus `vllm_alloc.tiny` trains its tokenizer on: every machine that runs Python has it, so
profiling works offline and is reproducible for one Python version.

Text is tokenized with the model's own tokenizer (no special tokens added: the sequences are windows
of a running text, not documents). The first `tokens` ids are cut into sequences of `seq_len`; the first
`profile_fraction` of the sequences (rounded down, at least one) measure sensitivities, the rest
validate candidates (held-out). Contiguous, not interleaved, so the held-out text is text the profile
never saw. No vLLM import here.
"""

from __future__ import annotations

import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKEN_SUFFIXES = (".npy", ".pt", ".tokens")


class CalibrationError(ValueError):
    """Calibration data that cannot be used; the message names the file and the fix."""


@dataclass
class CalibrationData:
    profile: list[list[int]]  # sequences of seq_len token ids: sensitivities
    heldout: list[list[int]]  # sequences of seq_len token ids: validation of candidates
    source: str  # provenance for the budget file
    seq_len: int
    split: str  # human-readable description of the split

    @property
    def tokens(self) -> int:
        return self.seq_len * (len(self.profile) + len(self.heldout))

    def split_sequences(self, split: str) -> list[list[int]]:
        if split == "profile":
            return self.profile
        if split == "heldout":
            return self.heldout
        raise ValueError(f"split {split!r} is not valid; expected 'profile' or 'heldout'")


_CORPUS_CHARS = 2_000_000  # ~1.3 s of BPE training: enough text for a 1-4k vocabulary


def stdlib_corpus() -> list[str]:
    """Deterministic local training text: the stdlib's top-level modules, sorted by name, up to ~2 MB.

    The stdlib exists wherever Python does, so no download is needed; its content differs between Python
    versions, which is why cached_model keys include the Python version.
    """
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for path in sorted(stdlib.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        total += len(text)
        if total >= _CORPUS_CHARS:
            break
    if total == 0:
        raise RuntimeError(f"no .py files under the stdlib folder {stdlib}; cannot train a tokenizer")
    return texts


def _stdlib_documents() -> tuple[str, Iterator[str]]:
    where = sysconfig.get_paths()["stdlib"]
    version = ".".join(map(str, sys.version_info[:2]))
    return f"default: Python {version} standard library modules under {where} (sorted by name)", iter(
        stdlib_corpus()
    )


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise CalibrationError(f"calibration file {path}: cannot read it as UTF-8 text ({exc})") from None


def _jsonl_documents(path: Path, text: str) -> Iterator[str]:
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise CalibrationError(
                f"calibration file {path}: line {lineno} is not valid JSON ({exc.msg}); "
                'expected one object per line with a "text" field'
            ) from None
        value = row.get("text") if isinstance(row, dict) else None
        if not isinstance(value, str):
            raise CalibrationError(
                f'calibration file {path}: line {lineno} has no string field "text"; '
                'expected one object per line like {"text": "..."}'
            )
        yield value


def _read_token_file(path: Path) -> list[int]:
    suffix = path.suffix.lower()
    try:
        if suffix == ".tokens":
            return [int(t) for t in _read_text(path).split()]
        if suffix == ".npy":
            import numpy as np

            array: Any = np.load(path, allow_pickle=False)
        else:
            import torch

            array = torch.load(path, map_location="cpu", weights_only=True)
    except CalibrationError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError) as exc:
        raise CalibrationError(f"calibration file {path}: cannot read token ids ({exc})") from None
    shape = tuple(getattr(array, "shape", ()))
    kind = str(getattr(array, "dtype", type(array).__name__))
    if len(shape) != 1 or "int" not in kind:
        raise CalibrationError(
            f"calibration file {path}: holds {kind} of shape {shape}; "
            "expected a 1-D integer array of token ids"
        )
    return [int(t) for t in array.tolist()]


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _tokenize(documents: Iterator[str], tokenizer: Any, limit: int) -> list[int]:
    # Documents one by one, stopping once `limit` ids are there: a large corpus is never tokenized whole.
    ids: list[int] = []
    for doc in documents:
        if ids:
            doc = "\n\n" + doc  # keep document boundaries visible to the model
        ids.extend(tokenizer.encode(doc, add_special_tokens=False))
        if len(ids) >= limit:
            break
    return ids


def load_calibration(
    path: str | Path | None,
    tokenizer: Any,
    *,
    tokens: int,
    seq_len: int,
    vocab_size: int,
    profile_fraction: float = 0.75,
) -> CalibrationData:
    """Calibration sequences for profiling (see the module docstring for formats and the split)."""
    if seq_len < 2:
        raise CalibrationError(f"--seq-len {seq_len} is too small; need ≥ 2 (the first token has no NLL)")
    if tokens < 2 * seq_len:
        raise CalibrationError(
            f"--tokens {tokens} gives fewer than two sequences of --seq-len {seq_len}; need ≥ {2 * seq_len} "
            "(at least one to profile and one held out)"
        )
    if not 0.0 < profile_fraction < 1.0:
        raise CalibrationError(f"profile fraction {profile_fraction} is outside the valid range (0, 1)")
    if path is None:
        source, documents = _stdlib_documents()
        ids = _tokenize(documents, tokenizer, tokens)
    else:
        p = Path(path).expanduser()
        suffix = p.suffix.lower()
        if suffix not in TEXT_SUFFIXES + TOKEN_SUFFIXES:
            raise CalibrationError(
                f"calibration file {p}: extension {suffix or '(none)'!r} is not supported; "
                f"use one of {', '.join(TEXT_SUFFIXES + TOKEN_SUFFIXES)}"
            )
        if not p.is_file():
            raise CalibrationError(f"calibration file {p}: no such file (or not a regular file)")
        if suffix in TOKEN_SUFFIXES:
            ids = _read_token_file(p)[:tokens]
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise CalibrationError(
                    f"calibration file {p}: token id {bad[0]} is outside the model's vocabulary "
                    f"[0, {vocab_size}); was it made with another tokenizer?"
                )
        else:
            text = _read_text(p)
            docs = _jsonl_documents(p, text) if suffix == ".jsonl" else iter([text])
            ids = _tokenize(docs, tokenizer, tokens)
        source = f"{p.resolve()} (sha256 {_digest(p)})"
    n = min(len(ids), tokens) // seq_len
    if n < 2:
        raise CalibrationError(
            f"calibration data {source}: only {len(ids)} tokens, fewer than two sequences of --seq-len "
            f"{seq_len}; give more text or a smaller --seq-len"
        )
    sequences = [ids[i * seq_len : (i + 1) * seq_len] for i in range(n)]
    n_profile = min(n - 1, max(1, int(n * profile_fraction)))
    split = (
        f"contiguous: profile = sequences 0-{n_profile - 1} ({n_profile}), "
        f"held-out = sequences {n_profile}-{n - 1} ({n - n_profile}), of {seq_len} tokens each"
    )
    return CalibrationData(sequences[:n_profile], sequences[n_profile:], source, seq_len, split)


def nll_sum(prompt_logprobs: Sequence[Any], ids: Sequence[int]) -> float:
    """−Σ log p(ids[i] | ids[:i]) over i ≥ 1 from vLLM's per-position prompt logprobs (position 0 has
    none). With `prompt_logprobs=0` vLLM returns exactly the actual token's logprob at each position."""
    total = 0.0
    for i in range(1, len(ids)):
        entry = prompt_logprobs[i]
        if entry is None or ids[i] not in entry:
            raise RuntimeError(f"vLLM returned no prompt logprob for position {i} (token {ids[i]})")
        total -= float(entry[ids[i]].logprob)
    return total
