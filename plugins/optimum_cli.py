"""``optimum-cli export onnx … --lord-rank-reduction R``: LoRD inside optimum's own ONNX export.

:func:`install` extends optimum-onnx's ``ONNXExportCommand`` (its parser gains the ``--lord-*``
flags, its ``run`` a wrapper). Without a LoRD flag the command runs exactly as upstream. With one,
the model optimum loads is compressed — calibrated on ``--lord-calib`` and factorized, or given an
existing ``--lord-plan`` — just before optimum's ``onnx_export_from_model`` exports it, so the
output is optimum's usual layout (KV-cache variants, validation, ``ORTModel*`` loading). The
output is written to a temporary directory and moved into place; ``lord_config.json`` beside the
ONNX records what was done.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

LORD_GROUP = "LoRD compression (lord_export)"


def add_lord_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``--lord-*`` flags (a flat list of declarations, hence the length)."""
    from lord_export.allocate import ALLOCATIONS, DEFAULT_ALLOCATION
    from lord_export.cli.args import override, param_ratio, positive_int, rank_reduction  # lord-export's checks
    from lord_export.config import CALIBRATION_MODES, DEFAULT_CALIBRATION

    g = parser.add_argument_group(
        LORD_GROUP,
        description="Every --lord-* option takes at most one value, so it may come before or after the output "
        "directory; repeat --lord-calib, --lord-targets and --lord-exclude for several values.",
    )
    g.add_argument(
        "--lord-rank-reduction",
        type=rank_reduction,
        default=None,
        metavar="R",
        help="compress with LoRD before exporting: fraction of each layer group's full rank "
        "min(sum d_out, d_in) removed, in [0, 1). Needs --lord-calib.",
    )
    g.add_argument(
        "--lord-param-ratio",
        type=param_ratio,
        default=None,
        metavar="P",
        help="compress with LoRD to this fraction of the whole model's parameters, in (0, 1], ranks per group "
        "chosen by --lord-allocation (instead of --lord-rank-reduction). Needs --lord-calib.",
    )
    g.add_argument("--lord-allocation", choices=ALLOCATIONS, default=DEFAULT_ALLOCATION, help="see lord-export")
    g.add_argument(
        "--lord-override",
        action="append",
        type=override,
        default=None,
        metavar="PATTERN=VALUE",
        help="per-layer rank reduction or 'dense' (repeatable), e.g. 're:.*o_proj$=dense'",
    )
    g.add_argument(
        "--lord-calibration", choices=CALIBRATION_MODES, default=DEFAULT_CALIBRATION, help="see lord-export compress"
    )
    g.add_argument(
        "--lord-calib",
        action="append",
        default=None,
        metavar="PATH",
        help="a calibration text/code file or folder (tokenized with the model's tokenizer); repeat the flag "
        "for more: --lord-calib a.txt --lord-calib code/. One path per flag, so the flag may come before or "
        "after the output directory",
    )
    g.add_argument(
        "--lord-calib-samples", type=positive_int, default=128, metavar="N", help="calibration blocks (default 128)"
    )
    g.add_argument(
        "--lord-calib-seqlen",
        type=positive_int,
        default=None,
        metavar="L",
        help="tokens per calibration block (default: 512 or the model's maximum positions)",
    )
    g.add_argument("--lord-calib-separator", default=None, metavar="S", help="split calibration files on S")
    g.add_argument(
        "--lord-targets",
        action="append",
        default=None,
        metavar="T",
        help="layers to compress: all, attention, mlp, mlp-down, a name or re:<regex> (default all); "
        "one per flag, repeat the flag for more",
    )
    g.add_argument(
        "--lord-exclude",
        action="append",
        default=None,
        metavar="PATTERN",
        help="a layer (name or re:<regex>) to leave dense; one per flag, repeat the flag for more",
    )
    g.add_argument(
        "--lord-method",
        choices=["lord", "svd", "asvd"],
        default="lord",
        help="factorization method (default lord: activation-aware, optimal)",
    )
    g.add_argument(
        "--lord-rank-multiple",
        type=positive_int,
        default=1,
        metavar="M",
        help="round ranks to a multiple of M (e.g. 8 or 64 for tensor cores)",
    )
    g.add_argument(
        "--lord-plan",
        default=None,
        metavar="DIR",
        help="apply an existing plan (an output directory of `lord-export compress`) instead of calibrating",
    )
    g.add_argument(
        "--lord-allow-base-mismatch",
        action="store_true",
        help="apply --lord-plan even though the model is not the dense model the plan was made from "
        "(different architecture fingerprint or different weights, e.g. a fine-tuned model)",
    )


def install() -> None:
    """Add the LoRD flags and run wrapper to optimum-onnx's ONNXExportCommand (idempotent)."""
    try:
        from optimum.commands.export.onnx import ONNXExportCommand
    except ImportError:  # optimum-onnx is not installed: nothing to extend
        return
    if getattr(ONNXExportCommand, "_lord_installed", False):
        return
    upstream_parse, upstream_run = ONNXExportCommand.parse_args, ONNXExportCommand.run

    def parse_args(parser: argparse.ArgumentParser) -> Any:
        result = upstream_parse(parser)
        add_lord_arguments(parser)
        return result

    def run(self: Any) -> Any:
        wanted = ("lord_rank_reduction", "lord_param_ratio", "lord_plan")
        if all(getattr(self.args, name, None) is None for name in wanted):
            return upstream_run(self)
        return run_with_lord(self, upstream_run)

    ONNXExportCommand.parse_args = staticmethod(parse_args)
    ONNXExportCommand.run = run
    ONNXExportCommand._lord_installed = True


def fail(message: str) -> None:
    """Stop optimum-cli with one clear line and exit code 2 (bad usage), like argparse does."""
    print(f"optimum-cli export onnx: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before optimum loads the model (SystemExit with code 2 style message)."""
    from lord_export.data import text_files
    from lord_export.errors import UsageError

    sizes = [f for f in ("lord_rank_reduction", "lord_param_ratio", "lord_plan") if getattr(args, f) is not None]
    if len(sizes) > 1:
        fail("use one of --lord-rank-reduction, --lord-param-ratio (calibrate here) or --lord-plan (an existing plan)")
    if args.lord_plan is not None:
        if not (Path(args.lord_plan) / "lord_plan.json").is_file():
            fail(
                f"--lord-plan {args.lord_plan!r} has no lord_plan.json "
                "(pass an output directory of lord-export compress)"
            )
        return
    if not args.lord_calib:
        fail("compressing needs calibration data: pass --lord-calib PATH (repeat the flag for more)")
    try:
        text_files(args.lord_calib)
    except UsageError as e:
        fail(str(e))


def compress_for_export(model: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Compress the model optimum loaded, in place; return the record written to lord_config.json."""
    import lord_export as le
    from lord_export.data import CalibrationOptions, calibration_set
    from lord_export.hf import load_tokenizer, max_positions, model_device

    if args.lord_plan is not None:
        plan = le.read_plan(args.lord_plan)
        le.apply_plan(model, plan, allow_mismatch=bool(getattr(args, "lord_allow_base_mismatch", False)))
        return {"plan": str(args.lord_plan), **plan.to_dict()}
    model_dir = Path(args.model)
    max_pos = max_positions(model_dir) if (model_dir / "config.json").is_file() else None
    tokenizer = load_tokenizer(model_dir, trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
    options = CalibrationOptions(
        samples=args.lord_calib_samples, seqlen=args.lord_calib_seqlen, separator=args.lord_calib_separator
    )
    calib_set = calibration_set(tokenizer, args.lord_calib, options, max_positions=max_pos)
    device = model_device(model)
    data = [{k: v.to(device) for k, v in b.items()} for b in calib_set.batches()]
    config = le.LordConfig(
        rank_reduction=args.lord_rank_reduction,
        param_ratio=args.lord_param_ratio,
        allocation=args.lord_allocation,
        overrides=dict(args.lord_override or []),
        calibration=args.lord_calibration,
        method=args.lord_method,
        targets=tuple(args.lord_targets or ["all"]),
        exclude=tuple(args.lord_exclude or []),
        rank_multiple=args.lord_rank_multiple,
    )
    plan = le.compress(model, data, config, progress=True)
    return plan.report


def run_with_lord(command: Any, upstream_run: Any) -> Any:
    """Run optimum's export with the model compressed first; output written atomically."""
    import optimum.exporters.onnx.__main__ as optimum_main

    from lord_export.cli import usage_message
    from lord_export.errors import LordError, UsageError

    args = command.args
    check_args(args)
    final = Path(args.output)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.lord-tmp-", dir=final.parent))
    record: dict[str, Any] = {}
    upstream_export = optimum_main.onnx_export_from_model

    def export_compressed(model: Any, output: Any, *a: Any, **kw: Any) -> Any:
        try:
            record.update(compress_for_export(model, args))
        except UsageError as e:
            fail(usage_message(e))
        except LordError as e:
            fail(str(e))
        return upstream_export(model, output, *a, **kw)

    args.output = str(tmp)
    optimum_main.onnx_export_from_model = export_compressed
    try:
        result = upstream_run(command)
        (tmp / "lord_config.json").write_text(json.dumps(record, indent=2, default=str) + "\n")
        _move_into_place(tmp, final)
        return result
    finally:
        optimum_main.onnx_export_from_model = upstream_export
        args.output = str(final)
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, final: Path) -> None:
    if not final.exists():
        tmp.rename(final)
        return
    for item in tmp.iterdir():  # like upstream optimum: files in an existing output are replaced
        target = final / item.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        shutil.move(str(item), target)
