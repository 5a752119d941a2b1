"""The one data path for calibration and evaluation: files → documents → tokens → blocks or windows.

Reading: files and folders (recursively; hidden, empty and binary files in folders are skipped)
in sorted path order, each file one document, or split into documents on a separator string.

Calibration (:func:`calibration_set`) matches how the model is used. Causal LMs (packing): each
document starts with the tokenizer's BOS token and ends with EOS when it has them; documents are
concatenated into one stream and cut into ``samples`` blocks of ``seqlen`` tokens (defaults
``DEFAULT_SAMPLES`` × ``DEFAULT_SEQLEN``, the sequence length capped at the model's maximum
positions); when the data holds fewer tokens, the last block is padded. Encoders (BERT-style,
bidirectional; no packing): one document per sequence with the tokenizer's own special tokens
([CLS] … [SEP]), a long document cut into several sequences, padded to ``seqlen`` — packing
unrelated texts into one sequence would let every token attend to other documents, which an encoder
never sees in use. Padding is masked out (``attention_mask`` 0) and never enters the statistics.

Which text (``sampling``): ``"spread"`` (the default) takes ``seqlen``-token windows evenly spaced
over ALL the documents (when the files hold far more text than asked, over an evenly spread subset of
the files: :data:`READ_BYTES_PER_TOKEN`), in corpus order; ``"sequential"`` takes the first tokens
of the files in path order. Measured: 64 × 512 sequential tokens of the standard library's
calibration split are two files (most of them ``_pydecimal.py``), and a model fitted to them
generalizes worse to other files than one fitted to the same number of spread tokens.

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
SAMPLINGS = ("spread", "sequential")
#: With spread sampling, the files read are capped at about this many bytes per wanted token (≈ 16×
#: the tokens asked for, at ~4 bytes a token); beyond it an evenly spread subset of the files is read.
READ_BYTES_PER_TOKEN = 64


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


def spread_order(n: int) -> Iterator[int]:
    """The indices 0..n-1, each once, in an order whose every prefix is spread evenly over the range
    (the van der Corput sequence: 0, n/2, n/4, 3n/4, …)."""
    seen: set[int] = set()
    bits = max(1, (n - 1).bit_length())
    for i in range(1 << bits):
        fraction = int(format(i, f"0{bits}b")[::-1], 2) / (1 << bits)
        index = int(fraction * n)
        if index not in seen:
            seen.add(index)
            yield index


def files_to_read(files: Sequence[Path], budget_bytes: int) -> list[Path]:
    """``files``, or when they hold more than ``budget_bytes``, an evenly spread subset (in path order)
    holding about that much."""
    sizes = [f.stat().st_size for f in files]
    if sum(sizes) <= budget_bytes:
        return list(files)
    chosen, total = [], 0
    for i in spread_order(len(files)):
        chosen.append(i)
        total += sizes[i]
        if total >= budget_bytes:
            break
    return [files[i] for i in sorted(chosen)]


def evenly_spaced(lengths: Sequence[int], want: int, among: Sequence[int]) -> list[int]:
    """The fewest evenly spaced entries of ``among`` (indices into ``lengths``) whose lengths add up
    to at least ``want`` (all of them when they hold less), in order."""
    n = len(among)
    total = sum(lengths[i] for i in among)
    if total <= want:
        return list(among)
    k = max(1, min(n, math.ceil(want / max(lengths[i] for i in among))))  # the fewest that could do
    while True:
        picked = [among[(2 * j + 1) * n // (2 * k)] for j in range(k)]  # centred: both ends alike
        got = sum(lengths[i] for i in picked)
        if got >= want or k == n:
            return picked
        k = min(n, k + max(1, math.ceil((want - got) * n / total)))


def document_stream_windows(tokenizer: Any, documents: Iterable[str], seqlen: int) -> list[list[int]]:
    """Every document as BOS + tokens + EOS (those the tokenizer has), cut every ``seqlen`` tokens."""
    bos = getattr(tokenizer, "bos_token_id", None)
    eos = getattr(tokenizer, "eos_token_id", None)
    windows: list[list[int]] = []
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        ids = ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
        windows.extend(ids[i : i + seqlen] for i in range(0, len(ids), seqlen))
    return windows


def spread_blocks(
    tokenizer: Any,
    documents: Iterable[str],
    *,
    samples: int = DEFAULT_SAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
    fresh: int = 0,
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """((input_ids, attention_mask) of ``samples`` blocks packed from ``seqlen``-token windows evenly
    spaced over all the documents, the same for ``fresh`` further blocks from the windows not taken,
    or None when ``fresh`` is 0 or nothing is left): see the module docstring."""
    if samples < 1 or seqlen < 2:
        raise UsageError(f"need at least 1 sample of at least 2 tokens, got {samples} × {seqlen}")
    windows = document_stream_windows(tokenizer, documents, seqlen)
    if not windows:
        raise UsageError("the calibration data tokenized to no tokens")
    lengths = [len(w) for w in windows]
    taken = evenly_spaced(lengths, samples * seqlen, range(len(windows)))
    blocks = _pack(tokenizer, [windows[i] for i in taken], samples, seqlen, warn=True)
    if fresh < 1:
        return blocks, None
    used = set(taken)
    rest = [i for i in range(len(windows)) if i not in used]
    if not rest:
        return blocks, None
    more = evenly_spaced(lengths, fresh * seqlen, rest)
    return blocks, _pack(tokenizer, [windows[i] for i in more], fresh, seqlen, warn=False)


def _pack(
    tokenizer: Any, windows: Sequence[Sequence[int]], samples: int, seqlen: int, *, warn: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (n_blocks, seqlen): the windows concatenated, cut at
    ``samples × seqlen`` tokens, the last block padded and masked."""
    want = samples * seqlen
    stream = [t for w in windows for t in w][:want]
    n_blocks = -(-len(stream) // seqlen)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else (eos if eos is not None else 0)
    ids = torch.full((n_blocks * seqlen,), pad, dtype=torch.long)
    mask = torch.zeros(n_blocks * seqlen, dtype=torch.long)
    ids[: len(stream)] = torch.tensor(stream, dtype=torch.long)
    mask[: len(stream)] = 1
    if warn and len(stream) < want:
        log.warning(
            "calibration data holds %d tokens, fewer than the %d asked (%d × %d)", len(stream), want, samples, seqlen
        )
    return ids.view(n_blocks, seqlen), mask.view(n_blocks, seqlen)


def tokenize_blocks(
    tokenizer: Any,
    documents: Iterable[str],
    *,
    samples: int = DEFAULT_SAMPLES,
    seqlen: int = DEFAULT_SEQLEN,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (input_ids, attention_mask), each (n_blocks, seqlen): the first ``samples × seqlen``
    tokens of the documents' stream (sequential sampling)."""
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
    return _pack(tokenizer, [stream], samples, seqlen, warn=True)


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
    sampling: str = "spread"  # which text: windows spread over all documents, or the first tokens

    def __post_init__(self) -> None:
        if self.samples is not None and int(self.samples) < 1:
            raise UsageError(f"calibration samples must be >= 1, got {self.samples}")
        if self.seqlen is not None and int(self.seqlen) < 2:
            raise UsageError(f"calibration sequence length must be >= 2, got {self.seqlen}")
        if int(self.batch_size) < 1:
            raise UsageError(f"batch size must be >= 1, got {self.batch_size}")
        if not 0 <= float(self.holdout) < 1:
            raise UsageError(f"the held-out share must be in [0, 1), got {self.holdout}")
        if self.sampling not in SAMPLINGS:
            raise UsageError(f"calibration sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}")


@dataclass
class CalibrationSet:
    """Tokenized calibration data: (n_blocks, seqlen) ids and mask, and what they came from."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    seqlen: int
    batch_size: int
    paths: list[str]
    separator: str | None
    #: blocks of other text from the same files, for the fine-tune stage (None: none asked or left)
    finetune: CalibrationSet | None = None
    sampling: str = "spread"

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
            "sampling": self.sampling,
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
        return dataclasses.replace(self, input_ids=ids, attention_mask=mask, finetune=None)

    def head_with_fresh(self, n: int) -> CalibrationSet:
        """The first ``n`` blocks, with the rest (if any) as their ``finetune`` blocks."""
        head, rest = self.head(n)
        head.finetune = rest
        return head

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
    fresh_samples: int = 0,
) -> CalibrationSet:
    """Read, tokenize and block the calibration data (see the module docstring). With ``fresh_samples``
    the set's ``finetune`` holds that many further blocks of text no calibration block holds (None when
    the files have none left)."""
    options = options or CalibrationOptions()
    seqlen = resolve_seqlen(options.seqlen, max_positions, default_seqlen)
    if options.samples is None:
        options = dataclasses.replace(options, samples=DEFAULT_SAMPLES)
    samples, fresh = options.samples, max(0, int(fresh_samples))
    if options.sampling == "sequential":
        docs = read_documents(paths, options.separator)
        if options.packing is False:
            ids, mask = tokenize_documents(tokenizer, docs, samples=samples + fresh, seqlen=seqlen)
        else:
            ids, mask = tokenize_blocks(tokenizer, docs, samples=samples + fresh, seqlen=seqlen)
        return _calibration_set(ids, mask, seqlen, options, paths).head_with_fresh(samples)
    files = files_to_read(text_files(paths), READ_BYTES_PER_TOKEN * (samples + fresh) * seqlen)
    docs = read_documents(files, options.separator)
    spread = spread_documents if options.packing is False else spread_blocks
    (ids, mask), more = spread(tokenizer, docs, samples=samples, seqlen=seqlen, fresh=fresh)
    out = _calibration_set(ids, mask, seqlen, options, paths)
    out.finetune = _calibration_set(*more, seqlen, options, paths) if more is not None else None
    return out


def _calibration_set(ids, mask, seqlen, options, paths) -> CalibrationSet:
    paths = [str(p) for p in paths]
    return CalibrationSet(ids, mask, seqlen, options.batch_size, paths, options.separator, sampling=options.sampling)


def tokenize_documents(
    tokenizer: Any, documents: Iterable[str], *, samples: int = DEFAULT_SAMPLES, seqlen: int = DEFAULT_SEQLEN
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), each (n, seqlen): one document per sequence with the tokenizer's
    special tokens, long documents cut into several sequences, right-padded and masked; the first
    ``samples`` sequences."""
    return _rows_to_tensors(tokenizer, document_rows(tokenizer, documents, seqlen, limit=samples), seqlen)


def document_rows(tokenizer: Any, documents: Iterable[str], seqlen: int, *, limit: int | None) -> list[list[int]]:
    """The encoder sequences of the documents (each with the tokenizer's special tokens, a long document
    cut into several), at most ``limit`` of them (None: all)."""
    if (limit is not None and limit < 1) or seqlen < 3:
        raise UsageError(f"need at least 1 sample of at least 3 tokens, got {limit} × {seqlen}")
    prefix, suffix = special_tokens_around(tokenizer)
    body = seqlen - len(prefix) - len(suffix)
    rows: list[list[int]] = []
    for doc in documents:
        ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
        for i in range(0, len(ids), body):
            rows.append(prefix + list(ids[i : i + body]) + suffix)
            if len(rows) == limit:
                return rows
    if not rows:
        raise UsageError("the calibration data tokenized to no tokens")
    return rows


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a single sequence (BERT: [CLS] and [SEP]), read off
    what it does to a probe text (transformers 5's fast tokenizers have no build_inputs_with_special_tokens)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    full = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if plain and full[i : i + len(plain)] == plain:
            return full[:i], full[i + len(plain) :]
    return [], []


def _rows_to_tensors(tokenizer: Any, rows: Sequence[Sequence[int]], seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = pad if pad is not None else 0
    out = torch.full((len(rows), seqlen), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), seqlen, dtype=torch.long)
    for r, ids in enumerate(rows):
        out[r, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        mask[r, : len(ids)] = 1
    return out, mask


def spread_documents(
    tokenizer: Any, documents: Iterable[str], *, samples: int, seqlen: int, fresh: int = 0
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """:func:`spread_blocks` for encoders: ``samples`` document sequences evenly spaced over all of them,
    and ``fresh`` more from the rest (None when 0 or nothing is left)."""
    rows = document_rows(tokenizer, documents, seqlen, limit=None)
    ones = [1] * len(rows)
    taken = evenly_spaced(ones, samples, range(len(rows)))
    first = _rows_to_tensors(tokenizer, [rows[i] for i in taken], seqlen)
    used = set(taken)
    rest = [i for i in range(len(rows)) if i not in used]
    if fresh < 1 or not rest:
        return first, None
    return first, _rows_to_tensors(tokenizer, [rows[i] for i in evenly_spaced(ones, fresh, rest)], seqlen)


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
