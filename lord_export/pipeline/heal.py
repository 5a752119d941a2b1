"""Healing: a short fine-tune of a LoRD model that leaves its ranks and structure unchanged.

Two modes, both ending in a plain LoRD model (same module types, names and shapes), so
``save_compressed`` / ``load``, the FX graph pass and the ONNX exporter work on the result:

* ``mode="lora"``: PEFT LoRA on every LoRD member (``q_proj``, ``gate_proj``, … — the adapter
  reads the shared bottleneck, see :mod:`lord_export.integrations.peft`), then ``merge_and_unload``:
  the delta lora_B·lora_A·scaling (d_out × r) merges into each up-projection exactly. Memory:
  optimizer state for the adapters only. Needs ``peft``.
* ``mode="factors"``: train the LoRD factors themselves (shared bottlenecks B, up-projections A,
  member biases), everything else frozen. More trainable parameters, no extra dependency, and the
  bottlenecks move too.

Loss: next-token cross-entropy on the batches (padding masked out through ``attention_mask``),
plus, with a teacher (``distill_model``, e.g. the dense model the LoRD model came from),
``distill_weight`` times the token-mean KL(teacher ‖ student) of the logits at ``temperature`` (the
LM term is then weighted by ``lm_weight``; 0 gives pure distillation), plus ``hidden_weight`` times
the per-block hidden-state distillation: the mean over the model's blocks of
‖h_student − h_teacher‖² / ‖h_teacher‖² (summed over real tokens) of each block's output — a signal
at every depth, where the error of the factorized layers is made, not only at the logits.

The training runs inside :func:`training_session`, which puts the model back as it was when anything
fails (adapters removed unmerged, factors restored, ``requires_grad``, ``use_cache`` and the
train/eval mode as before). :func:`heal_model_dir` is the directory-to-directory job of
``lord-export heal``.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import math
import resource
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_known_keys
from ..core.modules import LordBottleneck, LordLinear
from ..errors import UsageError
from ..progress import Say

log = logging.getLogger(__name__)

MODES = ("lora", "factors")
SCHEDULES = ("cosine", "constant")
#: Base learning rate per mode: larger rates lowered the training loss and raised held-out perplexity
#: (benchmarks/RESULTS.md, healing recovery).
DEFAULT_LR = {"lora": 1e-4, "factors": 1e-5}
HEAL_REPORT_FILE = "heal_report.json"


@dataclass
class HealConfig:
    """How to heal; every field validated on construction. Field help is in ``metadata["help"]``."""

    steps: int = field(default=100, metadata={"help": "optimizer steps (AdamW); batches are cycled"})
    lr: float | None = field(
        default=None,
        metadata={
            "help": f"learning rate (default: {DEFAULT_LR['lora']:g} for lora, {DEFAULT_LR['factors']:g} for factors)"
        },
    )
    mode: str = field(default="lora", metadata={"help": "lora (adapters merged back) or factors (the factors trained)"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (mode lora)"})
    distill_weight: float = field(default=1.0, metadata={"help": "weight of the KL to the teacher's logits"})
    lm_weight: float = field(default=1.0, metadata={"help": "weight of the LM loss (0: distillation alone)"})
    hidden_weight: float = field(
        default=0.0, metadata={"help": "weight of every block's hidden-state distillation (needs a teacher)"}
    )
    temperature: float = field(default=1.0, metadata={"help": "softmax temperature of the KL"})
    warmup_steps: int | None = field(default=None, metadata={"help": "linear warmup steps (default: steps // 10)"})
    schedule: str = field(default="cosine", metadata={"help": "after the warmup: cosine decay to zero, or constant"})
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "gradient clipping (None: off)"})

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise UsageError(f"heal mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"heal schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if int(self.steps) < 1:
            raise UsageError(f"heal needs steps >= 1, got {self.steps}")
        self.steps = int(self.steps)
        self.lr = DEFAULT_LR[self.mode] if self.lr is None else float(self.lr)
        if not self.lr > 0:
            raise UsageError(f"heal needs a learning rate > 0, got {self.lr}")
        if int(self.lora_r) < 1:
            raise UsageError(f"LoRA rank must be >= 1, got {self.lora_r}")
        for name in ("distill_weight", "lm_weight", "hidden_weight"):
            if getattr(self, name) < 0:
                raise UsageError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise UsageError(f"temperature must be > 0, got {self.temperature}")
        self.warmup_steps = self.steps // 10 if self.warmup_steps is None else int(self.warmup_steps)
        if not 0 <= self.warmup_steps < self.steps:
            raise UsageError(f"heal needs 0 <= warmup_steps < steps (got {self.warmup_steps}, steps {self.steps})")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise UsageError(f"max_grad_norm must be > 0 or None, got {self.max_grad_norm}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HealConfig:
        check_known_keys(d, (f.name for f in fields(cls)), "HealConfig field(s)")
        return cls(**d)

    def replace(self, **overrides: Any) -> HealConfig:
        if "mode" in overrides and "lr" not in overrides and self.lr == DEFAULT_LR[self.mode]:
            overrides["lr"] = None  # the new mode's default rate, unless a rate was chosen
        return HealConfig.from_dict({**self.to_dict(), **overrides})


def lr_factor(step: int, steps: int, warmup: int, schedule: str, floor: float = 0.0) -> float:
    """Multiplier of the base learning rate at optimizer step ``step`` (0-based): a linear warmup over
    ``warmup`` steps (AdamW's first updates are sign-like, every weight moves by about lr, which
    is what undid the closed-form factors in the first heal runs), then constant or a cosine decay
    to ``floor`` at ``steps`` (block refinement decays to a tenth)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lord_members(model: nn.Module) -> list[str]:
    """The leaf names of the model's LoRD members (what LoRA targets): ``q_proj``, ``gate_proj``, …"""
    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, LordLinear)})


@contextlib.contextmanager
def training_session(model: nn.Module, config: HealConfig) -> Iterator[nn.Module]:
    """The module to train (``model``, or its PEFT wrapper), with everything else frozen and the KV
    cache off. On success the LoRA adapters are merged into the factors; on any exception they are
    removed unmerged and trained factors get their values back. Either way ``requires_grad``,
    ``config.use_cache`` and the train/eval mode are restored (the model ends in eval mode)."""
    members = lord_members(model)
    if not members:
        raise UsageError("the model has no LoRD layers to heal; compress it (or load a compressed one) first")
    requires = {id(p): p.requires_grad for p in model.parameters()}
    hf_config = getattr(model, "config", None)
    use_cache = getattr(hf_config, "use_cache", None)
    saved: dict[int, torch.Tensor] = {}
    peft_model = None
    try:
        if use_cache is not None:
            hf_config.use_cache = False
        if config.mode == "lora":
            from peft import LoraConfig, get_peft_model

            from ..integrations.peft import register_lora

            lora = register_lora(LoraConfig(target_modules=members, r=config.lora_r, lora_alpha=2 * config.lora_r))
            trained = peft_model = get_peft_model(model, lora)
        else:
            trained = model
            model.requires_grad_(False)
            for m in model.modules():
                if isinstance(m, (LordBottleneck, LordLinear)):
                    for p in m.parameters(recurse=False):
                        saved[id(p)] = p.detach().clone()
                        p.requires_grad_(True)
        trained.train()
        yield trained
        if peft_model is not None:
            peft_model.merge_and_unload()  # restores the LoRD modules in ``model``, adapters merged into A
            peft_model = None
        saved.clear()
    finally:
        if peft_model is not None:
            peft_model.unload()  # the adapters go, unmerged: the factors are as they were
        if saved:
            with torch.no_grad():
                for p in model.parameters():
                    if id(p) in saved:
                        p.copy_(saved[id(p)])
        for p in model.parameters():
            p.requires_grad_(requires.get(id(p), True))
        if use_cache is not None:
            hf_config.use_cache = use_cache
        model.eval()


def heal(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor] | torch.Tensor],
    config: HealConfig | None = None,
    *,
    distill_model: nn.Module | None = None,
    device: str | torch.device | None = None,
    progress: bool = False,
    **overrides: Any,
) -> dict[str, Any]:
    """Fine-tune the LoRD ``model`` IN PLACE for ``config.steps`` AdamW steps; return a report.

    ``batches`` (dicts of model kwargs with ``input_ids``, or input_ids tensors) are cycled;
    ``config`` fields may also be given as keywords (``heal(model, batches, steps=50, mode="factors")``).
    ``distill_model`` is the teacher of the KL and hidden-state terms. The report holds the loss curve
    (``loss``; ``lm_loss``, ``kl`` and ``hidden`` per step), ``seconds``, ``peak_memory_bytes`` (CUDA
    peak allocated on a CUDA device, else the process's peak RSS) and the trainable parameter count.
    The model is left in eval mode, on ``device`` if given; on an exception it is as it was.
    """
    config = config.replace(**overrides) if config is not None else HealConfig(**overrides)
    if config.hidden_weight > 0 and distill_model is None:
        raise UsageError("hidden-state distillation (hidden_weight > 0) needs a teacher (distill_model)")
    data = list(batches)
    if not data:
        raise UsageError("heal needs at least one batch")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(dev)
    if distill_model is not None:
        distill_model.to(dev).eval().requires_grad_(False)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    with training_session(model, config) as trained:
        params = [p for p in trained.parameters() if p.requires_grad]
        t0 = time.perf_counter()
        curve = _train(trained, params, data, config, distill_model, dev, progress)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        seconds = time.perf_counter() - t0
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda_max_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_peak_rss"
    report = {
        **config.to_dict(),
        "lora_r": config.lora_r if config.mode == "lora" else None,
        "distill": distill_model is not None,
        "trainable_params": sum(p.numel() for p in params),
        "first_loss": curve["loss"][0],
        "last_loss": curve["loss"][-1],
        **{k: v for k, v in curve.items() if v},
        "seconds": round(seconds, 3),
        "peak_memory_bytes": int(peak),
        "peak_memory_kind": kind,
        "device": str(dev),
    }
    log.info("healed (%s) %d steps: loss %.4f -> %.4f", config.mode, config.steps, curve["loss"][0], curve["loss"][-1])
    return report


def _train(trained, params, data, config: HealConfig, teacher, dev, progress: bool) -> dict[str, list[float]]:
    """The optimization loop: AdamW, the schedule of :func:`lr_factor`, gradient clipping."""
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, config.steps, config.warmup_steps, config.schedule)
    )
    curve: dict[str, list[float]] = {"loss": [], "lm_loss": [], "kl": [], "hidden": []}
    hidden = config.hidden_weight > 0
    bar = None
    if progress:
        import sys

        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc=f"heal ({config.mode})", unit="step", file=sys.stderr)
    for batch in itertools.islice(itertools.cycle(data), config.steps):
        inputs = _inputs(batch, dev)
        out = trained(**inputs, output_hidden_states=hidden)
        lm = _lm_loss(out.logits, inputs)
        loss, kl, mse = lm, None, None
        if teacher is not None:
            with torch.no_grad():
                target = teacher(**inputs, output_hidden_states=hidden)
            kl = _kl(out.logits, target.logits, inputs.get("attention_mask"), config.temperature)
            loss = config.lm_weight * lm + config.distill_weight * kl
            if hidden:
                mse = _hidden_mse(out.hidden_states, target.hidden_states, inputs.get("attention_mask"))
                loss = loss + config.hidden_weight * mse
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
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
    return curve


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


# ------------------------------------------------------------------------ directory to directory
def _check_heal_inputs(lord_dir, output_dir, train, eval_data, distill_dir, config, device, overwrite):
    """Everything cheap, checked before any weight is read: (LoRD dir, output, device)."""
    from ..calibration.data import text_files
    from ..device import resolve_device
    from ..persist.hf import check_model_dir
    from ..persist.io import check_output, is_lord_dir

    src = check_model_dir(lord_dir)
    if not is_lord_dir(src):
        raise UsageError(
            f"{str(lord_dir)!r} is a dense model directory, not a LoRD one (no lord_plan.json); compress it first "
            "(lord-export compress)"
        )
    out = Path(output_dir)
    check_output(out, overwrite)
    if out.absolute() == src.absolute():
        raise UsageError("the output directory must differ from the LoRD directory")
    if distill_dir is not None:
        check_model_dir(distill_dir)
    if config.hidden_weight > 0 and distill_dir is None:
        raise UsageError("hidden-state distillation needs a teacher (the dense model directory)")
    for what, paths in (("training data", train), ("held-out data", eval_data)):
        if paths is not None:
            try:
                text_files(paths)
            except UsageError as err:
                raise UsageError(f"{what}: {err}") from None
    device = resolve_device(device)
    if config.mode == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UsageError("mode lora needs the 'peft' package (lord_export[peft]); or use mode factors") from None
    return src, out, device


def mark_healed(plan: Any, note: str) -> None:
    """The plan's per-group errors describe the factors before healing: clear them and say so."""
    for g in plan.groups:
        if g.factorized:
            g.relative_error = None
            g.dense_output_error = None
    plan.warnings.append(note)


def heal_model_dir(
    lord_dir: str | Path,
    output_dir: str | Path,
    train: Sequence[str | Path],
    config: HealConfig | None = None,
    *,
    data: Any = None,
    eval_data: Sequence[str | Path] | None = None,
    eval_window: int | None = None,
    eval_tokens: int | None = None,
    distill_dir: str | Path | None = None,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    overwrite: bool | str = False,
    trust_remote_code: bool = False,
    progress: Say | None = None,
    bars: bool = False,
) -> dict[str, Any]:
    """Heal the LoRD directory ``lord_dir`` on the text/code in ``train`` (read like calibration data,
    ``data``: a :class:`~lord_export.calibration.data.CalibrationOptions`) and write ``output_dir`` (the
    usual LoRD format, in ``lord_dir``'s dtype unless ``dtype``, plus ``heal_report.json``); returns that
    report. Training and evaluation run in float32. With ``eval_data``, held-out perplexity is measured
    before and after; with ``distill_dir`` (e.g. the dense model ``lord_dir`` came from) it is the teacher.

    One sequence - load, evaluate, train, evaluate, save - whose steps share the loaded objects, hence
    its length.
    """
    from ..calibration.data import calibration_set, evaluation_windows, resolve_seqlen
    from ..persist.hf import load_tokenizer, max_positions, pad_token_id
    from ..persist.io import REPORT_FILE, atomic_output_dir, load, load_model_dir, read_plan, write_into, write_json
    from .evaluate import perplexity

    config = config or HealConfig()
    say = progress or (lambda msg: None)
    src, out, device = _check_heal_inputs(
        lord_dir, output_dir, train, eval_data, distill_dir, config, device, overwrite
    )
    tokenizer = load_tokenizer(src, trust_remote_code=trust_remote_code)
    positions = max_positions(src)
    train_set = calibration_set(tokenizer, train, data, max_positions=positions)
    windows = window = None
    if eval_data:
        window = eval_window or resolve_seqlen(None, positions, 512)
        windows = evaluation_windows(tokenizer, eval_data, window, max_positions=positions, max_tokens=eval_tokens)
    plan = read_plan(src, with_tensors=False)
    model = load(src, trust_remote_code=trust_remote_code)
    stored = next(p.dtype for p in model.parameters() if p.is_floating_point())
    out_dtype = dtype or stored
    model = model.to(device=device, dtype=torch.float32)  # AdamW on half-precision weights would lose the updates
    pad = pad_token_id(tokenizer)

    def evaluate(tag: str) -> dict | None:
        if windows is None:
            return None
        say(f"held-out perplexity {tag} healing ({len(windows)} windows)")
        result = perplexity(model, windows, batch_size=train_set.batch_size, pad_id=pad, progress=bars).to_dict()
        say(f"perplexity {tag}: {result['perplexity']:.4f}")
        return result

    before = evaluate("before")
    teacher = None
    if distill_dir is not None:
        teacher = load_model_dir(distill_dir, dtype=torch.float32, trust_remote_code=trust_remote_code)
    say(
        f"training {config.steps} step(s) on {train_set.tokens:,} tokens ({train_set.input_ids.shape[0]} blocks), "
        f"mode {config.mode}"
    )
    t0 = time.perf_counter()
    training = heal(model, train_set.batches(), config, distill_model=teacher, device=device, progress=bars)
    del teacher
    after = evaluate("after")
    heal_report = {
        "source": str(src),
        "data": train_set.describe(),
        "distill_from": str(distill_dir) if distill_dir else None,
        "train_dtype": "float32",
        "saved_dtype": str(out_dtype).removeprefix("torch."),
        **training,
        "total_seconds": round(time.perf_counter() - t0, 3),
        "eval": None
        if windows is None
        else {
            "paths": [str(p) for p in eval_data],
            "window": window,
            "windows": len(windows),
            "before": before,
            "after": after,
        },
    }
    note = (
        f"healed: fine-tuned after factorization ({config.mode}, {config.steps} steps, lr {config.lr:g}"
        + (f", distilled from {distill_dir}" if distill_dir else "")
        + "); per-group relative_error and dense_output_error were measured before healing and are cleared"
    )
    mark_healed(plan, note)
    source_report = src / REPORT_FILE
    report = json.loads(source_report.read_text()) if source_report.is_file() else {}
    report["groups"] = [g.to_dict() for g in plan.groups]
    report["warnings"] = [*report.get("warnings", []), note]
    report["healed"] = {k: heal_report[k] for k in ("mode", "steps", "lr", "lora_r", "distill", "seconds")}
    model.to(device="cpu", dtype=out_dtype)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_into(tmp, model, plan, source_dir=src, report=report)
        write_json(tmp / HEAL_REPORT_FILE, heal_report)
    return heal_report
