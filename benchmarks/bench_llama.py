"""`lord-export bench` on the mid-size Llama-style model of the speed benchmarks (random weights).

Builds the dense model of compile_speed.add_model_args (hidden 1024, 8 layers, GQA, SwiGLU 2816,
vocab 8192), compresses it with LoRD (calibrated on random tokens: speed does not depend on the
weights), saves both directories, then runs the real command line
``lord-export bench DENSE LORD --backends all ...`` and writes its JSON.

    python benchmarks/bench_llama.py [--tokens 128 512 2048] [--rank-reduction 0.5] [--backends all]
        [--device cuda --dtype bfloat16] [--hidden 4096 --intermediate 11008 --layers 4 --vocab 32000]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from compile_speed import add_model_args, add_speed_args, build


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    add_speed_args(ap)
    ap.add_argument("--backends", nargs="+", default=["all"])
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--decode-context", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None, help="CPU threads for torch and ORT")
    ap.add_argument("--device", default=None, help="torch device of eager/compile (default: cuda if present)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--verbose", action="store_true", help="the bench's debug log (tracebacks of failed backends)")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/bench_llama_<cpu|cuda>.json")
    args = ap.parse_args()
    import lord_export as le

    if args.decode_context + args.decode_tokens > max(args.tokens):
        ap.error("--decode-context + --decode-tokens must fit in the largest --tokens (the model's positions)")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dense, lord, plan = build(args, device)
    work = Path(tempfile.mkdtemp(prefix="lord-bench-llama-"))
    dense.save_pretrained(work / "dense")
    le.save_compressed(lord, plan, work / "lord")
    out = args.json or f"benchmarks/results/bench_llama_{device}.json"
    cmd = [
        sys.executable, "-m", "lord_export.cli", "bench", str(work / "dense"), str(work / "lord"),
        "--backends", *args.backends, "--tokens", *map(str, args.tokens), "--decode-tokens", str(args.decode_tokens),
        "--decode-context", str(args.decode_context), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
        "--json", out, "--device", device, "--dtype", args.dtype, *(["-v"] if args.verbose else []),
        *(["--threads", str(args.threads)] if args.threads else []),
    ]  # fmt: skip
    print(" ".join(cmd[1:]), flush=True)
    sys.exit(subprocess.call(cmd))


if __name__ == "__main__":
    main()
