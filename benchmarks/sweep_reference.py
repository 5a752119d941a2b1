"""The sweep on the shipped reference code model: lord vs svd vs asvd, rank reductions 0.1–0.7, four presets.

Calibration: the reference calibration split of the standard library (128 blocks of 256 tokens);
evaluation: every k-th 256-token window of the evaluation split, about 64k predicted tokens (files
the model and its tokenizer never saw). Writes sweep.csv, sweep.json and the plots into
benchmarks/results/sweep_reference/.

    python benchmarks/sweep_reference.py [--eval-tokens 65536]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lord_export.calibration.data import batches, document_windows, read_documents, subsample_windows, tokenize_blocks
from lord_export.measure.reference import reference_model_dir, split_texts
from lord_export.measure.sweep import run_sweep, write_sweep
from lord_export.persist.hf import load_dense, load_tokenizer

RANK_REDUCTIONS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
TARGETS = ["all", "attention", "mlp", "mlp-down"]
METHODS = ["lord", "svd", "asvd"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/sweep_reference")
    ap.add_argument("--eval-tokens", type=int, default=65536)
    args = ap.parse_args()
    model_dir = reference_model_dir()
    tok = load_tokenizer(model_dir)
    ids, mask = tokenize_blocks(tok, read_documents(split_texts("calib")), samples=128, seqlen=256)
    windows = subsample_windows(document_windows(tok, read_documents(split_texts("eval")), 256), args.eval_tokens)
    t0 = time.perf_counter()
    baseline, rows, parity = run_sweep(
        load_dense(model_dir, dtype="float32"),
        batches(ids, mask, 16),
        windows,
        rank_reductions=RANK_REDUCTIONS,
        targets=TARGETS,
        methods=METHODS,
        batch_size=16,
        pad_id=tok.pad_token_id,
        progress=True,
    )
    write_sweep(Path(args.out), baseline, rows, parity)
    print(
        f"dense perplexity {baseline['perplexity']:.4f} ({baseline['params']:,} params) on {baseline['tokens']:,} "
        f"held-out tokens; {len(rows)} settings in {time.perf_counter() - t0:.0f} s"
    )
    print(f"{'targets':9} {'rr':>4}  " + "  ".join(f"{m:>8}" for m in METHODS) + "   params")
    for target in TARGETS:
        for rr in RANK_REDUCTIONS:
            cells = {r.method: r for r in rows if r.targets == target and r.rank_reduction == rr}
            print(
                f"{target:9} {rr:4.1f}  "
                + "  ".join(f"{cells[m].perplexity:8.3f}" for m in METHODS)
                + f"   {cells['lord'].params:,}"
            )


if __name__ == "__main__":
    main()
