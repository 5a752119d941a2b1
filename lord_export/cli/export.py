"""``lord-export export``: a LoRD (or dense) model directory to ONNX or a TensorRT engine."""

from __future__ import annotations

import argparse
import sys

from .args import HelpFormatter, add_loading_args, add_output_args, overwrite_mode, positive_int

PROG = "lord-export"


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    e = sub.add_parser(
        "export",
        help="export a (LoRD or dense) model directory to ONNX or TensorRT",
        description="Export MODEL_DIR (an output of 'lord-export compress', or a dense model) to OUTPUT_DIR. "
        "ONNX: torch.export + the graph pass (one bottleneck MatMul per group) + torch.onnx (dynamo), "
        "dynamic batch/sequence axes, onnx.checker full check, and a validation run in ONNX Runtime "
        "(CUDA when available, else CPU) that fails the export above the tolerance. "
        "TensorRT: the same ONNX, checked for TensorRT-supported operators, built into engine.plan.",
        formatter_class=HelpFormatter,
        parents=parents,
    )
    e.add_argument("model_dir", metavar="MODEL_DIR")
    e.add_argument("output_dir", metavar="OUTPUT_DIR")
    e.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx", help="what to produce")
    e.add_argument("--opset", type=positive_int, default=18, help="ONNX opset")
    e.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="export dtype (float16 for GPUs; TensorRT engines take their precision from it)",
    )
    e.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        default=None,
        help="also write a quantized copy and report its size and error: int8 = model.int8.onnx "
        "(ONNX Runtime dynamic int8: int8 weights, activations quantized per call); int4 = model.int4.onnx "
        "(ONNX Runtime MatMulNBits: 4-bit weights, one scale and zero point per --block-size weights "
        "along each MatMul's input dimension, i.e. along the rank for up-projections; a MatMul whose "
        "input dimension the block size does not divide gets the largest power of two >= 16 that divides "
        "it, else ONNX Runtime zero-pads it)",
    )
    e.add_argument("--int8", action="store_true", help="alias of --quantize int8")
    e.add_argument(
        "--block-size",
        type=positive_int,
        default=128,
        help="--quantize int4: weights per quantization block (a power of two >= 16)",
    )
    e.add_argument(
        "--symmetric",
        action="store_true",
        help="--quantize int4: symmetric blocks (no zero points; smaller, usually less accurate)",
    )
    e.add_argument(
        "--with-past",
        action="store_true",
        help="causal LMs: export with KV-cache inputs/outputs (optimum's decoder-with-past layout, "
        "loads with optimum.onnxruntime.ORTModelForCausalLM; needs lord_export[optimum]; float32 only)",
    )
    e.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime validation run")
    add_output_args(e)
    add_loading_args(e)
    e.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export.onnx import ValidationError, export_onnx, quantize_onnx

    if args.format == "tensorrt":
        from ..export.tensorrt import require_tensorrt

        require_tensorrt("tensorrt")  # fail before any work when TensorRT is missing
    if (args.quantize == "int4") and (args.block_size < 16 or args.block_size & (args.block_size - 1)):
        print(f"{PROG}: --block-size must be a power of two >= 16, got {args.block_size}", file=sys.stderr)
        return 2
    try:
        report = export_onnx(
            args.model_dir,
            args.output_dir,
            opset=args.opset,
            dtype=args.dtype,
            validate=not args.no_validate,
            overwrite=overwrite_mode(args),
            trust_remote_code=args.trust_remote_code,
            with_past=args.with_past,
        )
    except ValidationError as err:
        print(f"{PROG}: failed: {err}; the ONNX is kept in {args.output_dir}.failed for inspection", file=sys.stderr)
        return 1
    _print_report(report)
    quantize = args.quantize or ("int8" if args.int8 else None)
    if quantize:
        q = quantize_onnx(args.output_dir, quantize, block_size=args.block_size, is_symmetric=args.symmetric)
        print(
            f"wrote {q['path']}: {q['bytes_quantized']:,} bytes ({q['bytes_quantized'] / q['bytes_float']:.2f}x), "
            f"max relative error vs float {q['max_rel_error_vs_float']:.3g}, top-1 agreement {q['top1_agreement']:.3f}"
        )
    if args.format == "tensorrt":
        from pathlib import Path

        from ..export.tensorrt import build_engine, make_profiles

        out = Path(args.output_dir)
        engine = build_engine(out / "model.onnx", out / "engine.plan", make_profiles(report["inputs"]))
        print(f"wrote {engine}")
    return 0


def _print_report(report: dict) -> None:
    v = report.get("validation") or {}
    print(
        f"wrote {report['path']} (opset {report['opset']}, {report['dtype']}, {report['onnx_bytes']:,} bytes): "
        f"{report['bottleneck_matmuls']} bottleneck MatMul(s) for {report['factorized_groups']} factorized group(s), "
        f"{report['up_projection_matmuls']} up-projection(s)"
    )
    if v and "provider" in v:
        print(
            f"validated in ONNX Runtime ({v['provider']}): max abs error {v['max_abs_error']:.3g}, "
            f"relative {v['max_rel_error']:.3g} <= {v['tolerance']:g}"
        )
