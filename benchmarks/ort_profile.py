"""Per-op ONNX Runtime profile (CPU) of dense vs LoRD ONNX prefill: where the time goes.

Same model and plan as ``ort_speed.py`` (``--layers`` to shrink it); both exported by
``export_model_onnx``. Each session runs ``--runs`` prefills of ``--tokens`` tokens with
``SessionOptions.enable_profiling``; node times are summed per category: weight MatMuls (a MatMul
or Gemm whose B is an initializer: the dense linears, or LoRD's bottleneck/up-projection factors),
other MatMuls (attention), everything else by op type. Runs interleave dense and LoRD.

    python benchmarks/ort_profile.py [--layers 2] [--tokens 512] [--threads 1] [--opt-level all|extended|basic]
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import tempfile
from pathlib import Path

import numpy as np
import torch
from compile_speed import add_model_args, add_speed_args, build, flops


def weight_matmuls(path: Path) -> set[str]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    return {
        n.name for n in m.graph.node if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 and n.input[1] in inits
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    add_speed_args(ap)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads (0: ONNX Runtime's default)")
    ap.add_argument("--opt-level", choices=["basic", "extended", "all"], default="all")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import onnxruntime as ort

    from lord_export.export.onnx import export_model_onnx

    dense, lord, plan = build(args)
    n = args.tokens[0]
    ids = torch.randint(0, args.vocab, (1, n))
    ideal = flops(dense, ids) / flops(lord, ids)
    work = Path(tempfile.mkdtemp())
    sessions, weights = {}, {}
    level = {
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[args.opt_level]
    for name, model in (("dense", dense), ("lord", lord)):
        (work / name).mkdir()
        export_model_onnx(
            copy.deepcopy(model), work / name, validate=False, factorized_groups=len(plan.factorized_groups)
        )
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.enable_profiling = True
        opts.profile_file_prefix = str(work / f"prof_{name}")
        opts.graph_optimization_level = level
        opts.optimized_model_filepath = str(work / name / "optimized.onnx")
        if args.threads:
            opts.intra_op_num_threads = args.threads
        sessions[name] = ort.InferenceSession(str(work / name / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        weights[name] = weight_matmuls(work / name / "optimized.onnx")
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((1, n), dtype=np.int64)}
    for _ in range(args.warmup):
        for s in sessions.values():
            s.run(None, feeds)
    for _ in range(args.runs):
        for s in sessions.values():
            s.run(None, feeds)
    out = {"tokens": n, "layers": args.layers, "threads": args.threads, "opt_level": args.opt_level, "ideal": ideal}
    for name, s in sessions.items():
        events = json.loads(Path(s.end_profiling()).read_text())
        cats: dict[str, float] = collections.defaultdict(float)
        runs = [e["dur"] for e in events if e.get("name") == "model_run"][args.warmup :]
        for e in events:
            if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
                continue
            node, op = e["name"][: -len("_kernel_time")], e["args"].get("op_name", "?")
            key = "weight MatMul/Gemm" if node in weights[name] else ("other MatMul" if op == "MatMul" else op)
            cats[key] += e["dur"]
        total_runs = args.warmup + args.runs  # node events cover every run, warm-up included
        out[name] = {
            "model_run_ms_median": float(np.median(runs)) / 1e3,
            "per_run_ms": {k: v / total_runs / 1e3 for k, v in sorted(cats.items(), key=lambda kv: -kv[1])},
            "weight_matmuls": len(weights[name]),
        }
    d, lo = out["dense"], out["lord"]
    out["speedup"] = d["model_run_ms_median"] / lo["model_run_ms_median"]
    wd, wl = d["per_run_ms"].get("weight MatMul/Gemm", 0), lo["per_run_ms"].get("weight MatMul/Gemm", 0)
    rest_d, rest_l = sum(d["per_run_ms"].values()) - wd, sum(lo["per_run_ms"].values()) - wl
    out["weight_matmul_speedup"] = wd / wl
    print(f"{n} tokens, {args.layers} layers, threads {args.threads or 'default'}, opt level {args.opt_level}")
    print(
        f"model_run median: dense {d['model_run_ms_median']:.1f} ms, LoRD {lo['model_run_ms_median']:.1f} ms, "
        f"speed-up {out['speedup']:.3f}, ideal {ideal:.3f}, measured/ideal {out['speedup'] / ideal:.3f}"
    )
    print(
        f"weight MatMuls: dense {wd:.1f} ms ({d['weight_matmuls']} nodes), "
        f"LoRD {wl:.1f} ms ({lo['weight_matmuls']} nodes),"
        f" speed-up {wd / wl:.3f}; everything else: dense {rest_d:.1f} ms, LoRD {rest_l:.1f} ms"
    )
    for name in ("dense", "lord"):
        print(name, {k: round(v, 2) for k, v in list(out[name]["per_run_ms"].items())[:10]})
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
