"""``lord-export compress``: calibrate, factorize and save a LoRD model directory."""

from __future__ import annotations

import argparse
import sys

from .args import add_calibration_args, add_config_args, add_device_args, calibration_options, config_from_args


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    c = sub.add_parser(
        "compress",
        help="calibrate, factorize and save a LoRD-compressed model directory",
        description="Calibrate MODEL_DIR on text/code, factorize the targeted linear layers in closed form, "
        "and write OUTPUT_DIR (config, model.safetensors, lord_plan.json, report.json). "
        "Load the result with lord_export.load(OUTPUT_DIR).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=parents,
    )
    c.add_argument("model_dir", metavar="MODEL_DIR", help="a local Hugging Face model directory (safetensors)")
    c.add_argument("output_dir", metavar="OUTPUT_DIR", help="where to write the compressed model (must not exist)")
    add_config_args(c)
    add_calibration_args(c)
    c.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype to load the model in (factors are stored in it)",
    )
    add_device_args(c, stats=True)
    c.add_argument(
        "--max-shard-size",
        default="2GB",
        metavar="SIZE",
        help="largest safetensors shard written (e.g. 500MB, 5GB); bigger outputs are sharded with an index",
    )
    c.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    c.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the model directory (off by default)"
    )
    c.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checkpoint import parse_size
    from ..compress import compress_model_dir
    from ..device import resolve_device

    device = resolve_device(args.device)  # a device that does not exist is a usage error before any work
    stats_device = resolve_device(args.stats_device) if args.stats_device else None
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    say = None if args.quiet else (lambda msg: print(f"compress: {msg}", file=sys.stderr, flush=True))
    report = compress_model_dir(
        args.model_dir,
        args.output_dir,
        args.calib,
        config_from_args(args),
        data=calibration_options(args),
        overwrite=args.overwrite,
        dtype=dtype,
        device=device,
        stats_device=stats_device,
        max_shard_bytes=parse_size(args.max_shard_size),
        trust_remote_code=args.trust_remote_code,
        progress=say,
        bars=not args.quiet,
    )
    before, after = report["params_before"], report["params_after"]
    print(
        f"wrote {args.output_dir}: {report['groups_factorized']} group(s) factorized, "
        f"{report['groups_left_dense']} left dense; parameters {before:,} -> {after:,} "
        f"({100 * (1 - after / before):.1f}% fewer)"
    )
    for w in report["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return 0
