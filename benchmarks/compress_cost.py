"""Cost of compression: calibration and factorization time and memory against their lower bounds.

Lower bounds, measured in the same run on the same model and tokens:
* calibration ≥ one dense forward over the calibration tokens (no hooks);
* factorization ≥ the eigendecompositions alone (``output_spectrum`` per group).
Memory: peak resident set size of the process after each phase, beside the model's own bytes and
the float64 statistics (one d_in × d_in matrix per distinct layer input), which any exact method
must hold.

    python benchmarks/compress_cost.py [--hidden 1024 --layers 8 --samples 32 --seqlen 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
from compile_speed import add_model_args, cpu_name, llama_model  # benchmarks/ is the script's directory


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--rank-reduction", type=float, default=0.3)
    ap.add_argument("--json", default="benchmarks/results/compress_cost.json")
    args = ap.parse_args()

    import lord_export as le
    from lord_export.core import factorize as fz
    from lord_export.core.targets import dense_weight
    from lord_export.pipeline.planner import build_groups

    model = llama_model(args, max(2048, args.seqlen))
    model_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    ids = torch.randint(0, args.vocab, (args.samples, args.seqlen))
    batches = [{"input_ids": ids[i : i + args.batch_size]} for i in range(0, args.samples, args.batch_size)]
    rss0 = rss_mib()

    t = time.perf_counter()
    with torch.no_grad():
        for b in batches:
            model(**b)
    dense_forward = time.perf_counter() - t

    config = le.LordConfig(rank_reduction=args.rank_reduction)
    layers = le.select_targets(model, config.targets)
    t = time.perf_counter()
    calibration = le.calibrate(model, batches, layers)
    calibrate_s = time.perf_counter() - t
    rss_cal = rss_mib()
    stats_mib = sum(st.C.numel() * 8 + st.abs_sum.numel() * 8 for st in calibration.stats.values()) / 2**20

    t = time.perf_counter()
    plan = le.make_plan(model, calibration, layers, config)
    factorize_s = time.perf_counter() - t

    modules = dict(model.named_modules())
    eig_runs = []
    for _ in range(2):  # after make_plan, so the bound does not pay one-time LAPACK start-up costs
        t = time.perf_counter()
        for names in build_groups(layers, calibration.input_of, True):
            W = torch.cat([dense_weight(modules[n]).double() for n in names])
            fz.output_spectrum(W, calibration.of(names[0]).C)
        eig_runs.append(time.perf_counter() - t)
    eig_s = min(eig_runs)
    rss_plan = rss_mib()

    # exact statistics need X^T X for every distinct input: 2·d_in² FLOPs per token on top of the forward
    linear_params = sum(modules[n].weight.numel() for n in layers)
    stats_flops = sum(st.C.shape[0] ** 2 for st in calibration.stats.values())
    flop_ratio = (linear_params + stats_flops) / linear_params
    rows = [
        ("calibration", calibrate_s, dense_forward, "one dense forward over the same tokens"),
        ("  (FLOPs)", flop_ratio, 1.0, "linear-layer FLOPs of forward + X^T X statistics, relative to forward"),
        ("factorization", factorize_s, eig_s, "eigendecompositions alone"),
    ]
    print(
        f"model: Llama-style hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params ({model_mib:.0f} MiB fp32); "
        f"{args.samples} x {args.seqlen} = {args.samples * args.seqlen} calibration tokens; "
        f"{len(plan.groups)} groups, {torch.get_num_threads()} threads"
    )
    print(f"{'phase':14} {'time s':>8} {'bound s':>8} {'ratio':>6}  bound")
    for name, s, bound, what in rows:
        print(f"{name:14} {s:8.2f} {bound:8.2f} {s / bound:6.2f}  {what}")
    print(
        f"memory: peak RSS {rss0:.0f} MiB before calibration, {rss_cal:.0f} MiB after, {rss_plan:.0f} MiB after "
        f"factorization; model {model_mib:.0f} MiB, float64 statistics {stats_mib:.0f} MiB"
    )
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{cpu_name()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "args": vars(args),
        "calibration_tokens": args.samples * args.seqlen,
        "calibrate_s": calibrate_s,
        "dense_forward_s": dense_forward,
        "factorize_s": factorize_s,
        "eigendecompositions_s": eig_s,
        "calibration_flop_ratio_vs_forward": flop_ratio,
        "peak_rss_mib": {"before": rss0, "after_calibration": rss_cal, "after_factorization": rss_plan},
        "model_mib": model_mib,
        "statistics_mib": stats_mib,
    }
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
