"""Quality sweeps on the three real models: calibration modes, and rank allocation at a parameter budget.

    python benchmarks/quality_sweeps.py MODEL --study modes       # independent vs sequential vs compensating
    python benchmarks/quality_sweeps.py MODEL --study allocation  # allocations at uniform LoRD's sizes

MODEL is ``stories260k`` (../shared/data), ``reference`` (the shipped code model) or ``smollm2``
(``bash ../shared/tools/get-smollm2.sh`` prints its directory; pass it with ``--model-dir``).
Data (never overlapping): stories260k — calibration = the first 256 stories of tinystories_2MiB.txt,
evaluation = the last 1,000 (512-token windows, evenly subsampled to ``--eval-tokens``); reference
and smollm2 — the stdlib split of ``lord_export.measure.reference`` (calibration files from the "calib"
split, evaluation files from the "eval" split; smollm2 uses 20 and 12 of them, as in
../shared/data/README.md). Writes ``benchmarks/results/<study>_<model>/`` (sweep.csv, sweep.json,
plots) and prints a table.

``modes``: LoRD on all targets at rank reductions ``--rank-reductions`` for each calibration mode.
``allocation``: for each rank reduction R, the parameter count of uniform LoRD at R (all targets,
independent calibration) is the budget; each allocation is run at that parameter ratio with
``--calibration``; perplexity increase over dense is compared with uniform's.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"


def load_setting(name: str, model_dir: str | None, eval_tokens: int):
    """(model dir, calibration batches, evaluation windows, pad id) of one of the three models."""
    from lord_export.calibration.data import (
        CalibrationOptions,
        calibration_set,
        evaluation_windows,
        subsample_windows,
        tokenize_blocks,
    )
    from lord_export.measure.reference import reference_model_dir, split_texts
    from lord_export.persist.hf import load_tokenizer, pad_token_id

    if name == "stories260k":
        src = SHARED / "stories260K-hf"
        tok = load_tokenizer(src)
        docs = [d.strip() for d in (SHARED / "text" / "tinystories_2MiB.txt").read_text().split("<|endoftext|>")]
        docs = [d for d in docs if d]
        ids, mask = tokenize_blocks(tok, docs[:256], samples=128, seqlen=256)
        from lord_export.calibration.data import batches, document_windows

        calib = batches(ids, mask, 16)
        windows = subsample_windows(document_windows(tok, docs[-1000:], 512), eval_tokens)
    elif name in ("reference", "smollm2"):
        src = Path(model_dir) if model_dir else reference_model_dir()
        tok = load_tokenizer(src)
        calib_files, eval_files = split_texts("calib"), split_texts("eval")
        if name == "smollm2":
            calib_files, eval_files = calib_files[:20], eval_files[:12]
            options, window = CalibrationOptions(samples=16, seqlen=256, batch_size=4), 512
        else:
            options, window = CalibrationOptions(samples=128, seqlen=256, batch_size=16), 256
        calib = calibration_set(tok, calib_files, options).batches()
        windows = subsample_windows(evaluation_windows(tok, eval_files, window), eval_tokens)
    else:
        raise SystemExit(f"unknown model {name!r}")
    return src, calib, windows, pad_token_id(tok)


def _relative(path: Path) -> str:
    """``path`` relative to the repository (no machine paths in recorded results)."""
    import os

    return os.path.relpath(Path(path).absolute(), ROOT)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", choices=["stories260k", "reference", "smollm2"])
    p.add_argument("--study", choices=["modes", "allocation"], required=True)
    p.add_argument("--model-dir", default=None, help="the model directory (needed for smollm2)")
    p.add_argument("--rank-reductions", default="0.3,0.5,0.6")
    p.add_argument("--calibrations", default="independent,sequential,compensating")
    p.add_argument("--calibration", default="independent", help="calibration mode of the allocation study")
    p.add_argument("--allocations", default="uniform,spectrum,fisher,svdllm-v2")
    p.add_argument("--eval-tokens", type=int, default=65536)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from lord_export.config import parse_rank_reductions
    from lord_export.measure.sweep import run_sweep, write_sweep
    from lord_export.persist.hf import load_dense

    torch.manual_seed(0)
    src, calib, windows, pad = load_setting(args.model, args.model_dir, args.eval_tokens)
    model = load_dense(src, dtype=torch.float32)
    rrs = parse_rank_reductions(args.rank_reductions)
    t0 = time.perf_counter()
    common = dict(targets=["all"], methods=["lord"], batch_size=8, pad_id=pad, progress=True)
    if args.study == "modes":
        calibrations = [c.strip() for c in args.calibrations.split(",")]
        baseline, rows, parity = run_sweep(
            model, calib, windows, rank_reductions=rrs, calibrations=calibrations, **common
        )
    else:
        base, uniform_rows, _ = run_sweep(model, calib, windows, rank_reductions=rrs, **common)
        ratios = [r.params_ratio for r in uniform_rows]
        allocations = [a.strip() for a in args.allocations.split(",")]
        baseline, rows, parity = run_sweep(
            model,
            calib,
            windows,
            param_ratios=ratios,
            allocations=allocations,
            calibrations=[args.calibration],
            **common,
        )
        rows = uniform_rows + rows
    seconds = time.perf_counter() - t0
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"{args.study}_{args.model}")
    write_sweep(out, baseline, rows, parity)
    dense = baseline["perplexity"]
    print(
        f"{args.model}: dense perplexity {dense:.4f}, {baseline['params']:,} params, "
        f"{len(windows)} windows; {seconds:.0f} s"
    )
    print(f"{'setting':40} {'params':>11} {'ratio':>6} {'ppl':>9} {'increase':>9}")
    for r in rows:
        setting = f"{r.label} " + (f"R={r.rank_reduction:g}" if r.param_ratio is None else f"P={r.param_ratio:.4f}")
        print(f"{setting:40} {r.params:11,d} {r.params_ratio:6.3f} {r.perplexity:9.4f} {r.perplexity / dense - 1:9.2%}")
    (out / "meta.json").write_text(
        json.dumps(
            {"model": args.model, "source": str(src), "seconds": round(seconds, 1), "args": vars(args)}, indent=2
        )
    )


if __name__ == "__main__":
    main()
