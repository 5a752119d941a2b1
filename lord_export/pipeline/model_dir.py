"""Compressing a model directory (what ``lord-export compress`` runs): checks first, then block by
block from the safetensors shards into an output directory written atomically.

The model is built on the meta device and its blocks are read one at a time
(:class:`~lord_export.pipeline.streaming.CheckpointWeights`), so memory holds one block, its
statistics, the calibration activations and the embeddings/head. Everything that can be checked
cheaply (paths, the kind of model, the output, disk space, calibration files, sequence length,
device) is checked before any model weight is read; the input directory is only read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..calibration.data import CalibrationOptions, calibration_set, calibration_size_warning, text_files
from ..config import LordConfig
from ..core.experts import prepare_experts
from ..core.fingerprint import count_parameters, describe_model
from ..core.plan import QUANT_METHODS, Plan
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
    if (model_dir / PLAN_FILE).is_file() or (isinstance(qc, dict) and qc.get("quant_method") in QUANT_METHODS):
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
    finetune_steps: int = 0,
    measure: bool | None = None,
    sanity_prompts: int = 3,
    progress: Callable[[str], None] | None = None,
    bars: bool = False,
) -> dict[str, Any]:
    """Compress a model directory into ``output_dir`` (written atomically); return the report.

    ``dtype`` forces one dtype for loading, computing and storing everything; by default tensors
    are stored in the checkpoint's own dtypes and the work runs in ``compute_dtype`` ("auto":
    :func:`lord_export.device.compute_dtype`). Block by block, the run checkpoints after every
    block in its partial output (:mod:`lord_export.pipeline.resume`); when it stops early, ``resume``
    continues it.

    After the compression, on the whole compressed model (:mod:`lord_export.pipeline.recipe`):
    ``finetune_steps`` > 0 runs the end-to-end stage (the factors distilled from the dense model);
    ``measure`` (default: for models up to 3B parameters) reports the held-out perplexity after each
    stage and ``sanity_prompts`` greedy continuations, dense vs compressed, on the calibration blocks
    ``data.holdout`` holds out. (Its length is this signature and docstring; the body is ~45 lines.)
    """
    from ..device import compute_dtype as choose_dtype
    from ..persist.checkpoint import DEFAULT_MAX_SHARD_BYTES
    from ..persist.hf import checkpoint_dtypes, load_dense, load_tokenizer, main_dtype
    from ..persist.io import REPORT_FILE, atomic_output_dir, build_skeleton, write_into, write_json

    say = progress or (lambda msg: None)
    max_shard_bytes = max_shard_bytes or DEFAULT_MAX_SHARD_BYTES
    model_dir, out, device = _checked_inputs(model_dir, output_dir, calib, config, overwrite, device)
    stored = checkpoint_dtypes(model_dir)
    choice = choose_dtype(device, dtype or main_dtype(stored), dtype or compute_dtype)
    say(f"computing in {choice.describe()['compute_dtype']} ({choice.reason})")
    tokenizer = load_tokenizer(model_dir, trust_remote_code=trust_remote_code)
    model = build_skeleton(model_dir, trust_remote_code)
    prepare_experts(model)  # per-expert linears, read from per-expert or fused checkpoint keys
    data_options, calib_all, calib_set, held, size_warning = _calibration_data(
        model, model_dir, tokenizer, calib, config, data, trust_remote_code, say, finetune_steps
    )
    blocks = _blocks_to_stream(model, config, held, say)
    on_cuda = torch.device(device).type == "cuda"
    if on_cuda:
        torch.cuda.reset_peak_memory_stats(device)
    options = dict(device=device, stats_device=stats_device)
    post = dict(
        finetune_steps=finetune_steps, measure=measure, sanity_prompts=sanity_prompts, device=device, bars=bars,
        max_shard_bytes=max_shard_bytes, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    if blocks is None:
        with atomic_output_dir(out, overwrite=overwrite) as tmp:
            model = load_dense(model_dir, dtype=dtype, trust_remote_code=trust_remote_code)
            plan = compress(model, calib_set.batches(), config, compute_dtype=choice.compute, **options)
            write_into(tmp, model, plan, source_dir=model_dir, max_shard_bytes=max_shard_bytes)
            report = _finish_report(plan.report, model_dir, device, choice, calib_set, held, on_cuda, size_warning)
            del model
            report |= after_compression(tmp, model_dir, tokenizer, calib_set, held, choice, stored, post, say)
            write_json(tmp / REPORT_FILE, report)
        return report
    from .resume import Checkpoints, resumable_output_dir

    stores = {k: dtype for k in stored} if dtype is not None else stored
    settings = run_settings(config, choice, dtype, device, max_shard_bytes, calib_set) | {
        "holdout": data_options.holdout
    }
    with resumable_output_dir(out, overwrite=overwrite, resume=resume) as tmp:
        checkpoints = Checkpoints(tmp, _run_key(model_dir, settings, calib_all), resume=resume)
        if not checkpoints.resumed:
            checkpoints.clear()  # a fresh start: nothing an earlier run left counts
            if resume:
                say("no checkpoint to resume from: starting from the beginning")
        run = StreamedRun(model, model_dir, blocks, tmp, calib_set, config, choice, stores, max_shard_bytes, held)
        report = run.compress(checkpoints, progress=say, bars=bars, **options)
        report = _finish_report(report, model_dir, device, choice, calib_set, held, on_cuda, size_warning)
        report |= after_compression(tmp, model_dir, tokenizer, calib_set, held, choice, stores, post, say)
        write_json(tmp / REPORT_FILE, report)
        checkpoints.finish()
    return report


def _checked_inputs(model_dir, output_dir, calib, config, overwrite, device) -> tuple[Path, Path, Any]:
    """(model directory, output directory, device) once everything that can be checked before reading a
    weight is: the directories, the kind of model, the output rule, the device, the calibration files,
    the free disk space."""
    from ..device import resolve_device
    from ..persist.hf import check_model_dir, weights_bytes
    from ..persist.io import check_output

    model_dir = check_model_dir(model_dir)
    check_dense_model_dir(model_dir)
    out = Path(output_dir)
    check_output(out, overwrite)
    if out.absolute() == model_dir.absolute():
        raise UsageError("the output directory must differ from the model directory")
    device = resolve_device(device)
    text_files(calib)  # fail on missing/empty/binary paths before loading anything heavy
    spills = config.max_ppl_increase is not None or (
        config.param_ratio is not None and config.calibration == "independent"
    )
    _check_disk_space(out, weights_bytes(model_dir) * (2 if spills else 1), spills)
    return model_dir, out, device


def _calibration_data(model, model_dir, tokenizer, calib, config, data, trust_remote_code, say, finetune_steps=0):
    """(options, all blocks, the blocks to fit on, the held-out blocks or None, the size warning or None):
    the calibration set sized to the model's widest targeted input, split for the held-out slice.

    With ``finetune_steps`` the same files give the fine-tune stage its own blocks (``calib_set.finetune``:
    text no fitted or held-out block holds; measured, fine-tuning on fresh text recovers far more than
    cycling the calibration blocks)."""
    from ..persist.hf import max_positions
    from .recipe import FINETUNE_ROWS

    widest = _widest_input(model, config)
    data_options = _sized(_with_packing(data, model_dir, trust_remote_code), widest, max_positions(model_dir))
    fresh = finetune_steps * FINETUNE_ROWS
    positions = max_positions(model_dir)
    calib_all = calibration_set(tokenizer, calib, data_options, max_positions=positions, fresh_samples=fresh)
    calib_set, held = calib_all.split(data_options.holdout)
    calib_set.finetune, calib_all.finetune = calib_all.finetune, None
    size_warning = calibration_size_warning(calib_set.tokens, widest)
    if size_warning:
        say(f"warning: {size_warning}")
    return data_options, calib_all, calib_set, held, size_warning


def _blocks_to_stream(model: nn.Module, config: LordConfig, held: Any, say: Callable) -> Any:
    """The blocks to compress one at a time (None: the whole model in memory); UsageError for a
    quality target the model or the data cannot support."""
    from .engine import find_streamable_blocks

    blocks, _ = find_streamable_blocks(model)
    if config.max_ppl_increase is not None and (blocks is None or _targets_outside(model, config, blocks)):
        raise UsageError("a quality target needs a model compressed block by block, with targets inside the blocks")
    if config.max_ppl_increase is not None and held is None:
        raise UsageError(
            "a quality target is measured on held-out calibration blocks: hold some out (holdout > 0, and at "
            "least 2 calibration blocks)"
        )
    if blocks is not None and config.param_ratio is not None and _targets_outside(model, config, blocks):
        # the streamed survey covers the blocks; targets outside them need the whole-model one
        say("the targets include layers outside the blocks: the budget is allocated over the whole model in memory")
        return None
    return blocks


def after_compression(tmp, model_dir, tokenizer, calib_set, held, choice, stored, post, say) -> dict[str, Any]:
    """The stages on the whole compressed model written in ``tmp`` (see :func:`compress_model_dir`):
    the report's ``stages``, ``finetune`` and ``sanity`` entries; the fine-tuned weights rewritten in ``tmp``."""
    from ..core.fingerprint import count_parameters as params_of
    from ..persist.hf import load_dense, pad_token_id
    from ..persist.io import load, read_plan, rewrite_weights
    from . import recipe
    from .heal import mark_healed

    steps, measure = post["finetune_steps"], post["measure"]
    if not steps and measure is False:
        return {}
    trust = post["trust_remote_code"]
    lord = load(tmp, dtype=choice.compute, trust_remote_code=trust).to(post["device"])
    if measure is None:
        measure = params_of(lord) <= recipe.MEASURE_UP_TO
    if not steps and not measure:
        return {"stages": "not measured: the model is over 3B parameters (pass measure=True / --measure)"}
    out: dict[str, Any] = {}
    dense = load_dense(model_dir, dtype=choice.compute, trust_remote_code=trust).to(post["device"])
    windows = recipe.holdout_windows(held) if held is not None else []
    pad, batch = pad_token_id(tokenizer), calib_set.batch_size
    rows = []
    if measure and windows:
        say(f"measuring the dense and the compressed model on {sum(map(len, windows)):,} held-out calibration tokens")
        dense_ppl = recipe.held_out_perplexity(dense, windows, pad, batch)
        rows.append(("compressed", recipe.held_out_perplexity(lord, windows, pad, batch), 0.0))
    if steps:
        say(f"fine-tuning the factors for {steps} step(s), the dense model as the teacher")
        lord, dense = lord.float(), dense.float()
        data, source = recipe.finetune_batches(calib_set)
        say(f"fine-tuning on {source}")
        out["finetune"] = recipe.finetune(lord, dense, data, steps, post["device"], post["bars"])
        out["finetune"]["data"] = source
        if measure and windows:
            rows.append(
                ("fine-tuned", recipe.held_out_perplexity(lord, windows, pad, batch), out["finetune"]["seconds"])
            )
        plan = read_plan(tmp, with_tensors=False)
        mark_healed(plan, f"fine-tuned end to end after factorization ({steps} steps, distilled from the dense model)")
        rewrite_weights(tmp, lord.cpu(), plan, max_shard_bytes=post["max_shard_bytes"],
                        dtype_of=lambda name: stored.get(name, choice.store))  # fmt: skip
    if rows:
        out["stages"] = recipe.stage_report(dense_ppl, rows)
        for r in out["stages"][1:]:
            say(f"held-out perplexity {r['stage']}: {r['perplexity']:.4f} ({100 * r['increase']:+.1f}% over dense)")
    if measure and held is not None and post["sanity_prompts"]:
        prompts = recipe.prompts_from(held, post["sanity_prompts"])
        out["sanity"] = recipe.continuations(dense, lord, tokenizer, prompts)
        if out["sanity"]["degenerate"]:
            say("warning: the compressed model's greedy continuations look degenerate (see report.json, sanity)")
    return out


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


def _widest_input(model: nn.Module, config: LordConfig) -> int:
    """The most input features of a targeted linear layer."""
    from ..core.targets import find_linears

    linears = find_linears(model)
    return max((linears[n].d_in for n in select_targets(model, config.targets, config.exclude)), default=1)


def _sized(options: CalibrationOptions, widest: int, positions: int | None) -> CalibrationOptions:
    """``options`` with the number of samples sized to the model when it was left open (None)."""
    from ..calibration.data import resolve_seqlen, samples_for

    if options.samples is not None:
        return options
    return dataclasses.replace(options, samples=samples_for(widest, resolve_seqlen(options.seqlen, positions)))


def _finish_report(
    report: dict,
    model_dir: Path,
    device: Any,
    choice: Any,
    calib_set: Any,
    held: Any,
    on_cuda: bool,
    size_warning: Any = None,
) -> dict:
    if size_warning and size_warning not in report["warnings"]:
        report["warnings"].append(size_warning)
    report["source_model"] = str(model_dir)
    report["device"] = str(device)
    report["dtype"] = choice.describe()
    if on_cuda:  # what the GPU needed: the streamed path's claim is one block's worth
        report["cuda_peak_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    report["calibration"].update(calib_set.describe())
    report["calibration"]["held_out_samples"] = int(held.input_ids.shape[0]) if held is not None else 0
    return report


class StreamedRun:
    """The block-by-block path of :func:`compress_model_dir`: weights read and written a block at a time."""

    def __init__(self, model, model_dir, blocks, tmp, calib_set, config, choice, stored, max_shard_bytes, held=None):
        self.model, self.model_dir, self.blocks, self.tmp = model, model_dir, blocks, tmp
        self.calib_set, self.config, self.choice, self.stored = calib_set, config, choice, stored
        self.max_shard_bytes, self.held = max_shard_bytes, held

    def search(self, surveyed: Any, spill: Any, checkpoints: Any, device: Any, say: Callable) -> Any:
        """The quality target's bisection (:mod:`lord_export.pipeline.target`) on the dense model in memory,
        candidates made by truncating the survey's kept factors; measured on the held-out calibration blocks."""
        from ..persist.hf import load_dense, pad_token_id
        from . import recipe, target
        from .engine import take_kept

        saved = checkpoints.state.get("quality_target")
        if saved:
            say(
                f"quality target: resuming with the ratio chosen before the interruption "
                f"({saved['chosen_param_ratio']})"
            )
            return target.TargetSearch(saved["max_ppl_increase"], saved["dense_perplexity"], saved["curve"],
                                       saved["chosen_param_ratio"])  # fmt: skip
        if self.held is None:
            raise UsageError("a quality target is measured on held-out calibration blocks: hold some out (holdout > 0)")
        from ..persist.hf import load_tokenizer

        windows = recipe.holdout_windows(self.held)
        pad = pad_token_id(load_tokenizer(self.model_dir))
        ppl = target.held_out_evaluation(windows, pad, self.calib_set.batch_size)
        dense = load_dense(self.model_dir, dtype=self.choice.compute).to(device)
        kept = {i: take_kept(spill, i, device) for i in range(len(self.blocks))}
        evaluate = target.truncation_evaluator(dense, self.blocks.path, kept, self.config, ppl)
        config = self.config
        say(f"quality target: the smallest parameter ratio within +{100 * config.max_ppl_increase:g}% held-out "
            f"perplexity, on {sum(map(len, windows)):,} held-out calibration tokens")  # fmt: skip
        result = target.search_ratio(
            config.max_ppl_increase, surveyed, evaluate, ppl(dense),
            method=config.allocation, multiple=config.rank_multiple, say=say,
        )  # fmt: skip
        del dense, kept
        checkpoints.save(quality_target=result.to_dict())
        say(f"quality target: parameter ratio {result.chosen:.4f} chosen")
        return result

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
        spill = search = None
        try:
            budget = None
            if config.param_ratio is not None or config.max_ppl_increase is not None:
                # the survey keeps its factors when they are the answer once truncated (independent calibration)
                # or when candidate ratios are measured by truncating them (a quality target)
                if config.calibration == "independent" or config.max_ppl_increase is not None:
                    spill = FactorSpill(self.tmp / SPILL_DIR, resume=checkpoints.resumed)
                    say(f"surveying {len(blocks)} blocks for the parameter budget (spectra and factors)")
                else:
                    say(f"surveying {len(blocks)} blocks for the parameter budget (spectra)")
                batches = list(self.calib_set.batches())
                surveyed = streamed_survey(engine, batches, blocks, spill=spill, checkpoints=checkpoints)
                if config.max_ppl_increase is not None:
                    search = self.search(surveyed, spill, checkpoints, engine_options["device"], say)
                    config = config.replace(max_ppl_increase=None, param_ratio=search.chosen)
                    engine.config = config
                budget = plan_budget(model, batches, config, [], surveyed=surveyed)
                engine.ranks, engine.fisher = budget.ranks, budget.fisher
            kept_spill = spill if config.calibration == "independent" else None
            result = engine.run(self.calib_set.batches(), blocks, spill=kept_spill, checkpoints=checkpoints)
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
            | ({"quality_target": search.to_dict()} if search is not None else {})
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
