"""``lord-export compress``: calibrate, factorize and save a LoRD model directory."""

from __future__ import annotations

import argparse
import sys

from .args import (
    HelpFormatter,
    add_calibration_args,
    add_config_args,
    add_device_args,
    add_dtype_args,
    add_loading_args,
    add_output_args,
    calibration_options,
    config_from_args,
    dtype_arg,
    holdout_share,
    non_negative_int,
    overwrite_mode,
)


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    c = sub.add_parser(
        "compress",
        help="calibrate, factorize and save a LoRD-compressed model directory",
        description="Calibrate MODEL_DIR on text/code, factorize the targeted linear layers in closed form, "
        "and write OUTPUT_DIR (config, model.safetensors, lord_plan.json, report.json). "
        "Load the result with lord_export.load(OUTPUT_DIR).",
        formatter_class=HelpFormatter,
        parents=parents,
    )
    c.add_argument("model_dir", metavar="MODEL_DIR", help="a local Hugging Face model directory (safetensors)")
    c.add_argument(
        "output_dir",
        metavar="OUTPUT_DIR",
        help="where to write the compressed model (refused if it exists, unless --overwrite)",
    )
    add_config_args(c)
    add_calibration_args(c)
    s = c.add_argument_group("after the compression (on the whole compressed model)")
    s.add_argument(
        "--holdout",
        type=holdout_share,
        default=0.125,
        metavar="F",
        help="share of the calibration blocks held out from fitting: the stage report, the sanity check and the "
        "quality target are measured on them (0: none held out)",
    )
    s.add_argument(
        "--finetune-steps",
        type=non_negative_int,
        default=0,
        metavar="N",
        help="append the end-to-end stage: N AdamW steps of the factors distilled from the dense model (the KL of "
        "the logits and every block's hidden states) on the calibration blocks; 0: none",
    )
    s.add_argument(
        "--measure",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="report the held-out perplexity after each stage and greedy continuations, dense vs compressed "
        "(default: for models up to 3B parameters; both models are loaded whole)",
    )
    s.add_argument(
        "--sanity-prompts", type=non_negative_int, default=3, metavar="N", help="greedy continuations to compare"
    )
    add_dtype_args(c, what="one dtype to load, compute and store everything in")
    add_device_args(c, stats=True)
    c.add_argument(
        "--max-shard-size",
        default="2GB",
        metavar="SIZE",
        help="largest safetensors shard written (e.g. 500MB, 5GB); bigger outputs are sharded with an index",
    )
    add_output_args(c)
    c.add_argument(
        "--resume",
        action="store_true",
        help="continue a run that stopped (interrupted, crashed): it checkpoints after every block in "
        ".OUTPUT_DIR.lord-partial beside OUTPUT_DIR; the same model, settings and calibration data are required",
    )
    add_loading_args(c)
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..device import resolve_device

    device = resolve_device(args.device)  # a device that does not exist is a usage error before any work
    stats_device = resolve_device(args.stats_device) if args.stats_device else None
    say = None if args.quiet else (lambda msg: print(f"compress: {msg}", file=sys.stderr, flush=True))
    try:
        report = _compress(args, device, stats_device, say)
    except (Exception, KeyboardInterrupt):
        from ..pipeline.resume import MANIFEST, partial_dir

        partial = partial_dir(args.output_dir)
        if (partial / MANIFEST).is_file():
            print(
                f"compress: the run's progress is kept in {partial}; run the same command with --resume to "
                "continue it (or delete that folder)",
                file=sys.stderr,
            )
        raise
    before, after = report["params_before"], report["params_after"]
    print(
        f"wrote {args.output_dir}: {report['groups_factorized']} group(s) factorized, "
        f"{report['groups_left_dense']} left dense; parameters {before:,} -> {after:,} "
        f"({100 * (1 - after / before):.1f}% fewer)"
    )
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0


def _compress(args: argparse.Namespace, device: str, stats_device: str | None, say) -> dict:
    from ..persist.checkpoint import parse_size
    from ..pipeline.model_dir import compress_model_dir

    return compress_model_dir(
        args.model_dir,
        args.output_dir,
        args.calib,
        config_from_args(args),
        data=calibration_options(args),
        overwrite=overwrite_mode(args),
        dtype=dtype_arg(args.dtype),
        compute_dtype=dtype_arg(args.compute_dtype) or "auto",
        device=device,
        stats_device=stats_device,
        max_shard_bytes=parse_size(args.max_shard_size),
        trust_remote_code=args.trust_remote_code,
        resume=args.resume,
        finetune_steps=args.finetune_steps,
        measure=args.measure,
        sanity_prompts=args.sanity_prompts,
        progress=say,
        bars=not args.quiet,
    )
