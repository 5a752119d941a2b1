"""The one-call API over the stages, for a model in memory or a model directory, and the
calibrate-once / factorize-per-setting loop that sweeps and the demo share.

Both entry points run the block-by-block engine (:mod:`lord_export.engine`); a model whose blocks
cannot be found (or a calibration callback instead of batches) falls back to whole-model
calibration with a warning.
"""

from __future__ import annotations

import copy
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .apply import apply_plan
from .budget import check_overrides, plan_budget, survey
from .calibrate import Calibration, CalibrationData, calibrate
from .config import LordConfig
from .data import CalibrationOptions, calibration_set, text_files
from .errors import OutputExistsError, UsageError
from .fingerprint import count_parameters, describe_model
from .plan import Plan
from .planner import make_plan
from .targets import select_targets

log = logging.getLogger(__name__)

#: Where a parameter budget's survey parks its factors, inside the (temporary) output directory.
SPILL_DIR = ".lord-factor-spill"


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
    ranks come from a survey of the dense model (:mod:`lord_export.budget`); ``surveyed`` reuses one
    made for the same model and targets (sweeps over budgets).
    """
    from .device import resolve_device
    from .engine import Engine, find_streamable_blocks
    from .hf import model_device

    config = resolve_config(config, overrides)
    device = resolve_device(device if device is not None else model_device(model))
    base = describe_model(model)
    params_before = count_parameters(model)
    t0 = time.perf_counter()
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
    if budget is not None and config.calibration == "independent":  # the survey's statistics are the answer
        plan = make_plan(
            model, budget.calibration, layers, config, cache=budget.cache, ranks=budget.ranks, base_model=base
        )
        apply_plan(model, plan)
        plan.report = {"calibration": {"batches": budget.calibration.batches}}
    elif blocks is None:
        plan = _compress_whole_model(model, data, config, why, progress, base)
    else:
        batches = [b if isinstance(b, dict) else {"input_ids": b} for b in data]
        ranks = budget.ranks if budget is not None else None
        engine = Engine(model, config, device=device, stats_device=stats_device, bars=progress, ranks=ranks)
        result = engine.run(batches, blocks)
        plan = Plan(config=config, groups=result.groups, warnings=result.warnings, tensors=result.tensors)
        plan.report = {"calibration": {"batches": result.calibration_batches}, "blocks": result.blocks}
    plan.base_model = base
    calib_report = plan.report.get("calibration")
    plan.report = build_report(
        plan,
        params_before=params_before,
        params_after=count_parameters(model),
        calibration=calib_report,
        timings={"compress_s": round(time.perf_counter() - t0, 3)},
        streamed=blocks is not None and not (budget is not None and config.calibration == "independent"),
    )
    if budget is not None:
        plan.report["budget"] = budget.report
    return plan


def _compress_whole_model(
    model: nn.Module, data: CalibrationData, config: LordConfig, why: str, progress: bool, base: dict[str, Any]
):
    """Calibrate the whole model at once (statistics of every layer in memory together)."""
    if config.calibration != "independent":
        raise UsageError(f"calibration {config.calibration!r} needs block-by-block processing, but {why}")
    log.warning("calibrating the whole model at once: %s", why)
    layers = select_targets(model, config.targets, config.exclude)
    calibration = calibrate(model, data, layers, progress=progress)
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


def compress_settings(
    model: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    configs: Sequence[LordConfig],
    *,
    device: str | torch.device | None = None,
    progress: bool = False,
) -> Iterator[tuple[LordConfig, nn.Module, Plan]]:
    """Compressed copies of ``model`` for several settings (sweeps, the demo); ``model`` is not modified.

    ``independent`` settings share one calibration of every layer they target and each group's
    rank-independent decomposition (:func:`factorize_settings`); ``sequential`` and
    ``compensating`` settings depend on the ranks chosen before them, so each runs the engine.
    """
    shared = [c for c in configs if c.calibration == "independent" and c.param_ratio is None]
    calibration = None
    if shared:
        layers = sorted({n for c in shared for n in select_targets(model, c.targets, c.exclude)})
        calibration = calibrate(model, batches, layers, progress=progress)
        independent = factorize_settings(model, calibration, shared)
    surveys: dict = {}
    for config in configs:
        if config.calibration == "independent" and config.param_ratio is None:
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


def compress_model_dir(
    model_dir: str | Path,
    output_dir: str | Path,
    calib: Sequence[str | Path],
    config: LordConfig,
    *,
    data: CalibrationOptions | None = None,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    stats_device: str | torch.device | None = None,
    max_shard_bytes: int | None = None,
    trust_remote_code: bool = False,
    progress: Callable[[str], None] | None = None,
    bars: bool = False,
) -> dict[str, Any]:
    """Compress a model directory into ``output_dir`` (written atomically); return the report.

    The model is built on the meta device and its blocks are read from the safetensors checkpoint
    one at a time (see :mod:`lord_export.engine`), so memory holds one block, its statistics, the
    calibration activations and the embeddings/head. Everything that can be checked cheaply
    (paths, output, disk space, calibration files, sequence length, device) is checked before the
    model is loaded; the input directory is only read.
    """
    from .checkpoint import DEFAULT_MAX_SHARD_BYTES
    from .device import resolve_device
    from .engine import find_streamable_blocks
    from .hf import check_model_dir, load_dense, load_tokenizer, max_positions, weights_bytes
    from .io import REPORT_FILE, atomic_output_dir, build_skeleton, write_into, write_json

    say = progress or (lambda msg: None)
    max_shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    model_dir = check_model_dir(model_dir)
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise OutputExistsError(output_dir)
    if out.absolute() == model_dir.absolute():
        raise UsageError("the output directory must differ from the model directory")
    device = resolve_device(device)
    text_files(calib)  # fail on missing/empty/binary paths before loading anything heavy
    spills = config.param_ratio is not None and config.calibration == "independent"
    _check_disk_space(out, weights_bytes(model_dir) * (2 if spills else 1), spills)
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    calib_set = calibration_set(
        tokenizer, calib, _with_packing(data, model_dir, trust_remote_code), max_positions=max_positions(model_dir)
    )
    model = build_skeleton(model_dir, trust_remote_code)
    blocks, why = find_streamable_blocks(model)
    if blocks is not None and config.param_ratio is not None and _targets_outside(model, config, blocks):
        # the streamed survey covers the blocks; targets outside them need the whole-model one
        say("the targets include layers outside the blocks: the budget is allocated over the whole model in memory")
        blocks = None
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        if blocks is None:
            model = load_dense(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
            plan = compress(model, calib_set.batches(), config, device=device, stats_device=stats_device)
            write_into(tmp, model, plan, source_dir=model_dir, max_shard_bytes=max_shard_bytes)
            report = plan.report
        else:
            stream = dict(device=device, stats_device=stats_device, progress=say, bars=bars)
            report = _compress_streamed(
                model, model_dir, blocks, tmp, calib_set, config, dtype, max_shard_bytes, stream
            )
        report["source_model"] = str(model_dir)
        report["device"] = str(device)
        if on_cuda:  # what the GPU needed: the streamed path's claim is one block's worth
            report["cuda_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
        report["calibration"].update(calib_set.describe())
        write_json(tmp / REPORT_FILE, report)
    return report


def _compress_streamed(model, model_dir, blocks, tmp, calib_set, config, dtype, max_shard_bytes, stream) -> dict:
    """The block-by-block path of :func:`compress_model_dir`: weights read and written a block at a time."""
    from .checkpoint import CheckpointReader, ShardWriter
    from .engine import CheckpointWeights, Engine
    from .io import write_config_and_tokenizer, write_plan

    t0 = time.perf_counter()
    base, params_before = describe_model(model), count_parameters(model)
    source = CheckpointWeights(CheckpointReader(model_dir), dtype, getattr(model, "base_model_prefix", ""))
    _load_outside_blocks(model, source, blocks, stream["device"])
    writer = ShardWriter(tmp, max_shard_bytes)
    stream["progress"](f"compressing {len(blocks)} blocks of {blocks.path} one at a time on {stream['device']}")
    engine = Engine(model, config, source=source, writer=writer, **stream)
    spill = None
    try:
        budget = None
        if config.param_ratio is not None:
            from .budget import streamed_survey
            from .checkpoint import FactorSpill

            if config.calibration == "independent":  # the survey's factors are the answer, once truncated
                spill = FactorSpill(tmp / SPILL_DIR)
                stream["progress"](
                    f"surveying {len(blocks)} blocks for the parameter budget (spectra and factors, then sensitivities)"
                )
            else:
                stream["progress"](
                    f"surveying {len(blocks)} blocks for the parameter budget (spectra, then sensitivities)"
                )
            batches = list(calib_set.batches())
            surveyed = streamed_survey(engine, batches, blocks, spill=spill)
            budget = plan_budget(model, batches, config, [], surveyed=surveyed)
            engine.ranks = budget.ranks
        if spill is not None:
            result = engine.write_kept(blocks, spill)
            budget.report["spilled_bytes"] = spill.bytes_written
        else:
            result = engine.run(calib_set.batches(), blocks)
        tied = engine.write_rest(blocks)
        writer.close()
    except BaseException:
        writer.abort()  # the open shard file; the caller removes the directory
        raise
    finally:
        if spill is not None:
            spill.close()
    plan = Plan(config=config, groups=result.groups, warnings=result.warnings, base_model=base)
    saved = sum(g.dense_params - g.factor_params for g in plan.factorized_groups)
    write_config_and_tokenizer(tmp, model, plan, model_dir)
    write_plan(tmp, plan, tied, None)
    return build_report(
        plan,
        params_before=params_before,
        params_after=params_before - saved,
        calibration={"batches": result.calibration_batches},
        timings={"compress_s": round(time.perf_counter() - t0, 3), "blocks_s": result.timings["blocks_s"]},
        streamed=True,
    ) | ({"budget": budget.report} if budget is not None else {})


def _targets_outside(model: nn.Module, config: LordConfig, blocks: Any) -> bool:
    """Whether any targeted layer lies outside the repeated blocks (e.g. a targeted LM head)."""
    prefix = blocks.path + "."
    return any(not n.startswith(prefix) for n in select_targets(model, config.targets, config.exclude))


def _with_packing(data: CalibrationOptions | None, model_dir: Path, trust_remote_code: bool) -> CalibrationOptions:
    """``data`` with ``packing`` decided from the model's config when it was left open."""
    import dataclasses

    from transformers import AutoConfig

    from .data import uses_packing

    data = data or CalibrationOptions()
    if data.packing is not None:
        return data
    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    return dataclasses.replace(data, packing=uses_packing(config))


def _load_outside_blocks(model: nn.Module, source: Any, blocks: Any, device: torch.device | str) -> None:
    """Read every tensor outside the blocks (embeddings, final norm, head) onto ``device``; re-tie."""
    prefix = blocks.path + "."
    names = {n: n for n in model.state_dict() if not n.startswith(prefix)}
    missing = source.load_into(model, names, device)
    if missing and hasattr(model, "tie_weights"):
        model.tie_weights()
    for name, module in model.named_modules():
        if name == blocks.path or name.startswith(prefix):
            continue
        for pname, p in module.named_parameters(recurse=False):
            if p.is_meta:
                raise UsageError(f"the checkpoint lacks {name + '.' if name else ''}{pname}")
        for bname, buf in list(module._buffers.items()):
            if buf is not None and not buf.is_meta:
                module._buffers[bname] = buf.to(device)


def _check_disk_space(out: Path, needed: int, spills: bool = False) -> None:
    """UsageError when the output's file system has less free space than ``needed``: the dense
    weights' size, twice that when a parameter budget parks its factors on disk (``spills``)."""
    parent = out.absolute().parent
    if not parent.is_dir():
        raise UsageError(f"the parent directory of output {str(out)!r} does not exist")
    free = shutil.disk_usage(parent).free
    if needed > free:
        raise UsageError(
            f"the output may need up to {needed / 1e9:.2f} GB ("
            + ("twice the dense weights: the parameter budget parks factors on disk" if spills else "the dense weights")
            + f") but {parent} has {free / 1e9:.2f} GB free"
        )
