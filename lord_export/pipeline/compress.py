"""The one-call API for a model in memory (:func:`compress`), the calibrate-once /
factorize-per-setting loop that sweeps and the demo share, and the report every path writes.

:func:`compress` runs the block-by-block engine (:mod:`lord_export.pipeline.engine`); a model whose
blocks cannot be found (or a calibration callback instead of batches) falls back to whole-model
calibration with a warning. Model directories: :mod:`lord_export.pipeline.model_dir`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._version import __version__
from ..calibration.statistics import Calibration, CalibrationData, calibrate
from ..config import LordConfig
from ..core.apply import apply_plan, record_plan
from ..core.experts import prepare_experts
from ..core.fingerprint import count_parameters, describe_model
from ..core.plan import Plan
from ..core.targets import select_targets
from ..errors import UsageError
from .planner import make_plan, shared_experts
from .survey import check_overrides, plan_budget, survey

log = logging.getLogger(__name__)


def resolve_config(config: LordConfig | None, overrides: dict[str, Any]) -> LordConfig:
    """``config`` with keyword ``overrides`` applied; unknown names are an error, with or without a config."""
    if config is None:
        return LordConfig.from_dict(overrides)
    return config.replace(**overrides) if overrides else config


def compress(
    model: nn.Module,
    data: CalibrationData,
    config: LordConfig | None = None,
    *,
    device: str | torch.device | None = None,
    stats_device: str | torch.device | None = None,
    compute_dtype: torch.dtype | str | None = "auto",
    progress: bool = False,
    surveyed: Any = None,
    **overrides: Any,
) -> Plan:
    """Compress ``model`` IN PLACE with LoRD and return the plan (with a report in ``plan.report``).

    ``data``: an iterable of batches (dicts of model kwargs, or input_ids tensors; moved to the
    compute device) or a callback ``run(model)``. ``config`` fields may also be given as keyword
    overrides (``compress(model, data, rank_reduction=0.3, targets=("mlp",))``). Blocks are
    processed one at a time on ``device`` (default: where the model is) and go back where they
    were; statistics live on ``stats_device`` (default: ``device``). With ``config.param_ratio`` the
    ranks come from a survey of the dense model (:mod:`lord_export.pipeline.survey`); ``surveyed``
    reuses one made for the same model and targets (sweeps over budgets). ``compute_dtype``
    ("auto": float32 for a half-precision model on a device without native support for it, see
    :func:`lord_export.device.compute_dtype`) is what the work runs in; the model keeps its dtypes
    and the factors get their layers' dtype.
    """
    from ..device import compute_dtype as choose_dtype
    from ..device import model_device, resolve_device

    config = resolve_config(config, overrides)
    if config.max_ppl_increase is not None:
        raise UsageError(
            "a quality target (max_ppl_increase) is searched on a model directory with held-out calibration blocks: "
            "use compress_model_dir (lord-export compress)"
        )
    device = resolve_device(device if device is not None else model_device(model))
    _, experts_warning = prepare_experts(model)
    base = describe_model(model)
    params_before = count_parameters(model)
    choice = choose_dtype(device, floating_dtype(model), compute_dtype)
    t0 = time.perf_counter()
    with computing_in(model, choice.compute):
        store = choice.store if choice.store != choice.compute else None
        plan, streamed, budget = _compress(model, data, config, device, stats_device, progress, surveyed, base, store)
    plan.tensors = {k: v.to(model.get_parameter(k).dtype) for k, v in plan.tensors.items()}
    plan.base_model = base
    record_plan(model, plan)
    calib_report = plan.report.get("calibration")
    engine_timings = plan.report.get("engine_timings") or {}
    plan.report = build_report(
        plan,
        params_before=params_before,
        params_after=count_parameters(model),
        calibration=calib_report,
        timings={"compress_s": round(time.perf_counter() - t0, 3), **engine_timings},
        streamed=streamed,
    )
    plan.report["dtype"] = choice.describe()
    if experts_warning:
        plan.warnings.append(experts_warning)
    if budget is not None:
        plan.report["budget"] = budget.report
    return plan


def _compress(model, data, config, device, stats_device, progress, surveyed, base, store) -> tuple[Plan, bool, Any]:
    """:func:`compress`'s choice of path: (plan, whether block by block, the budget or None)."""
    from .engine import Engine, find_streamable_blocks

    layers = select_targets(model, config.targets, config.exclude)
    check_overrides(config, layers)
    blocks, why = find_streamable_blocks(model)
    if callable(data):
        blocks, why = None, "calibration data is a callback, not batches"
    budget = None
    if config.param_ratio is not None:
        if callable(data):
            raise UsageError("a parameter ratio needs calibration batches, not a callback")
        data = [b if isinstance(b, dict) else {"input_ids": b} for b in data]
        budget = plan_budget(model, data, config, layers, surveyed=surveyed)
    if budget is not None and config.calibration == "independent" and not config.refines:
        # the survey's statistics are the answer
        plan = make_plan(
            model,
            budget.calibration,
            layers,
            config,
            cache=budget.cache,
            ranks=budget.ranks,
            base_model=base,
            fisher=budget.fisher,
        )
        apply_plan(model, plan)
        plan.report = {"calibration": {"batches": budget.calibration.batches}}
    elif blocks is None:
        plan = _compress_whole_model(model, data, config, why, progress, base)
    else:
        batches = [b if isinstance(b, dict) else {"input_ids": b} for b in data]
        ranks = budget.ranks if budget is not None else None
        fisher = budget.fisher if budget is not None else None
        engine = Engine(
            model,
            config,
            device=device,
            stats_device=stats_device,
            bars=progress,
            ranks=ranks,
            store_dtype=store,
            fisher=fisher,
        )
        result = engine.run(batches, blocks)
        plan = Plan(config=config, groups=result.groups, warnings=result.warnings, tensors=result.tensors)
        plan.report = {
            "calibration": {"batches": result.calibration_batches},
            "blocks": result.blocks,
            "engine_timings": result.timings,
        }
    streamed = blocks is not None and not (
        budget is not None and config.calibration == "independent" and not config.refines
    )
    return plan, streamed, budget


def floating_dtype(model: nn.Module) -> torch.dtype:
    """The dtype most of ``model``'s floating-point parameters have (float32 when it has none)."""
    counts: dict[torch.dtype, int] = {}
    for p in model.parameters():
        if p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else torch.float32


@contextlib.contextmanager
def computing_in(model: nn.Module, dtype: torch.dtype) -> Iterator[None]:
    """The tensors of ``model`` stored in its main dtype (:func:`floating_dtype`) in ``dtype`` while the
    context lasts, and back afterwards; tensors kept in another dtype (float32 rotary tables, say)
    are left alone, and tensors made meanwhile (LoRD factors) end in the main dtype."""
    main = floating_dtype(model)
    if dtype == main:
        yield
        return
    before = {id(t) for t in _floating(model)}
    casted = {id(t) for t in _floating(model) if t.dtype == main}
    for t in _floating(model):
        if id(t) in casted:
            t.data = t.data.to(dtype)
    try:
        yield
    finally:
        for t in _floating(model):
            if id(t) in casted or id(t) not in before:
                t.data = t.data.to(main)


def _floating(model: nn.Module) -> Iterator[torch.Tensor]:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            yield t


def _compress_whole_model(
    model: nn.Module, data: CalibrationData, config: LordConfig, why: str, progress: bool, base: dict[str, Any]
):
    """Calibrate the whole model at once (statistics of every layer in memory together)."""
    if config.refine == "block":
        raise UsageError(f"block refinement needs a model processed block by block, but {why}")
    if config.calibration != "independent":
        raise UsageError(f"calibration {config.calibration!r} needs block-by-block processing, but {why}")
    log.warning("calibrating the whole model at once: %s", why)
    layers = select_targets(model, config.targets, config.exclude)
    calibration = shared_experts(calibrate(model, data, layers, progress=progress), config)
    plan = make_plan(model, calibration, layers, config, progress=progress, base_model=base)
    apply_plan(model, plan, allow_mismatch=True)  # made from this very model
    plan.warnings.append(f"whole-model calibration: {why}")
    plan.report = {"calibration": {"batches": calibration.batches}}
    return plan


def factorize_settings(
    model: nn.Module, calibration: Calibration, configs: Sequence[LordConfig]
) -> Iterator[tuple[LordConfig, nn.Module, Plan]]:
    """For each config, a compressed COPY of ``model`` and its plan, all from one calibration.

    ``calibration`` must cover every layer the configs target; ``model`` is not modified. Only
    ``independent`` calibration can be shared this way (the others depend on the setting).
    """
    cache: dict = {}
    for config in configs:
        work = copy.deepcopy(model)
        layers = select_targets(work, config.targets, config.exclude)
        plan = make_plan(work, calibration, layers, config, cache=cache)
        apply_plan(work, plan, allow_mismatch=True)  # made from this very copy
        yield config, work, plan


def _shares_calibration(config: LordConfig) -> bool:
    return config.calibration == "independent" and config.param_ratio is None and config.expert_basis == "per-expert"


def compress_settings(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    configs: Sequence[LordConfig],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Iterator[tuple[LordConfig, nn.Module, Plan]]:
    """Compressed copies of ``model`` for several settings (sweeps, the demo); ``model``'s weights are not
    modified (transformers 5's fused MoE experts are unfused in place first, which changes no output).

    ``independent`` settings share one calibration of every layer they target and each group's
    rank-independent decomposition (:func:`factorize_settings`); ``sequential`` and
    ``compensating`` settings depend on the ranks chosen before them, so each runs the engine.
    """
    prepare_experts(model)  # transformers 5's fused experts as per-expert linears (same forward)
    shared = [c for c in configs if _shares_calibration(c)]
    calibration = None
    if shared:
        layers = sorted({n for c in shared for n in select_targets(model, c.targets, c.exclude)})
        calibration = calibrate(model, batches, layers, progress=progress)
        independent = factorize_settings(model, calibration, shared)
    surveys: dict = {}
    for config in configs:
        if _shares_calibration(config):
            yield next(independent)
            continue
        surveyed = None
        if config.param_ratio is not None:  # the survey does not depend on the budget: one per target set
            key = (
                config.targets,
                config.exclude,
                config.grouping,
                config.allocation == "fisher",
                tuple(sorted(config.overrides.items())),
            )
            if key not in surveys:
                layers = select_targets(model, config.targets, config.exclude)
                surveys[key] = survey(model, batches, config, layers)
            surveyed = surveys[key]
        work = copy.deepcopy(model)
        plan = compress(work, batches, config, device=device, surveyed=surveyed)
        yield config, work, plan


def build_report(
    plan: Plan,
    *,
    params_before: int,
    params_after: int,
    calibration: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    streamed: bool = False,
) -> dict[str, Any]:
    """The report.json contents: settings, whole-model parameter counts, and per-group numbers."""
    cfg = plan.config
    done = plan.factorized_groups
    tokens = max((g.calibration_tokens for g in plan.groups), default=0)
    return {
        "lord_export_version": __version__,
        **{k: v for k, v in cfg.to_dict().items() if k != "calibration"},
        "calibration_mode": cfg.calibration,
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": params_after / params_before if params_before else None,
        "groups_factorized": len(done),
        "groups_left_dense": len(plan.groups) - len(done),
        "block_by_block": streamed,
        "calibration": {"tokens": tokens, **(calibration or {})},
        "timings": timings or {},
        "warnings": list(plan.warnings),
        "groups": [g.to_dict() for g in plan.groups],
    }
