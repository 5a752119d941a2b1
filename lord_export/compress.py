"""One call that does calibrate → plan → apply, for a model in memory or a model directory."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import __version__
from .apply import apply_plan
from .calibrate import CalibrationData, calibrate
from .config import LordConfig
from .data import DEFAULT_SAMPLES, DEFAULT_SEQLEN, batches, read_documents, tokenize_blocks
from .errors import UsageError
from .plan import Plan, count_parameters, make_plan
from .targets import select_targets

log = logging.getLogger(__name__)


def compress(
    model: nn.Module,
    data: CalibrationData,
    config: LordConfig | None = None,
    *,
    progress: bool = False,
    **overrides: Any,
) -> Plan:
    """Compress ``model`` IN PLACE with LoRD and return the plan (with a report in ``plan.report``).

    ``data``: an iterable of batches (dicts of model kwargs, or input_ids tensors) or a callback
    ``run(model)``. ``config`` fields may also be given as keyword overrides
    (``compress(model, data, rank_reduction=0.3, targets=("mlp",))``).
    """
    if config is None:
        config = LordConfig(**overrides)
    elif overrides:
        config = LordConfig.from_dict({**config.to_dict(), **overrides})
    layers = select_targets(model, config.targets, config.exclude)
    params_before = count_parameters(model)
    t0 = time.perf_counter()
    calibration = calibrate(model, data, layers, progress=progress)
    t1 = time.perf_counter()
    plan = make_plan(model, calibration, layers, config, progress=progress)
    t2 = time.perf_counter()
    apply_plan(model, plan)
    plan.report = build_report(
        plan,
        params_before=params_before,
        params_after=count_parameters(model),
        calibration={"batches": calibration.batches},
        timings={"calibrate_s": round(t1 - t0, 3), "factorize_s": round(t2 - t1, 3)},
    )
    return plan


def build_report(
    plan: Plan,
    *,
    params_before: int,
    params_after: int,
    calibration: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
) -> dict[str, Any]:
    """The report.json contents: settings, whole-model parameter counts, and per-group numbers."""
    cfg = plan.config
    done = plan.factorized_groups
    tokens = max((g.calibration_tokens for g in plan.groups), default=0)
    return {
        "lord_export_version": __version__,
        "method": cfg.method,
        "rank_reduction": cfg.rank_reduction,
        "rank_multiple": cfg.rank_multiple,
        "targets": list(cfg.targets),
        "exclude": list(cfg.exclude),
        "grouping": cfg.grouping,
        "force": cfg.force,
        "params_before": params_before,
        "params_after": params_after,
        "params_ratio": params_after / params_before if params_before else None,
        "groups_factorized": len(done),
        "groups_left_dense": len(plan.groups) - len(done),
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
    samples: int = DEFAULT_SAMPLES,
    seqlen: int | None = None,
    separator: str | None = None,
    batch_size: int = 8,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
    trust_remote_code: bool = False,
    progress: bool = False,
) -> dict[str, Any]:
    """Compress a model directory into ``output_dir`` (written atomically); return the report.

    ``seqlen`` defaults to ``DEFAULT_SEQLEN`` or the model's maximum positions, whichever is smaller.

    Everything that can be checked cheaply (paths, output, calibration files) is checked before
    the model is loaded; the input directory is only read.
    """
    from .hf import check_model_dir, load_dense, load_tokenizer, max_positions
    from .io import atomic_output_dir, write_into

    model_dir = check_model_dir(model_dir)
    out = Path(output_dir)
    if out.exists() and not overwrite:
        raise UsageError(f"output {str(output_dir)!r} already exists; pass --overwrite to replace it")
    if out.absolute() == model_dir.absolute():
        raise UsageError("the output directory must differ from the model directory")
    from .data import text_files

    text_files(calib)  # fail on missing/empty/binary paths before loading anything heavy
    max_pos = max_positions(model_dir)
    if seqlen is None:
        seqlen = min(DEFAULT_SEQLEN, max_pos) if max_pos else DEFAULT_SEQLEN
    elif max_pos is not None and seqlen > max_pos:
        raise UsageError(f"calibration sequence length {seqlen} exceeds the model's {max_pos} positions")
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    ids, mask = tokenize_blocks(tokenizer, read_documents(calib, separator), samples=samples, seqlen=seqlen)
    model = load_dense(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
    plan = compress(model, batches(ids, mask, batch_size), config, progress=progress)
    report = plan.report
    report["source_model"] = str(model_dir)
    report["calibration"].update(
        {
            "paths": [str(p) for p in calib],
            "samples": int(ids.shape[0]),
            "seqlen": seqlen,
            "separator": separator,
            "tokens_in_blocks": int(mask.sum()),
        }
    )
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        write_into(tmp, model, plan, source_dir=model_dir, report=report)
    return report
