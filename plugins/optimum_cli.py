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
    """The ``--lord-*`` flags: lord-export compress's own option definitions (``lord_export.cli.args``),
    prefixed, each list option taking one value per flag; plus ``--lord-plan``."""
    from lord_export.cli.args import CALIBRATION_OPTIONS, COMPRESSION_OPTIONS, add_options

    g = parser.add_argument_group(
        LORD_GROUP,
        description="The options of lord-export compress, prefixed with --lord-. Compressing needs "
        "--lord-rank-reduction R or --lord-param-ratio P and --lord-calib PATH; or apply an existing plan with "
        "--lord-plan DIR. Every --lord-* option takes at most one value, so it may come before or after the "
        "output directory; repeat --lord-calib, --lord-targets and --lord-exclude for several values.",
    )
    add_options(g, COMPRESSION_OPTIONS + CALIBRATION_OPTIONS, prefix="lord-", one_value=True)
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


def fail(message: str, code: int = 2) -> None:
    """Stop optimum-cli with one clear line and lord-export's exit code (2: bad usage, as argparse does;
    3: an input that is corrupt or does not fit; 1: the run failed)."""
    print(f"optimum-cli export onnx: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before optimum loads the model (SystemExit with code 2 style message)."""
    from lord_export.calibration.data import text_files
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
    from lord_export.calibration.data import calibration_set
    from lord_export.cli.args import calibration_options, config_from_args
    from lord_export.device import model_device
    from lord_export.persist.hf import load_tokenizer, max_positions

    if args.lord_plan is not None:
        plan = le.read_plan(args.lord_plan)
        le.apply_plan(model, plan, allow_mismatch=bool(getattr(args, "lord_allow_base_mismatch", False)))
        return {"plan": str(args.lord_plan), **plan.to_dict()}
    model_dir = Path(args.model)
    max_pos = max_positions(model_dir) if (model_dir / "config.json").is_file() else None
    tokenizer = load_tokenizer(model_dir, trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
    calib_set = calibration_set(tokenizer, args.lord_calib, calibration_options(args, "lord_"), max_positions=max_pos)
    device = model_device(model)
    data = [{k: v.to(device) for k, v in b.items()} for b in calib_set.batches()]
    config = config_from_args(args, prefix="lord_")
    plan = le.compress(model, data, config, progress=True)
    return plan.report


def run_with_lord(command: Any, upstream_run: Any) -> Any:
    """Run optimum's export with the model compressed first; output written atomically."""
    import optimum.exporters.onnx.__main__ as optimum_main

    from lord_export.cli import error_message
    from lord_export.errors import LordError

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
        except LordError as e:
            fail(error_message(e), e.exit_code)
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
