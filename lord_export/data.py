"""Calibration text: read files and folders, tokenize, cut into fixed-length blocks.

Defaults (``DEFAULT_SAMPLES`` blocks of ``DEFAULT_SEQLEN`` tokens): documents are read in sorted
path order (folders recursively; binary files in folders are skipped), optionally split on a
separator string, each started with the tokenizer's BOS token when it has one and ended with EOS
when it has one, concatenated into one stream and cut into consecutive blocks. When the data holds
fewer than samples × seqlen tokens, the last block is padded and its padding is masked out
(``attention_mask`` 0), so it never enters the statistics.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import UsageError

log = logging.getLogger(__name__)

DEFAULT_SAMPLES = 128
DEFAULT_SEQLEN = 512
_SNIFF = 8192


def is_binary(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(_SNIFF)
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start < len(head) - 4  # a multi-byte character cut at the sniff boundary is fine
    return False


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def text_files(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders into the list of text files to read; raise UsageError on bad paths."""
    if not paths:
        raise UsageError("no calibration data given: pass one or more text/code files or folders")
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise UsageError(f"calibration path {str(raw)!r} does not exist")
        if p.is_file():
            if is_binary(p):
                raise UsageError(f"calibration file {str(raw)!r} is binary, not text")
            if p.stat().st_size == 0:
                raise UsageError(f"calibration file {str(raw)!r} is empty")
            files.append(p)
            continue
        found = [f for f in sorted(p.rglob("*")) if f.is_file() and not _hidden(f.relative_to(p))]
        texts = [f for f in found if f.stat().st_size > 0 and not is_binary(f)]
        if len(texts) < len(found):
            log.info("skipped %d empty or binary file(s) under %s", len(found) - len(texts), p)
        if not texts:
            raise UsageError(f"calibration folder {str(raw)!r} holds no non-empty text files")
        files.extend(texts)
    return files


def read_documents(paths: Sequence[str | Path], separator: str | None = None) -> Iterator[str]:
    """Yield the documents of ``paths``: each file, or each ``separator``-delimited part of it."""
    for f in text_files(paths):
        text = f.read_text(encoding="utf-8", errors="replace")
        parts = text.split(separator) if separator else [text]
        for part in parts:
            if part.strip():
                yield part.strip() if separator else part


def tokenize_blocks(
    tokenizer: Any,
    documents: Iterable[str],
    *,
    samples: int = DEFAULT_SAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (input_ids, attention_mask), each (n_blocks, seqlen), from a stream of documents."""
    if samples < 1 or seqlen < 2:
        raise UsageError(f"need at least 1 sample of at least 2 tokens, got {samples} × {seqlen}")
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    want = samples * seqlen
    stream: list[int] = []
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        stream.extend(([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else []))
        if len(stream) >= want:
            break
    if not stream:
        raise UsageError("the calibration data tokenized to no tokens")
    stream = stream[:want]
    n_blocks = -(-len(stream) // seqlen)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    ids = torch.full((n_blocks * seqlen,), pad, dtype=torch.long)
    mask = torch.zeros(n_blocks * seqlen, dtype=torch.long)
    ids[: len(stream)] = torch.tensor(stream, dtype=torch.long)
    mask[: len(stream)] = 1
    if len(stream) < want:
        log.warning(
            "calibration data holds %d tokens, fewer than the %d asked (%d × %d)", len(stream), want, samples, seqlen
        )
    return ids.view(n_blocks, seqlen), mask.view(n_blocks, seqlen)


def batches(input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """Split blocks into model-keyword batches."""
    if batch_size < 1:
        raise UsageError(f"batch size must be >= 1, got {batch_size}")
    return [
        {"input_ids": input_ids[i : i + batch_size], "attention_mask": attention_mask[i : i + batch_size]}
        for i in range(0, input_ids.shape[0], batch_size)
    ]
