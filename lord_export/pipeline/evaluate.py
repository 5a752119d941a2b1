"""Perplexity of a causal LM on documents (windows from :func:`lord_export.calibration.data.evaluation_windows`);
the pipeline's own measure of a model (healing, the recipe's stage reports) and ``lord-export eval``'s.

Windowing: every document is tokenized on its own, started with BOS when the tokenizer has one,
and cut into non-overlapping windows of at most ``window`` tokens (stride = window); each window
starts fresh (no context carried over), and every token but a window's first is predicted.
Perplexity = exp(total NLL / predicted tokens). Windows are batched with right padding that is
masked out, so the result does not depend on ``batch_size``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..device import model_device
from ..errors import UsageError


@dataclass
class Perplexity:
    tokens: int
    nll: float

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    def to_dict(self) -> dict[str, float]:
        return {"tokens": self.tokens, "nll": self.nll, "perplexity": self.perplexity}


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: Sequence[Sequence[int]], *, batch_size: int = 8, pad_id: int = 0, progress: bool = False
) -> Perplexity:
    """Sum the next-token NLL of ``model`` over ``windows`` (see module docstring)."""
    if not windows:
        raise UsageError("evaluation data has no window of at least 2 tokens")
    model.eval()
    device = model_device(model)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))  # less padding per batch
    starts = range(0, len(order), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="evaluate", unit="batch")
    nll, count = 0.0, 0
    for s in starts:
        chunk = [windows[i] for i in order[s : s + batch_size]]
        width = max(len(w) for w in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, w in enumerate(chunk):
            ids[row, : len(w)] = torch.tensor(w)
            mask[row, : len(w)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.double()
        target = ids[:, 1:].to(device)
        keep = mask[:, 1:].bool().to(device)
        lp = F.cross_entropy(logits[:, :-1].transpose(1, 2), target, reduction="none")
        nll += float(lp[keep].sum())
        count += int(keep.sum())
    return Perplexity(tokens=count, nll=nll)
