"""torchao weight-only int8 / int4 on the LoRD factors vs on the dense weights (GPU), eager and compile.

Builds the model of compile_speed.add_model_args (random weights; pass Llama-2-7B shapes with a few
layers for a model whose decode reads mostly weights), compresses it with LoRD on the GPU, then for
the dense and the LoRD model in bf16, with torchao's ``Int8WeightOnlyConfig`` and with
``Int4WeightOnlyConfig`` (group 128, tinygemm's tile packing, a kernel in PyTorch itself) on every
linear layer and every LoRD factor (the LM head stays bf16 in all of them):

- the bytes of the quantized layers' weights (the tensors a decode step reads),
- the relative error of the logits against the SAME model's bf16 logits (random weights: the error
  quantization adds, not a quality figure),
- prefill latency (``--prefill`` tokens) and decode latency per token (KV cache, ``--decode-tokens``
  after a 128-token prompt), eager, and with ``--compile`` also under torch.compile (inductor).

Variants run interleaved after warm-up (median of ``--repeats``). Needs CUDA and torchao.

    python benchmarks/torchao_weight_only.py --hidden 4096 --intermediate 11008 --layers 4 --vocab 32000 \\
        --rank-multiple 128 [--compile] [--json benchmarks/results/torchao_weight_only_cuda.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch
from compile_speed import add_model_args, build
from torch import nn

from lord_export.core.modules import LordBottleneck, LordLinear
from lord_export.measure.backends import RECOMPILE_LIMIT
from lord_export.measure.runners import torch_runner


def tensor_bytes(t: torch.Tensor) -> int:
    """Storage bytes of a tensor, or of the inner tensors of a torchao tensor subclass."""
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def quantizable(module: nn.Module, fqn: str) -> bool:
    return isinstance(module, (nn.Linear, LordBottleneck, LordLinear)) and not fqn.endswith("lm_head")


def layer_bytes(model: nn.Module) -> int:
    return sum(tensor_bytes(m.weight) for n, m in model.named_modules() if quantizable(m, n))


def quantized(model: nn.Module, scheme: str) -> nn.Module:
    from torchao.quantization import Int4WeightOnlyConfig, Int8WeightOnlyConfig, quantize_

    model = copy.deepcopy(model)
    if scheme == "int8":
        config = Int8WeightOnlyConfig()
    else:
        config = Int4WeightOnlyConfig(group_size=128, int4_packing_format="tile_packed_to_4d")
    quantize_(model, config, filter_fn=quantizable)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--rank-reduction", type=float, default=0.5)
    ap.add_argument("--rank-multiple", type=int, default=128, help="int4 tiles need factor ranks in 128s")
    ap.add_argument("--schemes", nargs="+", default=["bf16", "int8", "int4"])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--compile", action="store_true", help="also time each variant under torch.compile")
    ap.add_argument("--json", default="benchmarks/results/torchao_weight_only_cuda.json")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("torchao_weight_only.py needs a CUDA device")
    args.tokens = [args.prefill + 1]
    dense, lord, _ = build(args, "cuda")
    base = {"dense": dense.to("cuda", torch.bfloat16), "lord": lord.to("cuda", torch.bfloat16)}
    for m in base.values():
        m.config.use_cache = True
    probe = torch.randint(0, args.vocab, (1, 128), device="cuda")
    prompt = torch.randint(0, args.vocab, (1, 128), device="cuda")
    prefill_ids = torch.randint(0, args.vocab, (1, args.prefill), device="cuda")
    with torch.no_grad():
        ref = {k: m(input_ids=probe, use_cache=False).logits.float() for k, m in base.items()}

    # every variant is one model class: dynamo's cache of its forward must hold all of them
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    variants, rows = {}, []
    for scheme in args.schemes:
        for kind, model in base.items():
            name = f"{kind} {scheme}"
            try:
                q = model if scheme == "bf16" else quantized(model, scheme)
                with torch.no_grad():
                    got = q(input_ids=probe, use_cache=False).logits.float()
            except Exception as e:  # a scheme this torchao/GPU cannot run is reported, not fatal
                rows.append({"variant": name, "error": f"{type(e).__name__}: {e}"[:300]})
                print(f"{name}: {rows[-1]['error']}", flush=True)
                continue
            err = float((got - ref[kind]).norm() / ref[kind].norm())
            rows.append({"variant": name, "layer_weight_bytes": layer_bytes(q), "logits_rel_err": err})
            variants[name] = {"eager": torch_runner(q, "cuda", torch.bfloat16)}
            if args.compile:
                variants[name]["compile"] = torch_runner(torch.compile(q), "cuda", torch.bfloat16)

    times: dict[tuple[str, str, str], list[float]] = {}
    for name, runners in variants.items():  # warm-up (and compilation)
        for mode, r in runners.items():
            t0 = time.perf_counter()
            r.prefill(prefill_ids)
            r.decode(prompt, args.decode_tokens)
            r.decode(prompt, args.decode_tokens)
            print(f"warm {name} {mode}: {time.perf_counter() - t0:.1f} s", flush=True)
    for _ in range(args.repeats):
        for name, runners in variants.items():
            for mode, r in runners.items():
                t = time.perf_counter()
                r.prefill(prefill_ids)
                times.setdefault((name, mode, "prefill"), []).append(time.perf_counter() - t)
                times.setdefault((name, mode, "decode"), []).append(r.decode(prompt, args.decode_tokens))
    for row in rows:
        for mode in ("eager", "compile"):
            for what in ("prefill", "decode"):
                ts = times.get((row["variant"], mode, what))
                if ts:
                    row[f"{mode}_{what}_ms"] = statistics.median(ts) * 1e3

    dense_bf16 = next(r for r in rows if r["variant"] == "dense bf16")
    head = f"{'variant':<12} {'layer MB':>9} {'logit err':>9} {'vs dense bf16 bytes':>19}"
    print(f"\n{head}  latency ms (prefill / decode)")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<12} failed: {r['error']}")
            continue
        modes = [m for m in ("eager", "compile") if f"{m}_decode_ms" in r]
        lat = "  ".join(f"{m} {r[f'{m}_prefill_ms']:.2f} / {r[f'{m}_decode_ms']:.2f}" for m in modes)
        print(
            f"{r['variant']:<12} {r['layer_weight_bytes'] / 1e6:>9.1f} {r['logits_rel_err']:>9.4f} "
            f"{r['layer_weight_bytes'] / dense_bf16['layer_weight_bytes']:>19.3f}  {lat}"
        )
    import torchao

    out = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "torchao": torchao.__version__,
        "model": {"hidden": args.hidden, "intermediate": args.intermediate, "layers": args.layers, "vocab": args.vocab},
        "rank_reduction": args.rank_reduction,
        "rank_multiple": args.rank_multiple,
        "prefill_tokens": args.prefill,
        "decode_tokens": args.decode_tokens,
        "rows": rows,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
