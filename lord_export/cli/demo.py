"""``lord-export demo``: the whole pipeline on the shipped reference code model (no arguments needed)."""

from __future__ import annotations

import argparse
import sys

from .args import HelpFormatter, add_alias, positive_int


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    d = sub.add_parser(
        "demo",
        help="the whole pipeline on the shipped reference code model (no arguments needed)",
        description="Calibrate the shipped reference code model (a small Llama-style model trained on the Python "
        "standard library) on its calibration split, compress it with LoRD at a few rank reductions, evaluate "
        "held-out perplexity, export dense and LoRD to ONNX (validated in ONNX Runtime) and measure ONNX Runtime "
        "latency side by side. Prints a table; writes demo.json, demo.png and the ONNX files into --out. "
        "Point it at your own model with MODEL_DIR --calib ... --eval ....",
        formatter_class=HelpFormatter,
        parents=parents,
    )
    d.add_argument("model_dir", nargs="?", metavar="MODEL_DIR", help="your model directory (default: reference model)")
    d.add_argument("--calib", nargs="+", metavar="PATH", help="calibration data (default: the reference calib split)")
    d.add_argument("--eval", nargs="+", metavar="PATH", dest="eval_data", help="evaluation data (default: eval split)")
    d.add_argument("--rank-reductions", default="0.3,0.5", help="comma-separated values in [0, 1)")
    d.add_argument("--targets", nargs="+", default=["all"], metavar="T", help="targets to factorize")
    d.add_argument("--eval-tokens", type=positive_int, default=65536, help="held-out tokens to evaluate (at most)")
    d.add_argument(
        "--seqlen", type=positive_int, default=None, help="calibration/evaluation window (default: 256 or the model's)"
    )
    d.add_argument("--latency-tokens", type=positive_int, default=512, help="prompt length for ORT latency")
    d.add_argument("--repeats", type=positive_int, default=10, help="timed runs per model")
    d.add_argument("--out", default="lord-demo", metavar="DIR", help="output folder (an earlier demo's is replaced)")
    d.add_argument(
        "--overwrite-any", action="store_true", help="replace --out even if it is not an earlier demo's output"
    )
    add_alias(d, "--overwrite", "--overwrite-any", "overwrite_any", nargs=0, store_const=True)
    d.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..config import parse_rank_reductions
    from ..measure.demo import format_demo, run_demo

    say = None if args.quiet else (lambda msg: print(f"demo: {msg}", file=sys.stderr, flush=True))
    result = run_demo(
        args.out,
        model_dir=args.model_dir,
        calib=args.calib,
        eval_data=args.eval_data,
        rank_reductions=parse_rank_reductions(args.rank_reductions),
        targets=args.targets,
        eval_tokens=args.eval_tokens,
        seqlen=args.seqlen,
        latency_tokens=args.latency_tokens,
        repeats=args.repeats,
        overwrite=args.overwrite_any,
        progress=say,
    )
    print(format_demo(result))
    print(
        f"wrote {args.out}/demo.json{', demo.png' if result['plot'] else ''} and the ONNX files "
        f"({result['seconds']:.0f} s)"
    )
    return 0
