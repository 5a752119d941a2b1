"""``lord-export bench``: dense vs LoRD latency on each backend, side by side."""

from __future__ import annotations

import argparse
import sys

from ..errors import UsageError
from .args import HelpFormatter, add_loading_args, non_negative_int, positive_int

PROG = "lord-export"


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    b = sub.add_parser(
        "bench",
        help="latency of a dense model vs its LoRD twin on each backend, side by side",
        description="Prefill latency at each --tokens count and token-by-token decode latency (KV cache) of "
        "DENSE_DIR and LORD_DIR (a 'lord-export compress' output of DENSE_DIR), interleaved on the same random "
        "inputs after warm-up; median and spread of --repeats runs, the ideal speed-up from the FLOP ratio, and "
        "measured/ideal. Backends: eager, compile (inductor vs backend='lord'), ort-cpu, ort-cuda, tensorrt; "
        "those this machine cannot run are listed as skipped with the reason.",
        formatter_class=HelpFormatter,
        parents=parents,
    )
    b.add_argument("dense_dir", metavar="DENSE_DIR", help="the dense model directory")
    b.add_argument("lord_dir", metavar="LORD_DIR", help="its LoRD-compressed directory")
    b.add_argument("--backends", nargs="+", default=["all"], metavar="B", help="backends to run, or 'all'")
    b.add_argument("--tokens", type=positive_int, nargs="+", default=[128, 512], help="prefill token counts")
    b.add_argument("--decode-tokens", type=int, default=32, help="tokens decoded one by one (0: no decode)")
    b.add_argument("--decode-context", type=positive_int, default=128, help="prompt tokens before decoding")
    b.add_argument(
        "--repeats", type=positive_int, default=5, help="timed runs per model and setting (the median is reported)"
    )
    b.add_argument(
        "--warmup", type=non_negative_int, default=2, help="untimed runs per model and setting before the timed ones"
    )
    b.add_argument("--device", default=None, help="torch device for eager/compile/tensorrt (default: cuda if present)")
    b.add_argument(
        "--dtype",
        choices=["float32", "float16", "bfloat16"],
        default="float32",
        help="the dtype both models are compared in on eager/compile/tensorrt, as asked (no automatic choice: "
        "on a CPU without bfloat16 units bfloat16 is slow for both); ONNX runs float32",
    )
    b.add_argument("--threads", type=positive_int, default=None, help="CPU threads for torch and ONNX Runtime")
    b.add_argument("--json", default=None, metavar="FILE", help="also write the results as JSON")
    add_loading_args(b)
    b.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from ..device import resolve_device
    from ..measure.backends import parse_backends
    from ..measure.bench import format_table, run_bench
    from ..persist.io import write_json

    backends = parse_backends(args.backends)  # before any loading: a typo fails at once
    device = resolve_device(args.device)
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
        device=device,
        dtype=getattr(torch, args.dtype),
        threads=args.threads,
        progress=say,
        trust_remote_code=args.trust_remote_code,
    )
    print(format_table(result))
    if args.json:
        write_json(Path(args.json), result.to_dict())
    if result.failed:
        print(f"{PROG}: failed: backend(s) {', '.join(result.failed)} could not be measured", file=sys.stderr)
        return 1
    return 0
