"""What runs after the block-by-block compression of a model directory, on the whole compressed model:
the end-to-end fine-tune stage, the measured effect of every stage, and a sanity check users can read.

All of it is measured on the HELD-OUT slice of the calibration data (the last calibration blocks,
never fitted on; ``CalibrationOptions.holdout``): no evaluation data is ever used to build the model.

* :func:`stage_report` — perplexity of the dense and the compressed model on the held-out blocks;
* :func:`finetune` — the end-to-end stage: :func:`lord_export.pipeline.heal.heal` of the factors with
  the dense model as the teacher (KL of the logits and every block's hidden states), on the fitting
  blocks, in float32;
* :func:`continuations` — greedy continuations of prompts taken from the held-out blocks, dense vs
  compressed, and whether the compressed ones look degenerate (a model that answers code with
  ``'\\n   \\n\\n.'`` is broken whatever its perplexity).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from .evaluate import perplexity
from .heal import HealConfig, heal

#: The fine-tune stage's recipe (measured on the reference model, benchmarks/RESULTS.md: the factors
#: trained, the KL to the dense model's logits and its per-block hidden states, no LM term).
FINETUNE = dict(mode="factors", lr=1e-4, lm_weight=0.0, distill_weight=1.0, hidden_weight=5.0)
#: Sequences per fine-tune step (2 × 512 tokens by default): the step's cost is the student's forward and
#: backward plus the teacher's forward, so fewer tokens per step buys more steps on fresh text in the same
#: time, and keeps the logits of a wide vocabulary (KL terms of tokens × vocab floats) small.
FINETUNE_ROWS = 2
#: Models up to this many parameters get the stage report and the sanity check by default (both load
#: the dense and the compressed model whole).
MEASURE_UP_TO = 3_000_000_000


def holdout_windows(held: Any) -> list[list[int]]:
    """The held-out calibration blocks as evaluation windows (their real tokens)."""
    out = []
    for ids, mask in zip(held.input_ids, held.attention_mask, strict=True):
        tokens = ids[mask.bool()].tolist()
        if len(tokens) >= 2:
            out.append(tokens)
    return out


def held_out_perplexity(model: nn.Module, windows: Sequence[Sequence[int]], pad_id: int, batch_size: int) -> float:
    return perplexity(model, windows, batch_size=batch_size, pad_id=pad_id).perplexity


def stage_report(dense_ppl: float, stages: list[tuple[str, float, float]]) -> list[dict[str, Any]]:
    """Rows of (stage, held-out perplexity, its increase over dense, seconds the stage took)."""
    rows = [{"stage": "dense", "perplexity": dense_ppl, "increase": 0.0, "seconds": 0.0}]
    for name, ppl, seconds in stages:
        rows.append({"stage": name, "perplexity": ppl, "increase": ppl / dense_ppl - 1, "seconds": round(seconds, 3)})
    return rows


def finetune(
    model: nn.Module, teacher: nn.Module, batches: Sequence[dict], steps: int, device: Any, progress: bool = False
) -> dict[str, Any]:
    """The end-to-end stage: ``steps`` AdamW steps of the LoRD factors against the dense ``teacher``."""
    return heal(model, batches, HealConfig(steps=steps, **FINETUNE), distill_model=teacher, device=device,
                progress=progress)  # fmt: skip


def finetune_batches(calib_set: Any) -> tuple[list[dict], str]:
    """The fine-tune stage's batches of :data:`FINETUNE_ROWS` sequences, and what they are: the fresh
    blocks read for it after the calibration blocks, or (when the files held no more text) the fitted
    calibration blocks again, which recovers much less (benchmarks/RESULTS.md, Healing recovery)."""
    from ..calibration.data import batches

    fresh = getattr(calib_set, "finetune", None)
    source = fresh if fresh is not None and fresh.tokens else calib_set
    data = batches(source.input_ids, source.attention_mask, FINETUNE_ROWS)
    if source is calib_set:
        return data, f"the {calib_set.tokens:,} fitted calibration tokens again (the files hold no fresh text)"
    return data, f"{fresh.tokens:,} fresh tokens read after the calibration blocks"


def prompts_from(held: Any, n: int, length: int = 24) -> list[list[int]]:
    """``n`` prompts of ``length`` tokens, starting at evenly spaced places of the held-out tokens."""
    stream = [tok for row in holdout_windows(held) for tok in row]
    if len(stream) < length + 1 or n < 1:
        return []
    span = len(stream) - length
    return [stream[i * span // n : i * span // n + length] for i in range(n)]


@torch.no_grad()
def continuations(
    dense: nn.Module, lord: nn.Module, tokenizer: Any, prompts: Sequence[Sequence[int]], new_tokens: int = 24
) -> dict[str, Any]:
    """Greedy continuations of ``prompts``, dense vs compressed; ``degenerate`` when the compressed ones
    repeat a few tokens or are mostly whitespace and punctuation while the dense ones are not."""
    rows = []
    pad = getattr(tokenizer, "pad_token_id", None) or getattr(tokenizer, "eos_token_id", None) or 0
    for prompt in prompts:
        ids = torch.tensor([list(prompt)])
        outs = {}
        for name, model in (("dense", dense), ("compressed", lord)):
            device = next(model.parameters()).device
            ids_on = ids.to(device)
            out = model.generate(
                ids_on, attention_mask=torch.ones_like(ids_on), max_new_tokens=new_tokens, do_sample=False,
                pad_token_id=pad,
            )  # fmt: skip
            new = out[0, ids.shape[1] :].tolist()
            outs[name] = {"tokens": new, "text": tokenizer.decode(new), "looks_degenerate": _degenerate(tokenizer, new)}
        agreement = sum(a == b for a, b in zip(outs["dense"]["tokens"], outs["compressed"]["tokens"], strict=False))
        rows.append(
            {
                "prompt": tokenizer.decode(list(prompt)),
                "dense": outs["dense"]["text"],
                "compressed": outs["compressed"]["text"],
                "same_tokens": agreement / max(len(outs["dense"]["tokens"]), 1),
                "compressed_looks_degenerate": outs["compressed"]["looks_degenerate"],
                "dense_looks_degenerate": outs["dense"]["looks_degenerate"],
            }
        )
    bad = [r for r in rows if r["compressed_looks_degenerate"] and not r["dense_looks_degenerate"]]
    return {"prompts": rows, "degenerate": bool(rows) and len(bad) * 2 >= len(rows)}


def _degenerate(tokenizer: Any, tokens: list[int]) -> bool:
    """A continuation that repeats a handful of tokens, or is mostly whitespace and punctuation."""
    if not tokens:
        return True
    text = tokenizer.decode(tokens)
    words = sum(ch.isalnum() for ch in text)
    return len(set(tokens)) <= max(2, len(tokens) // 6) or words < 0.2 * max(len(text.strip()), 1)


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
