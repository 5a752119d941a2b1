"""Decode as serving engines run it: a static KV cache and the forward compiled with
``mode="reduce-overhead"`` (CUDA graphs on a GPU), dense vs LoRD twins at several rank multiples,
batch 1 and 16, side by side in one run.

    python benchmarks/decode_graphs.py --device cuda --dtype bfloat16 --hidden 4096 --intermediate 11008 \
        --vocab 32000 --layers 4 [--multiples 8 64 128] [--batches 1 16] [--json out.json]

The LoRD twins are the dense model compressed in place (``le.compress``: ``LordLinear`` modules), so
inductor compiles and graph-captures them like any module. Per model and batch, ``generate`` with
``cache_implementation="static"`` and greedy decoding is timed for ``--steps`` new tokens and for one
(the prefill); decode time per token = (T_steps - T_1) / (steps - 1), the median over ``--rounds``
interleaved rounds after two warm-up rounds (compilation and capture). Without CUDA the same code
runs (inductor on the CPU, no graphs): a check of the script, not a measurement of graphs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compile_speed import add_model_args, llama_model  # noqa: E402

import lord_export as le  # noqa: E402


def compress(dense, args, multiple: int, device: str):
    """A LoRD twin of ``dense`` at ``--rank-reduction`` with ranks rounded to ``multiple``."""
    lord = copy.deepcopy(dense)
    torch.manual_seed(1)
    calib = [{"input_ids": torch.randint(0, args.vocab, (2, 256), device=device)} for _ in range(2)]
    le.compress(lord, calib, rank_reduction=args.rank_reduction, rank_multiple=multiple)
    return lord


def prepare(model, args):
    model.config.use_cache = model.generation_config.use_cache = True
    model.generation_config.cache_implementation = "static"
    model.generation_config.disable_compile = True  # compiled here, explicitly, the same way for every model
    model.forward = torch.compile(model.forward, mode="reduce-overhead", dynamic=False)
    return model


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed_generate(model, ids, new_tokens: int, device: str) -> float:
    sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    sync(device)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(ap)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--rank-reduction", type=float, default=0.5)
    ap.add_argument("--multiples", type=int, nargs="+", default=[8, 64, 128])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt", type=int, default=128, help="prompt tokens")
    ap.add_argument("--steps", type=int, default=64, help="new tokens per timed generate")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    dense = llama_model(args, args.prompt + args.steps + 8).to(args.device)
    models = {f"lord m{m}": compress(dense, args, m, args.device) for m in args.multiples}
    models = {"dense": dense, **models}
    dtype = getattr(torch, args.dtype)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    models = {name: prepare(m.to(dtype).eval(), args) for name, m in models.items()}

    rows = []
    for batch in args.batches:
        torch.manual_seed(0)
        ids = torch.randint(1, args.vocab, (batch, args.prompt), device=args.device)
        times: dict[str, dict[str, list[float]]] = {name: {"full": [], "prefill": []} for name in models}
        for round_ in range(args.rounds + 2):
            for name, model in models.items():  # interleaved: a noisy moment hits every model
                full = timed_generate(model, ids, args.steps, args.device)
                prefill = timed_generate(model, ids, 1, args.device)
                if round_ >= 2:
                    times[name]["full"].append(full)
                    times[name]["prefill"].append(prefill)
        per_token = {
            name: statistics.median(f - p for f, p in zip(t["full"], t["prefill"], strict=True)) / (args.steps - 1)
            for name, t in times.items()
        }
        for name in models:
            rows.append(
                {
                    "model": name,
                    "batch": batch,
                    "params": params[name],
                    "decode_ms_per_step": round(1e3 * per_token[name], 4),
                    "speedup_vs_dense": round(per_token["dense"] / per_token[name], 3),
                }
            )

    print(f"{'model':<10} {'batch':>5} {'params':>14} {'ms/step':>9} {'x dense':>8}")
    for r in rows:
        ms, speedup = r["decode_ms_per_step"], r["speedup_vs_dense"]
        print(f"{r['model']:<10} {r['batch']:>5} {r['params']:>14,} {ms:>9.3f} {speedup:>8.3f}")
    if args.json:
        result = {
            "command": " ".join(sys.argv),
            "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
            "torch": torch.__version__,
            "dtype": args.dtype,
            "rows": rows,
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
