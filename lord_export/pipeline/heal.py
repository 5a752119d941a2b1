"""Healing: a short fine-tune of a LoRD model that leaves its ranks and structure unchanged.

Two modes, both ending in a plain LoRD model (same module types, names and shapes), so
``save_compressed`` / ``load``, the FX graph pass and the ONNX exporter work on the result:

* ``mode="lora"``: PEFT LoRA on every LoRD member (``q_proj``, ``gate_proj``, … — the adapter
  reads the shared bottleneck, see :mod:`lord_export.peft_support`), then ``merge_and_unload``:
  the delta lora_B·lora_A·scaling (d_out × r) merges into each up-projection exactly. Memory:
  optimizer state for the adapters only. Needs ``peft``.
* ``mode="factors"``: train the LoRD factors themselves (shared bottlenecks B, up-projections A,
  member biases), everything else frozen. More trainable parameters, no extra dependency, and the
  bottlenecks move too.

Loss: next-token cross-entropy on the batches (padding masked out through ``attention_mask``),
plus, with ``distill_model`` (e.g. the dense model the LoRD model came from), ``distill_weight``
times the token-mean KL(teacher ‖ student) of the logits at ``temperature`` (the LM term is then
weighted by ``lm_weight``; 0 gives pure distillation), plus ``hidden_weight`` times the per-block
hidden-state distillation: the mean over the model's blocks of ‖h_student − h_teacher‖² / ‖h_teacher‖²
(summed over real tokens) of each block's output — a signal at every depth, where the error of the
factorized layers is made, not only at the logits.
"""

from __future__ import annotations

import itertools
import logging
import math
import resource
import sys
import time
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UsageError
from .modules import LordBottleneck, LordLinear

log = logging.getLogger(__name__)

MODES = ("lora", "factors")
SCHEDULES = ("cosine", "constant")


def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): a linear warmup over
    ``warmup`` steps (AdamW's first updates are sign-like, every weight moves by about lr, which
    is what undid the closed-form factors in the first heal runs), then constant or a cosine decay
    to zero at ``steps``."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def heal(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor] | torch.Tensor],
    *,
    steps: int,
    lr: float,
    lora_r: int = 8,
    mode: str = "lora",
    distill_model: nn.Module | None = None,
    distill_weight: float = 1.0,
    lm_weight: float = 1.0,
    hidden_weight: float = 0.0,
    temperature: float = 1.0,
    warmup_steps: int | None = None,
    schedule: str = "cosine",
    max_grad_norm: float | None = 1.0,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Fine-tune the LoRD ``model`` IN PLACE for ``steps`` optimizer steps (AdamW); return a report.

    One training loop with its setup and teardown (adapters added, then merged back) kept together,
    hence the length.

    ``batches`` (dicts of model kwargs with ``input_ids``, or input_ids tensors) are cycled. The
    report holds the loss curve (``loss``; ``lm_loss`` and ``kl`` per step), ``seconds``,
    ``peak_memory_bytes`` (CUDA peak allocated on a CUDA device, else the process's peak RSS) and
    the trainable parameter count. The model is left in eval mode, on ``device`` if given.
    ``hidden_weight`` > 0 (needs ``distill_model``) adds the per-block hidden-state term (module
    docstring). The learning rate follows :func:`lr_factor` (``warmup_steps`` default: a tenth of ``steps``);
    gradients are clipped to ``max_grad_norm`` (None: no clipping).
    """
    if mode not in MODES:
        raise UsageError(f"heal mode must be one of {MODES}, got {mode!r}")
    if hidden_weight < 0 or (hidden_weight > 0 and distill_model is None):
        raise UsageError(f"hidden_weight must be >= 0 and needs a distill_model (got {hidden_weight})")
    if steps < 1 or lr <= 0:
        raise UsageError(f"heal needs steps >= 1 and lr > 0 (got steps={steps}, lr={lr})")
    if schedule not in SCHEDULES:
        raise UsageError(f"heal schedule must be one of {SCHEDULES}, got {schedule!r}")
    warmup = steps // 10 if warmup_steps is None else warmup_steps
    if not 0 <= warmup < steps:
        raise UsageError(f"heal needs 0 <= warmup_steps < steps (got warmup_steps={warmup}, steps={steps})")
    members = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LordLinear)})
    if not members:
        raise UsageError("the model has no LoRD layers to heal; compress it (or load a compressed one) first")
    data = list(batches)
    if not data:
        raise UsageError("heal needs at least one batch")
    requires_grad = {id(p): p.requires_grad for p in model.parameters()}
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    if distill_model is not None:
        distill_model.to(dev).eval().requires_grad_(False)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if use_cache is not None:
        config.use_cache = False

    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        from . import peft_support  # noqa: F401  (makes sure PEFT dispatches LoRD layers)

        trained = get_peft_model(model, LoraConfig(target_modules=members, r=lora_r, lora_alpha=2 * lora_r))
    else:
        trained = model
        model.requires_grad_(False)
        for m in model.modules():
            if isinstance(m, (LordBottleneck, LordLinear)):
                m.requires_grad_(True)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(i, steps, warmup, schedule))

    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    curve: dict[str, list[float]] = {"loss": [], "lm_loss": [], "kl": [], "hidden": []}
    hidden = hidden_weight > 0
    trained.train()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, desc=f"heal ({mode})", unit="step", file=sys.stderr)
    t0 = time.perf_counter()
    for batch in itertools.islice(itertools.cycle(data), steps):
        inputs = _inputs(batch, dev)
        out = trained(**inputs, output_hidden_states=hidden)
        logits = out.logits
        lm = _lm_loss(logits, inputs)
        loss = lm
        kl = mse = None
        if distill_model is not None:
            with torch.no_grad():
                teacher = distill_model(**inputs, output_hidden_states=hidden)
            kl = _kl(logits, teacher.logits, inputs.get("attention_mask"), temperature)
            loss = lm_weight * lm + distill_weight * kl
            if hidden:
                mse = _hidden_mse(out.hidden_states, teacher.hidden_states, inputs.get("attention_mask"))
                loss = loss + hidden_weight * mse
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        curve["loss"].append(loss.item())
        curve["lm_loss"].append(lm.item())
        if kl is not None:
            curve["kl"].append(kl.item())
        if mse is not None:
            curve["hidden"].append(mse.item())
        if bar is not None:
            bar.set_postfix(loss=f"{curve['loss'][-1]:.4f}", refresh=False)
            bar.update(1)
    if bar is not None:
        bar.close()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0

    if mode == "lora":
        trained.merge_and_unload()  # restores the LoRD modules in ``model``, adapters merged into A
    for p in model.parameters():
        p.requires_grad_(requires_grad.get(id(p), True))
    model.eval()
    if use_cache is not None:
        config.use_cache = use_cache
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"
    report = {
        "mode": mode,
        "steps": steps,
        "lr": lr,
        "schedule": schedule,
        "warmup_steps": warmup,
        "max_grad_norm": max_grad_norm,
        "lora_r": lora_r if mode == "lora" else None,
        "distill": distill_model is not None,
        "hidden_weight": hidden_weight,
        "trainable_params": sum(p.numel() for p in params),
        "first_loss": curve["loss"][0],
        "last_loss": curve["loss"][-1],
        **{k: v for k, v in curve.items() if v},
        "seconds": round(seconds, 3),
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": kind,
        "device": str(dev),
    }
    log.info("healed (%s) %d steps: loss %.4f -> %.4f", mode, steps, report["first_loss"], report["last_loss"])
    return report


def _inputs(batch: dict[str, torch.Tensor] | torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        batch = {"input_ids": batch}
    if "input_ids" not in batch:
        raise UsageError("heal batches need input_ids")
    keep = ("input_ids", "attention_mask")
    return {k: v.to(device) for k, v in batch.items() if k in keep}


def _lm_loss(logits: torch.Tensor, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    labels = inputs["input_ids"][:, 1:]
    mask = inputs.get("attention_mask")
    if mask is not None:
        labels = labels.masked_fill(mask[:, 1:] == 0, -100)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100)


def _kl(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor | None, t: float) -> torch.Tensor:
    log_p = F.log_softmax(teacher.float() / t, dim=-1)
    log_q = F.log_softmax(student.float() / t, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1) * (t * t)
    if mask is None:
        return per_token.mean()
    w = mask.to(per_token.dtype)
    return (per_token * w).sum() / w.sum().clamp_min(1)


def _hidden_mse(student: tuple, teacher: tuple, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over blocks of ‖h_s − h_t‖² / ‖h_t‖² on real tokens (index 0, the embeddings, is skipped)."""
    terms = []
    for hs, ht in zip(student[1:], teacher[1:], strict=True):
        diff = (hs.float() - ht.float()).pow(2).sum(-1)
        ref = ht.float().pow(2).sum(-1)
        if mask is not None:
            w = mask.to(diff.dtype)
            diff, ref = diff * w, ref * w
        terms.append(diff.sum() / ref.sum().clamp_min(1e-12))
    return torch.stack(terms).mean()
