"""Argument types and option groups shared by the subcommands (one definition of each knob)."""

from __future__ import annotations

import argparse
from dataclasses import fields

from ..allocate import ALLOCATIONS, DEFAULT_ALLOCATION
from ..config import (
    CALIBRATION_MODES,
    DEFAULT_CALIBRATION,
    LordConfig,
    check_param_ratio,
    check_rank_reduction,
    parse_override,
)
from ..data import DEFAULT_SAMPLES, DEFAULT_SEQLEN, CalibrationOptions
from ..errors import UsageError
from ..factorize import METHODS
from ..targets import PRESETS


def config_help(name: str) -> str:
    """The help text of a ``LordConfig`` field."""
    return next(f.metadata["help"] for f in fields(LordConfig) if f.name == name)


def rank_reduction(text: str) -> float:
    """argparse type: a rank reduction in [0, 1)."""
    try:
        return check_rank_reduction(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def param_ratio(text: str) -> float:
    """argparse type: a parameter ratio in (0, 1]."""
    try:
        return check_param_ratio(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def override(text: str) -> tuple[str, float | str]:
    """argparse type: PATTERN=VALUE with VALUE a rank reduction or 'dense'."""
    try:
        return parse_override(text)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def common_parser() -> argparse.ArgumentParser:
    """Options every subcommand has."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    return common


def add_calibration_args(parser: argparse.ArgumentParser, *, prefix: str = "calib", required: bool = True) -> None:
    """``--calib PATH...`` and the options that turn it into batches (see :mod:`lord_export.data`)."""
    g = parser.add_argument_group("calibration data")
    g.add_argument(
        f"--{prefix}",
        dest="calib",
        nargs="+",
        required=required,
        metavar="PATH",
        help="calibration text/code files or folders (folders are read recursively)",
    )
    g.add_argument(
        "--calib-samples", type=positive_int, default=DEFAULT_SAMPLES, metavar="N", help="number of calibration blocks"
    )
    g.add_argument(
        "--calib-seqlen",
        type=positive_int,
        default=None,
        metavar="L",
        help=f"tokens per calibration block (default: {DEFAULT_SEQLEN} or the model's maximum positions, "
        "whichever is smaller)",
    )
    g.add_argument(
        "--calib-separator",
        default=None,
        metavar="S",
        help="split calibration files into documents on this string (e.g. '<|endoftext|>')",
    )
    g.add_argument("--batch-size", type=positive_int, default=8, help="calibration blocks per forward pass")


def calibration_options(args: argparse.Namespace) -> CalibrationOptions:
    return CalibrationOptions(
        samples=args.calib_samples, seqlen=args.calib_seqlen, separator=args.calib_separator, batch_size=args.batch_size
    )


def add_config_args(parser: argparse.ArgumentParser) -> None:
    """The ``LordConfig`` knobs: what to compress and how."""
    g = parser.add_argument_group("compression")
    size = g.add_mutually_exclusive_group(required=True)
    size.add_argument("--rank-reduction", type=rank_reduction, metavar="R", help=config_help("rank_reduction"))
    size.add_argument("--param-ratio", type=param_ratio, metavar="P", help=config_help("param_ratio"))
    g.add_argument("--allocation", choices=ALLOCATIONS, default=DEFAULT_ALLOCATION, help=config_help("allocation"))
    g.add_argument(
        "--override",
        action="append",
        type=override,
        default=[],
        metavar="PATTERN=VALUE",
        help="per-layer setting that wins over --rank-reduction and the allocation, e.g. 're:.*o_proj$=0.6' or "
        "'down_proj=dense' (repeatable)",
    )
    g.add_argument("--method", choices=METHODS, default="lord", help=config_help("method"))
    g.add_argument(
        "--targets",
        nargs="+",
        default=["all"],
        metavar="T",
        help=f"{config_help('targets')}; presets: {', '.join(PRESETS)}",
    )
    g.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help=config_help("exclude"))
    g.add_argument("--no-grouping", action="store_true", help="factorize every layer on its own (no shared bottleneck)")
    g.add_argument("--rank-multiple", type=positive_int, default=1, metavar="M", help=config_help("rank_multiple"))
    g.add_argument("--force", action="store_true", help=config_help("force"))
    g.add_argument(
        "--calibration", choices=CALIBRATION_MODES, default=DEFAULT_CALIBRATION, help=config_help("calibration")
    )


def add_device_args(parser: argparse.ArgumentParser, *, stats: bool = False) -> None:
    """``--device`` (and ``--stats-device``): where the work runs; checked before any work."""
    parser.add_argument(
        "--device", default=None, help="compute device, e.g. cpu, cuda, cuda:1 (default: cuda when present, else cpu)"
    )
    if stats:
        parser.add_argument(
            "--stats-device",
            default=None,
            help="where calibration statistics live and are factorized, in float64 (default: --device, or cpu when "
            "--device has no float64, e.g. mps; 'cpu' saves accelerator memory)",
        )


def config_from_args(args: argparse.Namespace) -> LordConfig:
    return LordConfig(
        rank_reduction=args.rank_reduction,
        param_ratio=args.param_ratio,
        allocation=args.allocation,
        overrides=dict(args.override),
        method=args.method,
        targets=tuple(args.targets),
        exclude=tuple(args.exclude),
        grouping=not args.no_grouping,
        rank_multiple=args.rank_multiple,
        force=args.force,
        calibration=args.calibration,
    )
