"""The one data path for calibration and evaluation: files → documents → tokens → blocks or windows.

Reading: files and folders (recursively; hidden, empty and binary files in folders are skipped)
in sorted path order, each file one document, or split into documents on a separator string.

Calibration (:func:`calibration_set`) matches how the model is used. Causal LMs (packing): each
document starts with the tokenizer's BOS token and ends with EOS when it has them; documents are
concatenated into one stream and cut into ``samples`` consecutive blocks of ``seqlen`` tokens
(defaults ``DEFAULT_SAMPLES`` × ``DEFAULT_SEQLEN``, the sequence length capped at the model's
maximum positions); when the data holds fewer tokens, the last block is padded. Encoders
(BERT-style, bidirectional; no packing): one document per sequence with the tokenizer's own special
tokens ([CLS] … [SEP]), a long document cut into several sequences, padded to ``seqlen`` —
packing unrelated texts into one sequence would let every token attend to other documents, which
an encoder never sees in use. Padding is masked out (``attention_mask`` 0) and never enters the
statistics.

Evaluation (:func:`evaluation_windows`): each document is tokenized on its own (BOS first) and cut
into non-overlapping windows (see :mod:`lord_export.pipeline.evaluate`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError

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


def resolve_seqlen(requested: int | None, max_positions: int | None, default: int = DEFAULT_SEQLEN) -> int:
    """The sequence length to use: ``requested``, or ``default`` capped at the model's positions.

    Raises UsageError when ``requested`` exceeds ``max_positions``.
    """
    if requested is None:
        return min(default, max_positions) if max_positions else default
    if max_positions is not None and requested > max_positions:
        raise UsageError(f"sequence length {requested} exceeds the model's {max_positions} positions")
    return requested


@dataclass(frozen=True)
class CalibrationOptions:
    """How calibration text becomes model batches; validated on construction."""

    samples: int | None = DEFAULT_SAMPLES  # None: sized to the model (:func:`samples_for`)
    seqlen: int | None = None  # None: DEFAULT_SEQLEN or the model's maximum positions, whichever is smaller
    separator: str | None = None
    batch_size: int = 8
    packing: bool | None = None  # None: pack for causal LMs, one document per sequence for encoders
    holdout: float = 0.0  # the share of the blocks held out from fitting, to measure the result on

    def __post_init__(self) -> None:
        if self.samples is not None and int(self.samples) < 1:
            raise UsageError(f"calibration samples must be >= 1, got {self.samples}")
        if self.seqlen is not None and int(self.seqlen) < 2:
            raise UsageError(f"calibration sequence length must be >= 2, got {self.seqlen}")
        if int(self.batch_size) < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 <= float(self.holdout) < 1:
            raise UsageError(f"the held-out share must be in [0, 1), got {self.holdout}")


@dataclass
class CalibrationSet:
    """Tokenized calibration data: (n_blocks, seqlen) ids and mask, and what they came from."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    seqlen: int
    batch_size: int
    paths: list[str]
    separator: str | None
    #: blocks read after these from the same files for the fine-tune stage (None: none asked)
    finetune: CalibrationSet | None = None

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def batches(self) -> list[dict[str, torch.Tensor]]:
        return batches(self.input_ids, self.attention_mask, self.batch_size)

    def describe(self) -> dict:
        return {
            "paths": list(self.paths),
            "samples": int(self.input_ids.shape[0]),
            "seqlen": self.seqlen,
            "separator": self.separator,
            "tokens_in_blocks": self.tokens,
        }

    def head(self, n: int) -> tuple[CalibrationSet, CalibrationSet | None]:
        """(the first ``n`` blocks, the rest or None when nothing is left)."""
        rows = int(self.input_ids.shape[0])
        if n >= rows:
            return self, None
        return self._rows(slice(0, n)), self._rows(slice(n, rows))

    def _rows(self, rows: slice) -> CalibrationSet:
        ids, mask = self.input_ids[rows], self.attention_mask[rows]
        return CalibrationSet(ids, mask, self.seqlen, self.batch_size, self.paths, self.separator)

    def split(self, holdout: float) -> tuple[CalibrationSet, CalibrationSet | None]:
        """(the blocks to fit on, the last ``max(1, round(holdout × blocks))`` blocks held out for measuring
        the result: never fitted on). ``holdout`` 0, or a single block, holds nothing out."""
        n = int(self.input_ids.shape[0])
        held = 0 if holdout <= 0 or n < 2 else max(1, min(n - 1, round(holdout * n)))
        if not held:
            return self, None
        return self._rows(slice(0, n - held)), self._rows(slice(n - held, n))


def calibration_set(
    tokenizer: Any,
    paths: Sequence[str | Path],
    options: CalibrationOptions | None = None,
    *,
    max_positions: int | None = None,
    default_seqlen: int = DEFAULT_SEQLEN,
) -> CalibrationSet:
    """Read, tokenize and block the calibration data (see the module docstring)."""
    options = options or CalibrationOptions()
    seqlen = resolve_seqlen(options.seqlen, max_positions, default_seqlen)
    if options.samples is None:
        options = dataclasses.replace(options, samples=DEFAULT_SAMPLES)
    docs = read_documents(paths, options.separator)
    if options.packing is False:
        ids, mask = tokenize_documents(tokenizer, docs, samples=options.samples, seqlen=seqlen)
    else:
        ids, mask = tokenize_blocks(tokenizer, docs, samples=options.samples, seqlen=seqlen)
    return CalibrationSet(ids, mask, seqlen, options.batch_size, [str(p) for p in paths], options.separator)


def tokenize_documents(
    tokenizer: Any, documents: Iterable[str], *, samples: int = DEFAULT_SAMPLES, seqlen: int = DEFAULT_SEQLEN
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (n, seqlen): one document per sequence with the tokenizer's
    special tokens, long documents cut into several sequences, right-padded and masked."""
    if samples < 1 or seqlen < 3:
        raise UsageError(f"need at least 1 sample of at least 3 tokens, got {samples} × {seqlen}")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else 0
    body = seqlen - tokenizer.num_special_tokens_to_add(pair=False)
    rows: list[list[int]] = []
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), body):
            rows.append(tokenizer.build_inputs_with_special_tokens(ids[i : i + body]))
            if len(rows) == samples:
                break
        if len(rows) == samples:
            break
    if not rows:
        raise UsageError("the calibration data tokenized to no tokens")
    out = torch.full((len(rows), seqlen), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), seqlen, dtype=torch.long)
    for r, ids in enumerate(rows):
        out[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[r, : len(ids)] = 1
    return out, mask


#: Calibration tokens per feature of the widest targeted input the default size aims at: a d × d
#: covariance estimated from n tokens is full rank only for n ≥ d, and its small eigen-directions settle
#: at a few times d. Runs under :data:`TOKENS_PER_FEATURE_WARN` are warned about.
TOKENS_PER_FEATURE = 4
TOKENS_PER_FEATURE_WARN = 2


def samples_for(widest_input: int, seqlen: int) -> int:
    """The default number of calibration blocks for a model whose widest targeted input has
    ``widest_input`` features: :data:`DEFAULT_SAMPLES`, or more to reach :data:`TOKENS_PER_FEATURE`
    tokens per feature."""
    return max(DEFAULT_SAMPLES, -(-TOKENS_PER_FEATURE * widest_input // seqlen))


def calibration_size_warning(tokens: int, widest_input: int) -> str | None:
    """A warning when ``tokens`` calibration tokens are under :data:`TOKENS_PER_FEATURE_WARN` per feature
    of the widest targeted input (None when enough)."""
    if tokens >= TOKENS_PER_FEATURE_WARN * widest_input:
        return None
    return (
        f"calibration has {tokens:,} tokens for inputs up to {widest_input:,} features wide "
        f"({tokens / widest_input:.1f} per feature): the covariances of the widest inputs are poorly estimated and "
        f"the factors lose quality; use at least {TOKENS_PER_FEATURE * widest_input:,} tokens (more samples)"
    )


def uses_packing(config: Any) -> bool:
    """Whether a model of this (transformers) config is calibrated on packed blocks: causal LMs yes,
    bidirectional encoders (BERT-style: not a decoder, no CausalLM architecture) no."""
    archs = " ".join(getattr(config, "architectures", None) or [])
    if "CausalLM" in archs or "LMHead" in archs or getattr(config, "is_decoder", False):
        return True
    return getattr(config, "model_type", "") not in ENCODER_MODEL_TYPES


#: Model types calibrated one document per sequence (bidirectional encoders).
ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "mpnet", "camembert"}
)


def document_windows(tokenizer: Any, documents: Iterable[str], window: int) -> list[list[int]]:
    """Token windows (each of at least 2 tokens) of the documents: each document tokenized on its
    own with BOS first when the tokenizer has one, cut every ``window`` tokens (no overlap)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    out: list[list[int]] = []
    for doc in documents:
        ids = ([bos] if bos is not None else []) + list(tokenizer(doc, add_special_tokens=False)["input_ids"])
        for i in range(0, len(ids), window):
            chunk = ids[i : i + window]
            if len(chunk) >= 2:
                out.append(chunk)
    return out


def subsample_windows(windows: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Evenly spaced windows holding about ``max_tokens`` tokens, spread over all documents (the same
    ones on every run: a token budget for evaluation that still sees every part of the data)."""
    total = sum(len(w) for w in windows)
    if total <= max_tokens:
        return windows
    keep = max(1, math.floor(len(windows) * max_tokens / total))
    return [windows[int(i * len(windows) / keep)] for i in range(keep)]


def evaluation_windows(
    tokenizer: Any,
    paths: Sequence[str | Path],
    window: int,
    *,
    separator: str | None = None,
    max_positions: int | None = None,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """The evaluation windows of ``paths`` (at most about ``max_tokens`` tokens of them, evenly spaced:
    :func:`subsample_windows`); UsageError when the window exceeds the model's positions or the data
    holds fewer tokens than one window."""
    if window < 2:
        raise UsageError(f"the evaluation window must be at least 2 tokens, got {window}")
    if max_positions is not None and window > max_positions:
        raise UsageError(f"evaluation window {window} exceeds the model's {max_positions} positions")
    windows = document_windows(tokenizer, read_documents(paths, separator), window)
    total = sum(len(w) for w in windows)
    if total < window:
        raise UsageError(
            f"the evaluation data tokenizes to {total} tokens, fewer than one window of {window}; "
            "pass more data or a smaller window"
        )
    if max_tokens is not None:
        if max_tokens < window:
            raise UsageError(f"an evaluation budget of {max_tokens} tokens is less than one window of {window}")
        windows = subsample_windows(windows, max_tokens)
    return windows
