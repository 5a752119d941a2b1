"""The stories260K sweep: lord vs svd vs asvd over rank reductions 0.1–0.5 and four target presets.

Calibration: the first 256 stories of ../shared/data/text/tinystories_2MiB.txt (256-token blocks);
evaluation: the last 1,000 stories (each starts with BOS, 512-token windows). Writes sweep.csv,
sweep.json and the plots into benchmarks/results/sweep_stories260k/.

    python benchmarks/sweep_stories260k.py [--shared ../shared/data]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lord_export.calibration.data import batches, document_windows, tokenize_blocks
from lord_export.measure.sweep import run_sweep, write_sweep
from lord_export.persist.hf import load_dense, load_tokenizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shared", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    ap.add_argument("--out", default="benchmarks/results/sweep_stories260k")
    args = ap.parse_args()
    model_dir = Path(args.shared) / "stories260K-hf"
    text = (Path(args.shared) / "text" / "tinystories_2MiB.txt").read_text(encoding="utf-8")
    docs = [d.strip() for d in text.split("<|endoftext|>") if d.strip()]
    tok = load_tokenizer(model_dir)
    ids, mask = tokenize_blocks(tok, docs[:256], samples=10_000, seqlen=256)
    windows = document_windows(tok, docs[-1000:], 512)
    t0 = time.perf_counter()
    baseline, rows, parity = run_sweep(
        load_dense(model_dir),
        batches(ids, mask, 16),
        windows,
        rank_reductions=[0.1, 0.2, 0.3, 0.4, 0.5],
        targets=["all", "attention", "mlp", "mlp-down"],
        methods=["lord", "svd", "asvd"],
        batch_size=32,
        progress=True,
    )
    write_sweep(Path(args.out), baseline, rows, parity)
    print(
        f"dense perplexity {baseline['perplexity']:.4f} ({baseline['params']:,} params); "
        f"{len(rows)} settings in {time.perf_counter() - t0:.0f} s"
    )
    print(f"{'targets':9} {'rr':>4}  " + "  ".join(f"{m:>8}" for m in ("lord", "svd", "asvd")) + "   params")
    for target in ("all", "attention", "mlp", "mlp-down"):
        for rr in (0.1, 0.2, 0.3, 0.4, 0.5):
            cells = {r.method: r for r in rows if r.targets == target and r.rank_reduction == rr}
            print(
                f"{target:9} {rr:4.1f}  "
                + "  ".join(f"{cells[m].perplexity:8.3f}" for m in ("lord", "svd", "asvd"))
                + f"   {cells['lord'].params:,}"
            )


if __name__ == "__main__":
    main()
