"""Dense ONNX vs LoRD ONNX in ONNX Runtime, side by side in one run, same inputs.

Both models are exported by lord_export's own ONNX path (torch.export → torch.onnx, opset 18) from
one random-weight Llama-style model and its LoRD plan; each token count runs both sessions
interleaved after warm-up. Reported: median latency, speed-up, the ideal speed-up from the FLOP
ratio (FlopCounterMode with eager attention, so attention counts) and measured/ideal. The
execution provider is CUDA when onnxruntime-gpu sees a GPU, else CPU (``--provider`` forces one).

    python benchmarks/ort_speed.py [--tokens 128 512 2048] [--rank-reduction 0.5] [--provider cpu|cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from compile_speed import add_model_args, add_speed_args, build, cpu_name, flops  # same model, plan, FLOPs


def session(path: Path, provider: str):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if provider == "cuda" else ["CPUExecutionProvider"]
    return ort.InferenceSession(str(path), sess_options=opts, providers=providers)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    add_speed_args(ap)
    ap.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="auto")
    ap.add_argument("--json", default=None, help="default: benchmarks/results/ort_speed_<provider>.json")
    args = ap.parse_args()

    from lord_export.export.onnx import export_model_onnx, matmul_census

    provider = args.provider
    if provider == "auto":
        import onnxruntime as ort

        provider = (
            "cuda" if "CUDAExecutionProvider" in ort.get_available_providers() and torch.cuda.is_available() else "cpu"
        )
    dense, lord, plan = build(args)
    work = Path(tempfile.mkdtemp())
    reports = {}
    for name, model in (("dense", dense), ("lord", lord)):
        (work / name).mkdir()
        reports[name] = export_model_onnx(
            copy.deepcopy(model), work / name, validate=True, factorized_groups=len(plan.factorized_groups)
        )
    import onnx

    census = matmul_census(onnx.load(str(work / "lord" / "model.onnx"), load_external_data=False))
    sessions = {name: session(work / name / "model.onnx", provider) for name in ("dense", "lord")}
    actual = sessions["lord"].get_providers()[0]
    rows = []
    for n in args.tokens:
        ids = torch.randint(0, args.vocab, (1, n))
        ideal = flops(dense, ids) / flops(lord, ids)
        feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, n), dtype=np.int64)}
        for _ in range(args.warmup):
            for s in sessions.values():
                s.run(None, feeds)
        times: dict[str, list[float]] = {k: [] for k in sessions}
        for _ in range(args.repeats):
            for name, s in sessions.items():
                t = time.perf_counter()
                s.run(None, feeds)
                times[name].append(time.perf_counter() - t)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "tokens": n,
            "dense_ms": 1e3 * med["dense"],
            "lord_ms": 1e3 * med["lord"],
            "spread_ms": {k: 1e3 * (max(v) - min(v)) for k, v in times.items()},
            "speedup": med["dense"] / med["lord"],
            "ideal_speedup": ideal,
            "measured_over_ideal": med["dense"] / med["lord"] / ideal,
        }
        rows.append(row)
        print(
            f"tokens {n:5d}: dense {row['dense_ms']:8.1f} ms | lord {row['lord_ms']:8.1f} ms | "
            f"x{row['speedup']:.2f} of ideal x{ideal:.2f} -> {row['measured_over_ideal']:.2f}",
            flush=True,
        )
    machine = torch.cuda.get_device_name() if actual.startswith("CUDA") else f"{cpu_name()}"
    print(
        f"\nONNX Runtime {actual} on {machine}; Llama-style hidden {args.hidden}, {args.layers} layers; "
        f"rank reduction {args.rank_reduction}; LoRD ONNX has {census[1]} bottleneck MatMuls for "
        f"{len(plan.factorized_groups)} groups"
    )
    print(f"{'tokens':>6} {'dense ms':>9} {'lord ms':>9} {'speed-up':>8} {'ideal':>6} {'meas/ideal':>10}")
    for r in rows:
        print(
            f"{r['tokens']:6d} {r['dense_ms']:9.1f} {r['lord_ms']:9.1f} {r['speedup']:8.2f} "
            f"{r['ideal_speedup']:6.2f} {r['measured_over_ideal']:10.2f}"
        )
    out = Path(args.json or f"benchmarks/results/ort_speed_{provider}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine,
                "provider": actual,
                "args": vars(args),
                "bottleneck_matmuls": census[1],
                "factorized_groups": len(plan.factorized_groups),
                "validation": {k: r.validation for k, r in reports.items()},
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
