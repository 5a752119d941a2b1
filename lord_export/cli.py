"""The ``lord-export`` command line. Exit codes: 0 success, 1 failure, 2 bad usage."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from .config import LordConfig
from .data import DEFAULT_SAMPLES, DEFAULT_SEQLEN
from .errors import LordError, UsageError
from .factorize import METHODS
from .targets import PRESETS

PROG = "lord-export"


def _help(name: str) -> str:
    from dataclasses import fields

    return next(f.metadata["help"] for f in fields(LordConfig) if f.name == name)


def _rank_reduction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1), got {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _rank_reduction_list(text: str) -> list[float]:
    """Comma-separated rank reductions, each in [0, 1)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--rank-reductions must be numbers separated by commas, got {text!r}") from None
    if not values or not all(0 <= r < 1 for r in values):
        raise UsageError(f"every rank reduction must be in [0, 1), got {text!r}")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Compress transformer models with LoRD (activation-aware low-rank decomposition) "
        "and hand them to the backends you deploy on.",
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    common.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    c = sub.add_parser(
        "compress",
        help="calibrate, factorize and save a LoRD-compressed model directory",
        description="Calibrate MODEL_DIR on text/code, factorize the targeted linear layers in closed form, "
        "and write OUTPUT_DIR (config, model.safetensors, lord_plan.json, report.json). "
        "Load the result with lord_export.load(OUTPUT_DIR).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=[common],
    )
    c.add_argument("model_dir", metavar="MODEL_DIR", help="a local Hugging Face model directory (safetensors)")
    c.add_argument("output_dir", metavar="OUTPUT_DIR", help="where to write the compressed model (must not exist)")
    c.add_argument(
        "--calib",
        nargs="+",
        required=True,
        metavar="PATH",
        help="calibration text/code files or folders (folders are read recursively)",
    )
    c.add_argument("--rank-reduction", type=_rank_reduction, required=True, metavar="R", help=_help("rank_reduction"))
    c.add_argument("--method", choices=METHODS, default="lord", help=_help("method"))
    c.add_argument(
        "--targets", nargs="+", default=["all"], metavar="T", help=f"{_help('targets')}; presets: {', '.join(PRESETS)}"
    )
    c.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN", help=_help("exclude"))
    c.add_argument("--no-grouping", action="store_true", help="factorize every layer on its own (no shared bottleneck)")
    c.add_argument("--rank-multiple", type=_positive_int, default=1, metavar="M", help=_help("rank_multiple"))
    c.add_argument("--force", action="store_true", help=_help("force"))
    c.add_argument(
        "--calib-samples", type=_positive_int, default=DEFAULT_SAMPLES, metavar="N", help="number of calibration blocks"
    )
    c.add_argument(
        "--calib-seqlen",
        type=_positive_int,
        default=None,
        metavar="L",
        help=f"tokens per calibration block (default: {DEFAULT_SEQLEN} or the model's maximum positions, "
        "whichever is smaller)",
    )
    c.add_argument(
        "--calib-separator",
        default=None,
        metavar="S",
        help="split calibration files into documents on this string (e.g. '<|endoftext|>')",
    )
    c.add_argument("--batch-size", type=_positive_int, default=8, help="calibration blocks per forward pass")
    c.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype to load the model in (factors are stored in it)",
    )
    c.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    c.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the model directory (off by default)"
    )
    c.set_defaults(func=_compress)

    e = sub.add_parser(
        "export",
        help="export a (LoRD or dense) model directory to ONNX or TensorRT",
        description="Export MODEL_DIR (an output of 'lord-export compress', or a dense model) to OUTPUT_DIR. "
        "ONNX: torch.export + the graph pass (one bottleneck MatMul per group) + torch.onnx (dynamo), "
        "dynamic batch/sequence axes, onnx.checker full check, and a validation run in ONNX Runtime "
        "(CUDA when available, else CPU) that fails the export above the tolerance. "
        "TensorRT: the same ONNX, checked for TensorRT-supported operators, built into engine.plan.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=[common],
    )
    e.add_argument("model_dir", metavar="MODEL_DIR")
    e.add_argument("output_dir", metavar="OUTPUT_DIR")
    e.add_argument("--format", choices=["onnx", "tensorrt"], default="onnx", help="what to produce")
    e.add_argument("--opset", type=_positive_int, default=18, help="ONNX opset")
    e.add_argument(
        "--dtype",
        choices=["float32", "float16"],
        default="float32",
        help="export dtype (float16 for GPUs; TensorRT engines take their precision from it)",
    )
    e.add_argument(
        "--int8",
        action="store_true",
        help="also write model.int8.onnx (ONNX Runtime dynamic int8 quantization) and report its error",
    )
    e.add_argument(
        "--with-past",
        action="store_true",
        help="causal LMs: export with KV-cache inputs/outputs (optimum's decoder-with-past layout, "
        "loads with optimum.onnxruntime.ORTModelForCausalLM; needs lord_export[optimum])",
    )
    e.add_argument("--no-validate", action="store_true", help="skip the ONNX Runtime validation run")
    e.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    e.set_defaults(func=_export)

    v = sub.add_parser(
        "eval",
        help="perplexity of a causal LM (dense or LoRD directory) on text/code",
        description="Perplexity of MODEL_DIR on --data. Each document (a file, or a --separator-delimited "
        "part of one) is tokenized on its own, starts with BOS when the tokenizer has one, and is cut into "
        "non-overlapping windows of --window tokens (stride = window, no context carried across windows); "
        "every token but a window's first is predicted. The result does not depend on --batch-size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=[common],
    )
    v.add_argument("model_dir", metavar="MODEL_DIR", help="a dense model directory or a lord-export compress output")
    v.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text/code files or folders")
    v.add_argument("--separator", default=None, metavar="S", help="document separator, e.g. '<|endoftext|>'")
    v.add_argument(
        "--window", type=_positive_int, default=512, help="tokens per window (at most the model's positions)"
    )
    v.add_argument("--batch-size", type=_positive_int, default=8, help="windows per forward pass")
    v.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    v.set_defaults(func=_eval)

    w = sub.add_parser(
        "sweep",
        help="perplexity and size over rank reductions × methods × targets, with plots",
        description="Calibrate MODEL_DIR once on --calib, then for every method × target preset × rank reduction "
        "factorize a fresh copy, evaluate perplexity on --eval (windowing as in 'eval') and count parameters. "
        "Writes sweep.csv, sweep.json and PNG plots (perplexity vs rank reduction and vs parameters; parameters "
        "vs rank reduction with parity points) into --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=[common],
    )
    w.add_argument("model_dir", metavar="MODEL_DIR", help="a dense model directory")
    w.add_argument("--calib", nargs="+", required=True, metavar="PATH")
    w.add_argument("--eval", nargs="+", required=True, metavar="PATH", dest="eval_data")
    w.add_argument("--rank-reductions", default="0.1,0.2,0.3,0.4,0.5", help="comma-separated values in [0, 1)")
    w.add_argument("--targets", nargs="+", default=["all"], choices=list(PRESETS), help="target presets to compare")
    w.add_argument("--methods", default="lord,svd", help=f"comma-separated, from {', '.join(METHODS)}")
    w.add_argument("--calib-samples", type=_positive_int, default=DEFAULT_SAMPLES, metavar="N")
    w.add_argument("--calib-seqlen", type=_positive_int, default=None, metavar="L")
    w.add_argument("--separator", default=None, metavar="S", help="document separator for --calib and --eval files")
    w.add_argument("--window", type=_positive_int, default=512)
    w.add_argument("--batch-size", type=_positive_int, default=8)
    w.add_argument("--out", required=True, metavar="DIR", help="output directory (created; files replaced)")
    w.set_defaults(func=_sweep)

    b = sub.add_parser(
        "bench",
        help="latency of a dense model vs its LoRD twin on each backend, side by side",
        description="Prefill latency at each --tokens count and token-by-token decode latency (KV cache) of "
        "DENSE_DIR and LORD_DIR (a 'lord-export compress' output of DENSE_DIR), interleaved on the same random "
        "inputs after warm-up; median and spread of --repeats runs, the ideal speed-up from the FLOP ratio, and "
        "measured/ideal. Backends: eager, compile (inductor vs backend='lord'), ort-cpu, ort-cuda, tensorrt; "
        "those this machine cannot run are listed as skipped with the reason.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=[common],
    )
    b.add_argument("dense_dir", metavar="DENSE_DIR", help="the dense model directory")
    b.add_argument("lord_dir", metavar="LORD_DIR", help="its LoRD-compressed directory")
    b.add_argument("--backends", nargs="+", default=["all"], metavar="B", help="backends to run, or 'all'")
    b.add_argument("--tokens", type=_positive_int, nargs="+", default=[128, 512], help="prefill token counts")
    b.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded one by one (0: no decode)")
    b.add_argument("--decode-context", type=_positive_int, default=128, help="prompt tokens before decoding")
    b.add_argument("--repeats", type=_positive_int, default=5)
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--device", default=None, help="torch device for eager/compile/tensorrt (default: cuda if present)")
    b.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="torch dtype for eager/compile/tensorrt (ONNX runs float32)",
    )
    b.add_argument("--threads", type=_positive_int, default=None, help="CPU threads for torch and ONNX Runtime")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    b.set_defaults(func=_bench)

    d = sub.add_parser(
        "demo",
        help="the whole pipeline on the shipped reference code model (no arguments needed)",
        description="Calibrate the shipped reference code model (a small Llama-style model trained on the Python "
        "standard library) on its calibration split, compress it with LoRD at a few rank reductions, evaluate "
        "held-out perplexity, export dense and LoRD to ONNX (validated in ONNX Runtime) and measure ONNX Runtime "
        "latency side by side. Prints a table; writes demo.json, demo.png and the ONNX files into --out. "
        "Point it at your own model with MODEL_DIR --calib ... --eval ....",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=[common],
    )
    d.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="your model directory (default: reference model)")
    d.add_argument("--calib", nargs="+", metavar="PATH", help="calibration data (default: the reference calib split)")
    d.add_argument("--eval", nargs="+", metavar="PATH", dest="eval_data", help="evaluation data (default: eval split)")
    d.add_argument("--rank-reductions", default="0.3,0.5", help="comma-separated values in (0, 1)")
    d.add_argument("--targets", nargs="+", default=["all"], metavar="T", help="targets to factorize")
    d.add_argument("--eval-tokens", type=_positive_int, default=65536, help="held-out tokens to evaluate (at most)")
    d.add_argument(
        "--seqlen", type=_positive_int, default=None, help="calibration/evaluation window (default: 256 or the model's)"
    )
    d.add_argument("--latency-tokens", type=_positive_int, default=512, help="prompt length for ORT latency")
    d.add_argument("--repeats", type=_positive_int, default=10, help="timed runs per model")
    d.add_argument("--out", default="lord-demo", metavar="DIR", help="output folder (an earlier demo's is replaced)")
    d.add_argument("--overwrite", action="store_true", help="replace --out even if it is not a demo output")
    d.set_defaults(func=_demo)
    return parser


def _demo(args: argparse.Namespace) -> int:
    from .demo import format_demo, run_demo

    rrs = _rank_reduction_list(args.rank_reductions)
    say = None if args.quiet else (lambda msg: print(f"demo: {msg}", file=sys.stderr, flush=True))
    result = run_demo(
        args.out,
        model_dir=args.model_dir,
        calib=args.calib,
        eval_data=args.eval_data,
        rank_reductions=rrs,
        targets=args.targets,
        eval_tokens=args.eval_tokens,
        seqlen=args.seqlen,
        latency_tokens=args.latency_tokens,
        repeats=args.repeats,
        overwrite=args.overwrite,
        progress=say,
    )
    print(format_demo(result))
    print(
        f"wrote {args.out}/demo.json{', demo.png' if result['plot'] else ''} and the ONNX files "
        f"({result['seconds']:.0f} s)"
    )
    return 0


def _bench(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from .bench import format_table, parse_backends, run_bench
    from .io import write_json

    backends = parse_backends(args.backends)  # before any loading: a typo fails at once
    if args.json and not Path(args.json).absolute().parent.is_dir():
        raise UsageError(f"the folder of --json {args.json!r} does not exist")
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"bench: {msg}", file=sys.stderr, flush=True))
    result = run_bench(
        args.dense_dir,
        args.lord_dir,
        backends,
        tokens=args.tokens,
        decode_tokens=args.decode_tokens,
        decode_context=args.decode_context,
        repeats=args.repeats,
        warmup=args.warmup,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        threads=args.threads,
        progress=say,
    )
    print(format_table(result))
    if args.json:
        write_json(Path(args.json), result.to_dict())
    if result.failed:
        print(f"{PROG}: failed: backend(s) {', '.join(result.failed)} could not be measured", file=sys.stderr)
        return 1
    return 0


def _compress(args: argparse.Namespace) -> int:
    import torch

    from .compress import compress_model_dir

    config = LordConfig(
        rank_reduction=args.rank_reduction,
        method=args.method,
        targets=tuple(args.targets),
        exclude=tuple(args.exclude),
        grouping=not args.no_grouping,
        rank_multiple=args.rank_multiple,
        force=args.force,
    )
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    report = compress_model_dir(
        args.model_dir,
        args.output_dir,
        args.calib,
        config,
        samples=args.calib_samples,
        seqlen=args.calib_seqlen,
        separator=args.calib_separator,
        batch_size=args.batch_size,
        overwrite=args.overwrite,
        dtype=dtype,
        trust_remote_code=args.trust_remote_code,
        progress=not args.quiet,
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


def _export(args: argparse.Namespace) -> int:
    from .onnx_export import ValidationError, export_onnx, quantize_int8

    if args.format == "tensorrt":
        from .tensorrt_export import require_tensorrt

        require_tensorrt("tensorrt")  # fail before any work when TensorRT is missing
    try:
        report = export_onnx(
            args.model_dir,
            args.output_dir,
            opset=args.opset,
            dtype=args.dtype,
            validate=not args.no_validate,
            overwrite=args.overwrite,
            with_past=args.with_past,
        )
    except ValidationError as err:
        print(f"{PROG}: failed: {err}; the ONNX is kept in {args.output_dir}.failed for inspection", file=sys.stderr)
        return 1
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
    if args.int8:
        q = quantize_int8(args.output_dir)
        print(
            f"wrote {q['path']}: {q['bytes_int8']:,} bytes ({q['bytes_int8'] / q['bytes_float']:.2f}x), "
            f"max relative error vs float {q['max_rel_error_vs_float']:.3g}, top-1 agreement {q['top1_agreement']:.3f}"
        )
    if args.format == "tensorrt":
        from pathlib import Path

        from .tensorrt_export import build_engine, make_profiles

        plan = build_engine(
            Path(args.output_dir) / "model.onnx", Path(args.output_dir) / "engine.plan", make_profiles(report["inputs"])
        )
        print(f"wrote {plan}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data import read_documents
    from .evaluate import document_windows, perplexity
    from .hf import check_model_dir, load_dense, load_tokenizer, max_positions
    from .io import PLAN_FILE, load, write_json

    src = check_model_dir(args.model_dir)
    max_pos = max_positions(src)
    if max_pos is not None and args.window > max_pos:
        raise UsageError(f"--window {args.window} exceeds the model's {max_pos} positions")
    tokenizer = load_tokenizer(src)
    windows = document_windows(tokenizer, read_documents(args.data, args.separator), args.window)
    total = sum(len(w) for w in windows)
    if total < args.window:
        raise UsageError(
            f"the evaluation data tokenizes to {total} tokens, fewer than one window of {args.window}; "
            "pass more data or a smaller --window"
        )
    model = load(src) if (src / PLAN_FILE).is_file() else load_dense(src)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    result = perplexity(model, windows, batch_size=args.batch_size, pad_id=pad, progress=not args.quiet)
    out = {
        "model": str(src),
        "data": list(args.data),
        "separator": args.separator,
        "window": args.window,
        "windows": len(windows),
        **result.to_dict(),
    }
    print(f"perplexity {result.perplexity:.4f} over {result.tokens:,} predicted tokens ({len(windows)} windows)")
    if args.json:
        write_json(Path(args.json), out)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data import batches, read_documents, tokenize_blocks
    from .evaluate import document_windows
    from .hf import check_model_dir, load_dense, load_tokenizer, max_positions
    from .sweep import run_sweep, write_sweep

    src = check_model_dir(args.model_dir)
    rrs = _rank_reduction_list(args.rank_reductions)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    max_pos = max_positions(src) or 512
    seqlen = args.calib_seqlen or min(DEFAULT_SEQLEN, max_pos)
    if args.window > max_pos or seqlen > max_pos:
        raise UsageError(f"--window/--calib-seqlen exceed the model's {max_pos} positions")
    tokenizer = load_tokenizer(src)
    ids, mask = tokenize_blocks(
        tokenizer, read_documents(args.calib, args.separator), samples=args.calib_samples, seqlen=seqlen
    )
    windows = document_windows(tokenizer, read_documents(args.eval_data, args.separator), args.window)
    if sum(len(w) for w in windows) < args.window:
        raise UsageError("the evaluation data tokenizes to fewer tokens than one window")
    model = load_dense(src)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    baseline, rows, parity = run_sweep(
        model,
        batches(ids, mask, args.batch_size),
        windows,
        rank_reductions=rrs,
        targets=args.targets,
        methods=methods,
        batch_size=args.batch_size,
        pad_id=pad,
        progress=not args.quiet,
    )
    write_sweep(Path(args.out), baseline, rows, parity)
    print(f"dense: perplexity {baseline['perplexity']:.4f}, {baseline['params']:,} parameters")
    print(f"{'method':6} {'targets':9} {'rr':>5} {'params':>10} {'ratio':>6} {'ppl':>9}")
    for r in rows:
        print(
            f"{r.method:6} {r.targets:9} {r.rank_reduction:5.2f} {r.params:10,d} {r.params_ratio:6.3f} "
            f"{r.perplexity:9.4f}"
        )
    print(f"wrote {args.out}/sweep.csv, sweep.json and 3 plots")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format=f"{PROG}: %(levelname)s: %(message)s",
    )
    try:
        return args.func(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except LordError as e:
        print(f"{PROG}: failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
