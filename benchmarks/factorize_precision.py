"""What factorizing in float32 instead of float64 costs: output error of LoRD factors, per group.

    python benchmarks/factorize_precision.py [reference|stories260k|smollm2] [--model-dir DIR]
        [--rank-reductions 0.3,0.5,0.7]

A device without float64 (Apple's MPS) could factorize on the device in float32; lord_export sends
statistics and factorization to the CPU in float64 instead (``device.statistics_device``). This
measures the price of the alternative on real statistics: the dense model is calibrated as
``quality_sweeps.py`` does (C = Σ x xᵀ summed in float64), then every group is factorized at each
uniform rank reduction twice — ``output_spectrum`` in float64 (lord_export) and in float32 (W and C
rounded to float32, the eigen/SVD work in float32) — and both factor pairs are scored in float64
against the same C: relative output error ‖W X − A B X‖ / ‖W X‖, and its excess over the closed-form
optimum sqrt(Σ discarded eigenvalues / Σ all). Prints per rank reduction the median and worst
excess (float32 error / float64 error − 1) and writes ``benchmarks/results/factorize_precision_<model>.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from quality_sweeps import load_setting  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", default="reference", choices=["stories260k", "reference", "smollm2"])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--rank-reductions", default="0.3,0.5,0.7")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import lord_export as le
    from lord_export.config import LordConfig
    from lord_export.core import factorize as fz
    from lord_export.persist.hf import load_dense
    from lord_export.pipeline.planner import build_groups, describe_group, stacked_weight

    torch.manual_seed(0)
    src, calib, _, _ = load_setting(args.model, args.model_dir, 1)
    model = load_dense(src, dtype=torch.float32)
    config = LordConfig()
    layers = le.select_targets(model, config.targets)
    calibration = le.calibrate(model, list(calib), layers)
    modules = dict(model.named_modules())
    rrs = [float(x) for x in args.rank_reductions.split(",")]
    rows: dict[float, list[dict]] = {r: [] for r in rrs}
    times = {"float64": 0.0, "float32": 0.0}
    for names in build_groups(layers, calibration.input_of, config.grouping):
        group = describe_group(modules, names, config, ranks={})
        W, C = stacked_weight(modules, group), calibration.of(names[0]).C
        decompositions = {}
        for dtype in (torch.float64, torch.float32):
            t = time.perf_counter()
            evals, U = fz.output_spectrum(W, C, dtype=dtype)
            times[str(dtype).removeprefix("torch.")] += time.perf_counter() - t
            decompositions[dtype] = (evals.double(), U.double())
        spectrum = decompositions[torch.float64][0]
        for rr in rrs:
            rank = fz.rank_for(W.shape[0], W.shape[1], rr, 1)
            errors = {}
            for dtype, (_, U) in decompositions.items():
                A = U[:, :rank]
                errors[dtype] = fz.relative_error(W, A, A.T @ W, C, total=float(spectrum.sum()))
            bound = fz.optimal_relative_error(spectrum, rank)
            rows[rr].append(
                {
                    "group": group.name,
                    "shape": list(W.shape),
                    "rank": rank,
                    "bound": bound,
                    "float64": errors[torch.float64],
                    "float32": errors[torch.float32],
                    "excess": errors[torch.float32] / max(errors[torch.float64], 1e-300) - 1,
                }
            )
    print(
        f"{args.model}: {sum(len(v) for v in rows.values()) // len(rrs)} groups; eigen work "
        f"float64 {times['float64']:.1f} s, float32 {times['float32']:.1f} s"
    )
    print(f"{'rank red.':>9} {'fp64 err / bound - 1 (max)':>27} {'fp32 excess median':>19} {'fp32 excess max':>16}")
    summary = []
    for rr, rs in rows.items():
        fp64_vs_bound = max(r["float64"] / max(r["bound"], 1e-300) - 1 for r in rs)
        med = statistics.median(r["excess"] for r in rs)
        worst = max(rs, key=lambda r: r["excess"])
        print(f"{rr:9.2f} {fp64_vs_bound:27.2e} {med:19.2e} {worst['excess']:16.2e}  ({worst['group']})")
        summary.append(
            {
                "rank_reduction": rr,
                "fp64_vs_bound_max": fp64_vs_bound,
                "fp32_excess_median": med,
                "fp32_excess_max": worst["excess"],
                "worst_group": worst["group"],
            }
        )
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"factorize_precision_{args.model}.json")
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": platform.machine(),
                "model": args.model,
                "seconds": {k: round(v, 2) for k, v in times.items()},
                "summary": summary,
                "groups": {str(k): v for k, v in rows.items()},
            },
            indent=1,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
