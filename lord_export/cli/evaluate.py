"""``lord-export eval``: perplexity of a dense or LoRD model directory on text/code."""

from __future__ import annotations

import argparse

from .args import add_device_args, positive_int


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    v = sub.add_parser(
        "eval",
        help="perplexity of a causal LM (dense or LoRD directory) on text/code",
        description="Perplexity of MODEL_DIR on --data. Each document (a file, or a --separator-delimited "
        "part of one) is tokenized on its own, starts with BOS when the tokenizer has one, and is cut into "
        "non-overlapping windows of --window tokens (stride = window, no context carried across windows); "
        "every token but a window's first is predicted. The result does not depend on --batch-size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=parents,
    )
    v.add_argument("model_dir", metavar="MODEL_DIR", help="a dense model directory or a lord-export compress output")
    v.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text/code files or folders")
    v.add_argument("--separator", default=None, metavar="S", help="document separator, e.g. '<|endoftext|>'")
    v.add_argument("--window", type=positive_int, default=512, help="tokens per window (at most the model's positions)")
    v.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    v.add_argument("--json", default=None, metavar="FILE", help="also write the result as JSON")
    add_device_args(v)
    v.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..data import evaluation_windows
    from ..device import resolve_device
    from ..hf import check_model_dir, load_tokenizer, max_positions, pad_token_id
    from ..io import load_model_dir, write_json
    from ..measure.evaluate import perplexity

    src = check_model_dir(args.model_dir)
    device = resolve_device(args.device)
    tokenizer = load_tokenizer(src)
    windows = evaluation_windows(
        tokenizer, args.data, args.window, separator=args.separator, max_positions=max_positions(src)
    )
    model = load_model_dir(src).to(device)
    result = perplexity(
        model, windows, batch_size=args.batch_size, pad_id=pad_token_id(tokenizer), progress=not args.quiet
    )
    out = {
        "model": str(src),
        "data": list(args.data),
        "separator": args.separator,
        "window": args.window,
        "windows": len(windows),
        "device": device,
        **result.to_dict(),
    }
    print(f"perplexity {result.perplexity:.4f} over {result.tokens:,} predicted tokens ({len(windows)} windows)")
    if args.json:
        write_json(Path(args.json), out)
    return 0
