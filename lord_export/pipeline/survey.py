"""From a parameter budget to per-group ranks: the spectra-first pass before compression.

``param_ratio`` needs every group's error curve before any rank is fixed, so compression runs in
two passes: this survey (whole-model calibration on the dense model, one output-spectrum
decomposition per group — the decompositions are kept, so the independent-calibration pass that
follows reuses them — and, for the ``fisher`` allocation, a backward pass over the first
calibration batches to measure each group's sensitivity), then the allocation
(:mod:`lord_export.allocate`), then the compression itself with the chosen ranks (any calibration
mode). Groups named by ``config.overrides`` keep their override and count against the budget as
fixed.

For a model read from its checkpoint one block at a time, :func:`streamed_survey` does the same
with one block in memory (:meth:`lord_export.engine.Engine.survey`). With independent calibration it
also factorizes every group at the largest rank an allocation can give it and parks those factors
on disk, so the compression that follows only truncates them (one calibration pass in all); the
other modes calibrate again at the allocated ranks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import factorize as fz
from .allocate import GroupCurve, allocate, predicted_loss
from .calibrate import Calibration, batch_kwargs, calibrating, warn_few_tokens
from .config import LordConfig
from .errors import TargetError, UsageError
from .fingerprint import count_parameters
from .hf import model_device
from .planner import build_groups, describe_group, override_for, stacked_weight
from .targets import pattern_matches, select_targets

log = logging.getLogger(__name__)

#: Tokens the Fisher sensitivity pass uses: the first calibration batches up to at least this many
#: (whole batches, at least one), and at most :data:`SENSITIVITY_SHARE` of all calibration tokens.
#: Its backward costs about two calibration forwards per token, and per-group means of squared
#: gradients settle on a few thousand tokens; the share keeps the pass small next to a small
#: calibration set (SmolLM2's 4,096 tokens: the backward over all of them added 63%).
SENSITIVITY_TOKENS = 4096
SENSITIVITY_SHARE = 0.25


def sensitivity_batch_count(
    batches: Sequence[dict[str, torch.Tensor]], max_tokens: int = SENSITIVITY_TOKENS, share: float = SENSITIVITY_SHARE
) -> int:
    """How many leading batches the Fisher pass uses: the fewest that hold
    min(``max_tokens``, ``share`` × all tokens) tokens (at least one batch)."""
    sizes = [int(batch["input_ids"].numel()) for batch in batches]
    target = min(max_tokens, share * sum(sizes))
    tokens = 0
    for i, size in enumerate(sizes):
        tokens += size
        if tokens >= target:
            return i + 1
    return len(batches)


@dataclass
class Budget:
    """The survey's result: ranks for every group (None: dense) and what was measured on the way."""

    ranks: dict[str, int | None]
    calibration: Calibration
    cache: dict
    report: dict[str, Any] = field(default_factory=dict)


def check_causal_lm(model: nn.Module) -> None:
    """UsageError unless ``model`` is a causal LM (the fisher allocation differentiates its LM loss)."""
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embed is None or not hasattr(model, "lm_head") and "CausalLM" not in type(model).__name__:
        raise UsageError("the fisher allocation needs a causal language model (use allocation 'spectrum')")


def lm_loss_sum(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over real tokens: the L of the Fisher sensitivities."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask", torch.ones_like(ids))
    keep = mask[:, 1:].bool()
    return torch.nn.functional.cross_entropy(logits[:, :-1][keep].float(), ids[:, 1:][keep], reduction="sum")


class SensitivityProbe:
    """Sums ‖∂L/∂y_t‖² over the output rows of every watched layer, one forward + backward per batch.

    L is the summed next-token cross-entropy of the batch (padding masked). Parameters get no
    gradients: the input embeddings' output is made to require grad instead, so memory stays that
    of activations. Hooks live only during :meth:`run`, so the same model can run other forwards in
    between (the survey folds the probe's batches into its calibration pass).
    """

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        check_causal_lm(model)
        self.model = model
        modules = dict(model.named_modules())
        self.modules = {n: modules[n] for n in layers}
        self.width = {
            n: m.weight.shape[0] if isinstance(m, nn.Linear) else m.weight.shape[1] for n, m in self.modules.items()
        }
        self.sums = dict.fromkeys(self.modules, 0.0)
        self.tokens = 0

    def run(self, batch: dict[str, torch.Tensor]) -> None:
        """One forward + backward of ``batch`` (moved to the model's device), gradients summed."""
        model, device = self.model, model_device(self.model)
        batch = {k: v.to(device) for k, v in batch.items()}
        handles = [model.get_input_embeddings().register_forward_hook(lambda mod, inp, out: out.requires_grad_())]
        for name, module in self.modules.items():
            handles.append(module.register_forward_hook(self._watch(name)))
        requires = {n: p.requires_grad for n, p in model.named_parameters()}
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            with torch.enable_grad():
                logits = model(**batch, use_cache=False).logits
                lm_loss_sum(logits, batch).backward()
        finally:
            for h in handles:
                h.remove()
            for n, p in model.named_parameters():
                p.requires_grad_(requires[n])
        self.tokens += int(batch.get("attention_mask", torch.ones_like(batch["input_ids"])).sum())

    def _watch(self, name: str):
        def hook(mod: nn.Module, inp: Any, out: torch.Tensor) -> None:
            if out.requires_grad:
                out.register_hook(lambda g: self._add(name, g))

        return hook

    def _add(self, name: str, g: torch.Tensor) -> None:
        flat = g.detach().reshape(-1).float()
        self.sums[name] += float(torch.dot(flat, flat))  # float32 BLAS dot: no float64 copy

    def sensitivities(self, groups: dict[str, list[str]]) -> dict[str, float]:
        """s_g = Σ_t ‖∂L/∂y_t‖² / (N · d_out) per group (``groups``: name → member layers)."""
        out = {}
        for g, members in groups.items():
            width = sum(self.width[m] for m in members)
            out[g] = sum(self.sums[m] for m in members) / (max(self.tokens, 1) * max(width, 1))
        return out


def fisher_sensitivities(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], groups: dict[str, list[str]]
) -> dict[str, float]:
    """s_g = Σ_t ‖∂L/∂y_t‖² / (N · d_out) per group (see :mod:`lord_export.allocate`), on the first
    calibration batches holding :data:`SENSITIVITY_TOKENS` tokens (:class:`SensitivityProbe`)."""
    probe = SensitivityProbe(model, [m for members in groups.values() for m in members])
    was_training = model.training
    try:
        model.eval()
        for batch in batches[: sensitivity_batch_count(batches)]:
            probe.run(batch)
    finally:
        model.train(was_training)
    return probe.sensitivities(groups)


@dataclass
class Survey:
    """Everything the allocation needs that does not depend on the budget (reusable across budgets)."""

    curves: list[GroupCurve]
    fixed_removed: int
    fixed: dict[str, int | None]
    total: int
    calibration: Calibration | None  # None after a streamed survey (nothing kept)
    cache: dict
    timings: dict[str, float]


def survey(
    model: nn.Module, batches: Sequence[dict[str, torch.Tensor]], config: LordConfig, layers: list[str]
) -> Survey:
    """Calibrate the dense model, decompose every group once, measure sensitivities (``fisher``).

    With ``fisher`` the probe's batches are calibration batches run with gradients: their forward
    feeds the statistics too, so the sensitivities cost one backward pass over a few batches.
    """
    t0 = time.perf_counter()
    check_overrides(config, layers)
    probe = SensitivityProbe(model, layers) if config.allocation == "fisher" else None
    probe_batches = sensitivity_batch_count(batches) if probe is not None else 0
    probe_s = 0.0

    device = model_device(model)
    with calibrating(model, layers) as cal:
        for i, batch in enumerate(batches):
            if i < probe_batches:  # the whole model, with gradients: its forward calibrates too
                t = time.perf_counter()
                probe.run(batch)
                probe_s += time.perf_counter() - t
            else:  # no gradients, and nothing after the last targeted layer
                with torch.no_grad():
                    cal.run_batch(model, batch_kwargs(batch, device))
    calibration = cal.result()
    warn_few_tokens(calibration)
    modules = dict(model.named_modules())
    fixed: dict[str, int | None] = {}
    fixed_removed = 0
    curves: list[GroupCurve] = []
    members_of: dict[str, list[str]] = {}
    cache: dict = {}
    for names in build_groups(layers, calibration.input_of, config.grouping):
        group = describe_group(modules, names, config, ranks={})
        if override_for(group, config.overrides) is not None:
            fixed[group.name] = group.rank if group.factorized else None
            fixed_removed += group.dense_params - group.factor_params if group.factorized else 0
            continue
        W, C = stacked_weight(modules, group), calibration.of(names[0]).C
        cache[(group.name, "lord")] = decomposition = fz.output_spectrum(W, C.to(W.device))
        kind = ",".join(m.name.rsplit(".", 1)[-1] for m in group.members)
        curves.append(GroupCurve(group.name, kind, group.d_in, group.d_out, decomposition[0]))
        members_of[group.name] = names
    if probe is not None and curves:
        for c, s in zip(curves, probe.sensitivities(members_of).values(), strict=True):
            c.sensitivity = s
    # sensitivity_s: the forward + backward of the probe's batches (their forward also calibrated)
    timings = {"survey_s": round(time.perf_counter() - t0 - probe_s, 3), "sensitivity_s": round(probe_s, 3)}
    return Survey(curves, fixed_removed, fixed, count_parameters(model), calibration, cache, timings)


def streamed_survey(
    engine: Any, batches: Sequence[dict[str, torch.Tensor]], blocks: Any, *, spill: Any = None
) -> Survey:
    """The survey of a model whose blocks are read one at a time (:meth:`lord_export.engine.Engine.survey`).

    Same curves, sensitivities and fixed groups as :func:`survey`. Statistics and decompositions are
    freed block by block; with ``spill`` (independent calibration) each group's factors at the
    largest rank it can be given are kept there, and :meth:`~lord_export.engine.Engine.write_kept`
    finishes the compression from them; without, compression calibrates again.
    """
    config = engine.config
    layers = select_targets(engine.model, config.targets, config.exclude)
    check_overrides(config, layers)
    outside = [n for n in layers if not n.startswith(blocks.path + ".")]
    if outside:
        raise UsageError(f"the streamed survey covers the blocks only; {outside[0]!r} is outside them")
    fisher = config.allocation == "fisher"
    if fisher:
        check_causal_lm(engine.model)
    curves, fixed, fixed_removed, timings = engine.survey(
        batches, blocks, fisher=fisher, fisher_batches=sensitivity_batch_count(batches), spill=spill
    )
    return Survey(curves, fixed_removed, fixed, count_parameters(engine.model), None, {}, timings)


def plan_budget(
    model: nn.Module,
    batches: Sequence[dict[str, torch.Tensor]],
    config: LordConfig,
    layers: list[str],
    *,
    surveyed: Survey | None = None,
) -> Budget:
    """Survey ``model`` (or reuse ``surveyed``) and allocate ``config.param_ratio`` (module docstring)."""
    sv = surveyed or survey(model, batches, config, layers)
    multiple = config.rank_multiple
    target = sv.total - int(config.param_ratio * sv.total) - sv.fixed_removed
    reachable = sum(c.removed(c.ranks(multiple)[-1]) for c in sv.curves if c.ranks(multiple))
    if target > reachable:
        smallest = (sv.total - sv.fixed_removed - reachable) / sv.total
        raise UsageError(
            f"parameter ratio {config.param_ratio} cannot be reached: with every target at rank {multiple} the "
            f"model keeps {smallest:.4f} of its parameters; ask for at least that (or target more layers)"
        )
    ranks = allocate(sv.curves, target, method=config.allocation, multiple=multiple)
    ranks.update(sv.fixed)
    report = {
        "params_total": sv.total,
        "params_target": int(config.param_ratio * sv.total),
        "allocation": config.allocation,
        "predicted_loss": predicted_loss(sv.curves, ranks),
        **sv.timings,
        "sensitivities": {c.name: c.sensitivity for c in sv.curves} if config.allocation == "fisher" else {},
    }
    return Budget(ranks, sv.calibration, sv.cache, report)


def check_overrides(config: LordConfig, layers: list[str]) -> None:
    """TargetError for an override pattern that matches none of ``layers``."""
    for pattern in config.overrides:
        if not any(pattern_matches(pattern, n) for n in layers):
            raise TargetError(f"override pattern {pattern!r} matches none of the targeted layers")
