"""Dense vs LoRD under torch.compile, side by side in one run, same inputs.

The dense model is compiled with inductor; the LoRD variant is the SAME dense model compiled with
``backend="lord"`` and a plan (the graph pass rewrites it, then inductor compiles it) — once with
separate up-projections and once with one concatenated up-projection + split. Per token count:
median latency of each (interleaved runs after warm-up), the speed-up, the ideal speed-up from the
FLOP ratio (FlopCounterMode on the eager models: attention and LM head included) and
measured/ideal, the figure of merit.

    python benchmarks/compile_speed.py [--tokens 128 512 2048] [--rank-reduction 0.5] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--json benchmarks/results/compile_speed_cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lord_export.measure.backends import RECOMPILE_LIMIT
from lord_export.measure.flops import forward_flops
from lord_export.measure.timing import cpu_name


def add_model_args(ap: argparse.ArgumentParser) -> None:
    """The mid-size Llama-style model every benchmark here measures (random weights)."""
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--intermediate", type=int, default=2816)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8192)


def add_speed_args(ap: argparse.ArgumentParser) -> None:
    """Token counts, plan settings and repetitions of the dense-vs-LoRD latency benchmarks."""
    ap.add_argument("--tokens", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--rank-reduction", type=float, default=0.5)
    ap.add_argument("--rank-multiple", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)


def llama_model(args, max_positions: int):
    """The model of ``add_model_args``: 64-wide heads, half as many KV heads (GQA), no KV cache."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 128,
        max_position_embeddings=max_positions,
        use_cache=False,
    )
    return LlamaForCausalLM(cfg).eval()


def build(args, device: str = "cpu"):
    """(dense model, its LoRD twin, the plan) for the speed benchmarks; calibration on random tokens.

    The LoRD twin is calibrated and factorized on ``device`` (a GPU makes 7B-shaped layers quick),
    then both models are returned on the CPU in float32."""
    import lord_export as le

    dense = llama_model(args, max(args.tokens) + 1)
    lord = copy.deepcopy(dense).to(device)
    calib = [{"input_ids": torch.randint(0, args.vocab, (2, 256), device=device)} for _ in range(2)]
    plan = le.compress(lord, calib, rank_reduction=args.rank_reduction, rank_multiple=args.rank_multiple)
    plan.tensors = {k: v.cpu() for k, v in plan.tensors.items()}
    return dense, lord.cpu(), plan


def flops(model, ids) -> int:
    """FLOPs of one forward, attention included (see lord_export.measure.flops.forward_flops)."""
    return forward_flops(model, input_ids=ids)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fns: dict, ids, repeats: int, warmup: int, device: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        for _ in range(warmup):
            for fn in fns.values():
                fn(input_ids=ids)
        sync(device)
        for _ in range(repeats):
            for name, fn in fns.items():  # interleaved: machine noise hits all variants alike
                t = time.perf_counter()
                fn(input_ids=ids)
                sync(device)
                times[name].append(time.perf_counter() - t)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    add_speed_args(ap)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--json", default=None, help="default: benchmarks/results/compile_speed_<device>.json")
    args = ap.parse_args()

    import lord_export as le

    dense, lord, plan = build(args)
    dtype = getattr(torch, args.dtype)
    plan_dir = Path(tempfile.mkdtemp()) / "plan"
    le.save_compressed(lord, plan, plan_dir)
    dense = dense.to(args.device, dtype)
    lord = lord.to(args.device, dtype)
    if dtype != torch.float32:  # the plan's factors are float32: re-read them in the target dtype
        plan = le.read_plan(plan_dir)
        plan.tensors = {k: v.to(dtype) for k, v in plan.tensors.items()}
    else:
        plan = str(plan_dir)

    # three models of one class share dynamo's cache of its forward: room for all their shapes
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    compiled = {
        "dense": torch.compile(copy.deepcopy(dense), backend="inductor"),
        "lord": torch.compile(copy.deepcopy(dense), backend="lord", options={"plan": plan}),
        "lord_concat": torch.compile(copy.deepcopy(dense), backend="lord", options={"plan": plan, "up": "concat"}),
    }
    rows = []
    for n in args.tokens:
        ids = torch.randint(0, args.vocab, (1, n), device=args.device)
        ideal = flops(dense, ids) / flops(lord, ids)
        t0 = time.perf_counter()
        times = measure(compiled, ids, args.repeats, args.warmup, args.device)
        med = {k: statistics.median(v) for k, v in times.items()}
        row = {
            "tokens": n,
            "dense_ms": 1e3 * med["dense"],
            "lord_ms": 1e3 * med["lord"],
            "lord_concat_ms": 1e3 * med["lord_concat"],
            "spread_ms": {k: 1e3 * (max(v) - min(v)) for k, v in times.items()},
            "speedup": med["dense"] / med["lord"],
            "speedup_concat": med["dense"] / med["lord_concat"],
            "ideal_speedup": ideal,
            "measured_over_ideal": (med["dense"] / med["lord"]) / ideal,
            "measured_over_ideal_concat": (med["dense"] / med["lord_concat"]) / ideal,
            "seconds_incl_compile": time.perf_counter() - t0,
        }
        rows.append(row)
        print(
            f"tokens {n:5d}: dense {row['dense_ms']:8.1f} ms | lord {row['lord_ms']:8.1f} ms "
            f"(x{row['speedup']:.2f}) | lord concat {row['lord_concat_ms']:8.1f} ms (x{row['speedup_concat']:.2f}) "
            f"| ideal x{ideal:.2f} | measured/ideal {row['measured_over_ideal']:.2f} "
            f"(concat {row['measured_over_ideal_concat']:.2f})",
            flush=True,
        )
    params_dense = sum(p.numel() for p in dense.parameters())
    params_lord = sum(p.numel() for p in lord.parameters())
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_name()
    print(
        f"\nLlama-style hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
        f"vocab {args.vocab}; "
        f"{params_dense / 1e6:.1f} M -> {params_lord / 1e6:.1f} M params (rank reduction {args.rank_reduction}, "
        f"rank multiple {args.rank_multiple}); {args.dtype} on {device_name}, {torch.get_num_threads()} threads"
    )
    print(
        f"{'tokens':>6} {'dense ms':>9} {'lord ms':>9} {'speed-up':>8} {'ideal':>6} "
        f"{'meas/ideal':>10} {'concat m/i':>10}"
    )
    for r in rows:
        print(
            f"{r['tokens']:6d} {r['dense_ms']:9.1f} {r['lord_ms']:9.1f} {r['speedup']:8.2f} {r['ideal_speedup']:6.2f} "
            f"{r['measured_over_ideal']:10.2f} {r['measured_over_ideal_concat']:10.2f}"
        )
    out = Path(args.json or f"benchmarks/results/compile_speed_{args.device}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": f"{device_name}, {torch.get_num_threads()} threads",
                "torch": torch.__version__,
                "args": vars(args),
                "params_dense": params_dense,
                "params_lord": params_lord,
                "rows": rows,
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
