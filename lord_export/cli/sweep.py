"""``lord-export sweep``: perplexity and size over rank reductions × methods × targets, with plots."""

from __future__ import annotations

import argparse

from ..config import CALIBRATION_MODES, DEFAULT_CALIBRATION
from ..core.allocate import ALLOCATIONS, DEFAULT_ALLOCATION
from ..core.factorize import METHODS
from ..core.targets import PRESETS
from .args import (
    HelpFormatter,
    add_alias,
    add_calibration_args,
    add_device_args,
    add_eval_args,
    add_loading_args,
    positive_int,
)


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    w = sub.add_parser(
        "sweep",
        help="perplexity and size over rank reductions × methods × targets, with plots",
        description="Calibrate MODEL_DIR once on --calib, then for every method × target preset × rank reduction "
        "factorize a fresh copy, evaluate perplexity on --eval (windowing as in 'eval') and count parameters. "
        "Writes sweep.csv, sweep.json and PNG plots (perplexity vs rank reduction and vs parameters; parameters "
        "vs rank reduction with parity points) into --out.",
        formatter_class=HelpFormatter,
        parents=parents,
    )
    w.add_argument("model_dir", metavar="MODEL_DIR", help="a dense model directory")
    w.add_argument("--rank-reductions", default="0.1,0.2,0.3,0.4,0.5", help="comma-separated values in [0, 1)")
    w.add_argument(
        "--param-ratios",
        default="",
        help="comma-separated parameter ratios in (0, 1] (budget settings, see --allocations)",
    )
    w.add_argument(
        "--allocations",
        default=DEFAULT_ALLOCATION,
        help=f"comma-separated, from {', '.join(ALLOCATIONS)} (with --param-ratios)",
    )
    w.add_argument("--targets", nargs="+", default=["all"], choices=list(PRESETS), help="target presets to compare")
    w.add_argument("--methods", default="lord,svd", help=f"comma-separated, from {', '.join(METHODS)}")
    w.add_argument(
        "--calibrations",
        default=DEFAULT_CALIBRATION,
        help=f"comma-separated calibration modes to compare, from {', '.join(CALIBRATION_MODES)}",
    )
    add_device_args(w)
    add_calibration_args(w)
    add_eval_args(w, required=True)
    add_alias(w, "--window", "--eval-window", "eval_window", type=positive_int)
    add_loading_args(w)
    w.add_argument("--out", required=True, metavar="DIR", help="result folder (created; its sweep files are replaced)")
    h = w.add_argument_group("HumanEval side by side (needs lord_export[humaneval])")
    h.add_argument(
        "--humaneval",
        action="store_true",
        help="also measure greedy HumanEval pass@1 of the dense model and every setting (humaneval.json)",
    )
    h.add_argument(
        "--allow-code-execution",
        action="store_true",
        help="run the model-written programs (sandboxed subprocesses; --humaneval is refused without it)",
    )
    h.add_argument("--humaneval-limit", type=positive_int, default=None, metavar="N", help="only the first N problems")
    h.add_argument(
        "--humaneval-max-new-tokens", type=positive_int, default=256, metavar="N", help="tokens per completion"
    )
    w.set_defaults(func=run)


def humaneval_runner(args: argparse.Namespace, tokenizer, device, results: dict):
    """The ``humaneval`` callable of :func:`~lord_export.measure.sweep.run_sweep`; keeps every result."""
    from ..measure.humaneval import evaluate_humaneval

    def run_one(model, label: str) -> dict:
        results[label] = evaluate_humaneval(
            label,
            model=model,
            tokenizer=tokenizer,
            limit=args.humaneval_limit,
            max_new_tokens=args.humaneval_max_new_tokens,
            batch_size=args.batch_size,
            allow_code_execution=True,
            device=device,
            progress=not args.quiet,
        )
        return results[label]

    return run_one


def write_humaneval(out_dir, results: dict) -> str:
    """humaneval.json (every result, and each setting against dense) and a side-by-side text table."""
    from ..measure.humaneval import compare_table
    from ..persist.io import write_json

    dense = results["dense"]
    lines = [
        f"HumanEval pass@1 ({dense['problems']} problems, greedy)",
        f"  {'dense':40} {dense['pass_at_k']['pass@1']:.4f}",
    ]
    comparisons = {}
    for label, res in results.items():
        if label == "dense":
            continue
        _, summary = compare_table(dense, res)
        comparisons[label] = summary
        a = summary["agreement"]
        lines.append(
            f"  {label:40} {res['pass_at_k']['pass@1']:.4f}  ({summary['delta']['pass@1']:+.4f}; solved by both "
            f"{a['both']}, dense only {a['dense_only']}, this only {a['lord_only']})"
        )
    write_json(out_dir / "humaneval.json", {"comparisons": comparisons, "results": results})
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..calibration.data import calibration_set, evaluation_windows
    from ..config import check_param_ratio, parse_rank_reductions
    from ..device import resolve_device
    from ..errors import UsageError
    from ..measure.sweep import run_sweep, write_sweep
    from ..persist.hf import check_model_dir, load_dense, load_tokenizer, max_positions, pad_token_id
    from .args import calibration_options

    src = check_model_dir(args.model_dir)
    rrs = parse_rank_reductions(args.rank_reductions) if args.rank_reductions.strip() else []
    ratios = [check_param_ratio(x) for x in args.param_ratios.split(",") if x.strip()]
    allocations = [a.strip() for a in args.allocations.split(",") if a.strip()]
    if any(a not in ALLOCATIONS for a in allocations):
        raise UsageError(f"unknown allocation(s) in {args.allocations!r}; choose from {', '.join(ALLOCATIONS)}")
    if not rrs and not ratios:
        raise UsageError("give --rank-reductions or --param-ratios")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise UsageError(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    calibrations = [c.strip() for c in args.calibrations.split(",") if c.strip()]
    bad = [c for c in calibrations if c not in CALIBRATION_MODES]
    if bad or not calibrations:
        raise UsageError(f"unknown calibration mode(s) {bad}; choose from {', '.join(CALIBRATION_MODES)}")
    if args.humaneval:
        from ..measure.humaneval import EXECUTION_REFUSED, load_problems

        if not args.allow_code_execution:
            raise UsageError(EXECUTION_REFUSED)
        load_problems(args.humaneval_limit)  # the package is there, before any model work
    device = resolve_device(args.device)
    limit = max_positions(src)
    tokenizer = load_tokenizer(src, trust_remote_code=args.trust_remote_code)
    calib_set = calibration_set(tokenizer, args.calib, calibration_options(args), max_positions=limit)
    windows = evaluation_windows(
        tokenizer,
        args.eval_data,
        args.eval_window,
        separator=args.separator,
        max_positions=limit,
        max_tokens=args.eval_tokens,
    )
    model = load_dense(src, trust_remote_code=args.trust_remote_code).to(device)
    he_results: dict = {}
    he = humaneval_runner(args, tokenizer, device, he_results) if args.humaneval else None
    baseline, rows, parity = run_sweep(
        model,
        calib_set.batches(),
        windows,
        rank_reductions=rrs,
        targets=args.targets,
        methods=methods,
        calibrations=calibrations,
        param_ratios=ratios,
        allocations=allocations,
        batch_size=args.batch_size,
        device=device,
        pad_id=pad_token_id(tokenizer),
        progress=not args.quiet,
        humaneval=he,
    )
    write_sweep(Path(args.out), baseline, rows, parity)
    print(f"dense: perplexity {baseline['perplexity']:.4f}, {baseline['params']:,} parameters")
    he_head = f" {'pass@1':>7}" if he is not None else ""
    print(f"{'setting':34} {'targets':9} {'size':>9} {'params':>10} {'ratio':>6} {'ppl':>9}{he_head}")
    for r in rows:
        size = f"R={r.rank_reduction:g}" if r.param_ratio is None else f"P={r.param_ratio:g}"
        cells = f"{r.label:34} {r.targets:9} {size:>9} {r.params:10,d} {r.params_ratio:6.3f} {r.perplexity:9.4f}"
        print(cells + (f" {r.humaneval_pass1:7.4f}" if r.humaneval_pass1 is not None else ""))
    if he is not None:
        print(write_humaneval(Path(args.out), he_results))
    print(f"wrote {args.out}/sweep.csv, sweep.json{', humaneval.json' if he else ''} and 3 plots")
    return 0
