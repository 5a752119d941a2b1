"""Compressing a model directory (what ``lord-export compress`` runs): checks first, then block by
block from the safetensors shards into an output directory written atomically.

The model is built on the meta device and its blocks are read one at a time
(:class:`~lord_export.pipeline.streaming.CheckpointWeights`), so memory holds one block, its
statistics, the calibration activations and the embeddings/head. Everything that can be checked
cheaply (paths, the kind of model, the output, disk space, calibration files, sequence length,
device) is checked before any model weight is read; the input directory is only read.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration.data import CalibrationOptions, calibration_set, text_files
from ..config import LordConfig
from ..core.fingerprint import count_parameters, describe_model
from ..core.plan import QUANT_METHOD, Plan
from ..core.targets import select_targets
from ..errors import UsageError
from .compress import build_report, compress
from .survey import plan_budget

log = logging.getLogger(__name__)

#: Where a parameter budget's survey parks its factors, inside the (temporary) output directory.
SPILL_DIR = ".lord-factor-spill"


def check_dense_model_dir(model_dir: Path) -> None:
    """UsageError for a directory ``compress`` cannot start from: a LoRD directory (compressing twice
    compounds the error; compress the dense model again), or a quantized checkpoint."""
    from ..persist.io import PLAN_FILE

    config = json.loads((model_dir / "config.json").read_text())
    qc = config.get("quantization_config")
    if (model_dir / PLAN_FILE).is_file() or (isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD):
        raise UsageError(
            f"{str(model_dir)!r} is already a LoRD model (it holds a LoRD plan); compress the dense model it came "
            "from instead"
        )
    if isinstance(qc, dict) and qc.get("quant_method"):
        raise UsageError(
            f"{str(model_dir)!r} is quantized ({qc['quant_method']}); LoRD needs a dense floating-point checkpoint"
        )


def compress_model_dir(
    model_dir: str | Path,
    output_dir: str | Path,
    calib: Sequence[str | Path],
    config: LordConfig,
    *,
    data: CalibrationOptions | None = None,
    overwrite: bool | str = False,
    dtype: torch.dtype | None = None,
    compute_dtype: torch.dtype | str | None = "auto",
    device: str | torch.device | None = None,
    stats_device: str | torch.device | None = None,
    max_shard_bytes: int | None = None,
    trust_remote_code: bool = False,
    resume: bool = False,
    progress: Callable[[str], None] | None = None,
    bars: bool = False,
) -> dict[str, Any]:
    """Compress a model directory into ``output_dir`` (written atomically); return the report.

    ``dtype`` forces one dtype for loading, computing and storing everything; by default tensors
    are stored in the checkpoint's own dtypes and the work runs in ``compute_dtype`` ("auto":
    :func:`lord_export.device.compute_dtype`). Block by block, the run checkpoints after every
    block in its partial output (:mod:`lord_export.pipeline.resume`); when it stops early, ``resume``
    continues it.
    """
    from ..device import compute_dtype as choose_dtype
    from ..device import resolve_device
    from ..persist.checkpoint import DEFAULT_MAX_SHARD_BYTES
    from ..persist.hf import (
        check_model_dir,
        checkpoint_dtypes,
        load_dense,
        load_tokenizer,
        main_dtype,
        max_positions,
        weights_bytes,
    )
    from ..persist.io import REPORT_FILE, atomic_output_dir, build_skeleton, check_output, write_into, write_json
    from .engine import find_streamable_blocks

    say = progress or (lambda msg: None)
    max_shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    model_dir = check_model_dir(model_dir)
    check_dense_model_dir(model_dir)
    out = Path(output_dir)
    check_output(out, overwrite)
    if out.absolute() == model_dir.absolute():
        raise UsageError("the output directory must differ from the model directory")
    device = resolve_device(device)
    text_files(calib)  # fail on missing/empty/binary paths before loading anything heavy
    spills = config.param_ratio is not None and config.calibration == "independent"
    _check_disk_space(out, weights_bytes(model_dir) * (2 if spills else 1), spills)
    stored = checkpoint_dtypes(model_dir)
    choice = choose_dtype(device, dtype or main_dtype(stored), dtype or compute_dtype)
    say(f"computing in {choice.describe()['compute_dtype']} ({choice.reason})")
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
    options = dict(device=device, stats_device=stats_device)
    if blocks is None:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            model = load_dense(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
            plan = compress(model, calib_set.batches(), config, compute_dtype=choice.compute, **options)
            write_into(tmp, model, plan, source_dir=model_dir, max_shard_bytes=max_shard_bytes)
            report = _finish_report(plan.report, model_dir, device, choice, calib_set, on_cuda)
            write_json(tmp / REPORT_FILE, report)
        return report
    from .resume import Checkpoints, resumable_output_dir

    stores = {k: dtype for k in stored} if dtype is not None else stored
    settings = run_settings(config, choice, dtype, device, max_shard_bytes, calib_set)
    with resumable_output_dir(out, overwrite=overwrite, resume=resume) as tmp:
        checkpoints = Checkpoints(tmp, _run_key(model_dir, settings, calib_set), resume=resume)
        if not checkpoints.resumed:
            checkpoints.clear()  # a fresh start: nothing an earlier run left counts
            if resume:
                say("no checkpoint to resume from: starting from the beginning")
        run = StreamedRun(model, model_dir, blocks, tmp, calib_set, config, choice, stores, max_shard_bytes)
        report = run.compress(checkpoints, progress=say, bars=bars, **options)
        report = _finish_report(report, model_dir, device, choice, calib_set, on_cuda)
        write_json(tmp / REPORT_FILE, report)
        checkpoints.finish()
    return report


def run_settings(config: LordConfig, choice: Any, dtype: Any, device: Any, max_shard_bytes: int, calib_set) -> dict:
    """The settings that shape a run's output (what a resumed run must share with the run it continues)."""
    return {
        **config.to_dict(),
        "compute_dtype": choice.compute,
        "dtype": dtype,
        "device": torch.device(device).type,
        "max_shard_bytes": max_shard_bytes,
        "batch_size": calib_set.batch_size,
    }


def _run_key(model_dir: Path, settings: dict, calib_set: Any) -> dict:
    from .resume import run_key, tensors_fingerprint

    return run_key(model_dir, settings, tensors_fingerprint(calib_set.input_ids, calib_set.attention_mask))


def _finish_report(report: dict, model_dir: Path, device: Any, choice: Any, calib_set: Any, on_cuda: bool) -> dict:
    report["source_model"] = str(model_dir)
    report["device"] = str(device)
    report["dtype"] = choice.describe()
    if on_cuda:  # what the GPU needed: the streamed path's claim is one block's worth
        report["cuda_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    report["calibration"].update(calib_set.describe())
    return report


class StreamedRun:
    """The block-by-block path of :func:`compress_model_dir`: weights read and written a block at a time."""

    def __init__(self, model, model_dir, blocks, tmp, calib_set, config, choice, stored, max_shard_bytes):
        self.model, self.model_dir, self.blocks, self.tmp = model, model_dir, blocks, tmp
        self.calib_set, self.config, self.choice, self.stored = calib_set, config, choice, stored
        self.max_shard_bytes = max_shard_bytes

    def compress(self, checkpoints: Any, **engine_options: Any) -> dict:
        """Survey (for a parameter budget), then the block loop; checkpointed after every block."""
        from ..persist.checkpoint import CheckpointReader, FactorSpill, ShardWriter
        from ..persist.io import write_config_and_tokenizer, write_plan
        from .engine import Engine
        from .streaming import CheckpointWeights, targeted_linears
        from .survey import streamed_survey

        model, blocks, config, say = self.model, self.blocks, self.config, engine_options["progress"]
        t0 = time.perf_counter()
        base, params_before = describe_model(model), count_parameters(model)
        layers = select_targets(model, config.targets, config.exclude)
        source = CheckpointWeights(
            CheckpointReader(self.model_dir),
            self.choice.compute,
            getattr(model, "base_model_prefix", ""),
            fingerprint=targeted_linears(model, layers),
        )
        _load_outside_blocks(model, source, blocks, engine_options["device"])
        saved = checkpoints.state.get("run") or {}
        if saved.get("writer"):
            writer = ShardWriter.restore(self.tmp, saved["writer"], self.max_shard_bytes)
        else:
            writer = ShardWriter(self.tmp, self.max_shard_bytes)
        say(f"compressing {len(blocks)} blocks of {blocks.path} one at a time on {engine_options['device']}")
        store = self.choice.store if self.choice.store != self.choice.compute else None
        engine = Engine(model, config, source=source, writer=writer, store_dtype=store, **engine_options)
        engine.stored_dtypes = self.stored
        spill = None
        try:
            budget = None
            if config.param_ratio is not None:
                if config.calibration == "independent":  # the survey's factors are the answer, once truncated
                    spill = FactorSpill(self.tmp / SPILL_DIR, resume=checkpoints.resumed)
                    say(f"surveying {len(blocks)} blocks for the parameter budget (spectra and factors)")
                else:
                    say(f"surveying {len(blocks)} blocks for the parameter budget (spectra)")
                batches = list(self.calib_set.batches())
                surveyed = streamed_survey(engine, batches, blocks, spill=spill, checkpoints=checkpoints)
                budget = plan_budget(model, batches, config, [], surveyed=surveyed)
                engine.ranks = budget.ranks
            result = engine.run(self.calib_set.batches(), blocks, spill=spill, checkpoints=checkpoints)
            if spill is not None:
                budget.report["spilled_bytes"] = spill.bytes_written
            tied = engine.write_rest(blocks)
            writer.close()
            writer.finish_resumable()
        except BaseException:
            writer.abort()  # the open shard file; a resumed run continues from the last checkpoint
            raise
        if spill is not None:
            spill.close()
        base["weights"] = source.fingerprints
        plan = Plan(config=config, groups=result.groups, warnings=result.warnings, base_model=base)
        removed = sum(g.dense_params - g.factor_params for g in plan.factorized_groups)
        write_config_and_tokenizer(self.tmp, model, plan, self.model_dir)
        write_plan(self.tmp, plan, tied, None)
        return (
            build_report(
                plan,
                params_before=params_before,
                params_after=params_before - removed,
                calibration={"batches": result.calibration_batches},
                timings={**result.timings, "compress_s": round(time.perf_counter() - t0, 3)},
                streamed=True,
            )
            | ({"budget": budget.report} if budget is not None else {})
            | {"resumed": checkpoints.resumed}
        )


def _targets_outside(model: nn.Module, config: LordConfig, blocks: Any) -> bool:
    """Whether any targeted layer lies outside the repeated blocks (e.g. a targeted LM head)."""
    prefix = blocks.path + "."
    return any(not n.startswith(prefix) for n in select_targets(model, config.targets, config.exclude))


def _with_packing(data: CalibrationOptions | None, model_dir: Path, trust_remote_code: bool) -> CalibrationOptions:
    """``data`` with ``packing`` decided from the model's config when it was left open."""
    import dataclasses

    from transformers import AutoConfig

    from ..calibration.data import uses_packing

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
