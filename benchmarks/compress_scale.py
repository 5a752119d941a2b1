"""Peak memory and time per block of block-by-block compression on a Llama-2-7B-shaped model.

    python benchmarks/compress_scale.py --layers 2 4 [--device cpu] [--calibration independent]
        [--shape llama-7b|tinyllama-1b] [--refine]

For each layer count, writes a Llama model with Llama-2-7B's shapes (hidden 4096, intermediate
11008, 32 heads, vocab 32000; ``--shape tinyllama-1b``: TinyLlama-1.1B's hidden 2048, intermediate
5632, 32 query / 4 key-value heads) and random bf16 weights as sharded safetensors (generated one layer
at a time, so writing it needs little memory), then runs
``lord-export compress DIR OUT --calib <stdlib files> --calib-samples 16 --calib-seqlen 256
--rank-reduction 0.3`` in a subprocess and reads its peak RSS (``getrusage(RUSAGE_CHILDREN)``,
the same number ``/usr/bin/time -v`` prints), its wall time and the time of each block from the
report. Prints a table, the peak-RSS ratio between the largest and smallest layer count, and the
time extrapolated to 32 layers (fixed part + per-block time × 32); with ``--with-budget`` each model
is compressed a second time with ``--param-ratio`` at the ratio uniform reached (fisher allocation,
the streamed survey), for what the budget adds to time and memory; writes
``benchmarks/results/compress_scale_<device>.json``. With ``--refine`` each model is compressed a
second time with ``--refine block`` (block refinement at the same rank reduction): its time over the
closed form's, the refinement's share, and the peak memory in depth with refinement on.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHAPES = {
    "llama-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000
    ),
    "tinyllama-1b": dict(
        hidden_size=2048, intermediate_size=5632, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000
    ),
}


def write_model(directory: Path, layers: int, seed: int = 0, device: str = "cpu", shape: str = "llama-7b") -> int:
    """A random bf16 Llama of ``shape``'s shapes with ``layers`` layers, one shard per layer; returns bytes.

    The random numbers are drawn on ``device`` (a GPU draws 32 layers' in seconds; the CPU's and a
    GPU's generators give different weights for the same seed)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lord_export.persist.checkpoint import ShardWriter
    from lord_export.persist.io import parameters_on_meta

    config = LlamaConfig(
        num_hidden_layers=layers, max_position_embeddings=4096, torch_dtype="bfloat16", **SHAPES[shape]
    )
    config.architectures = ["LlamaForCausalLM"]
    with parameters_on_meta():
        skeleton = LlamaForCausalLM(config)
    g = torch.Generator(device=device).manual_seed(seed)
    writer = ShardWriter(directory, max_shard_bytes=600 << 20)
    current, block = None, {}
    for name, p in skeleton.named_parameters():
        prefix = ".".join(name.split(".")[:3]) if name.startswith("model.layers.") else "rest"
        if prefix != current and block:
            writer.add(block)
            block = {}
        current = prefix
        if name.endswith("norm.weight"):
            t = torch.ones(p.shape)
        else:
            t = torch.randn(p.shape, generator=g, device=device) * (1.0 / p.shape[-1] ** 0.5)
        block[name] = t.to(torch.bfloat16).cpu()
    writer.add(block)
    writer.close()
    config.save_pretrained(directory)
    _write_tokenizer(directory)
    return sum(f.stat().st_size for f in directory.glob("*.safetensors"))


def _write_tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer (4,096 tokens, trained on stdlib code) — ids fit the 32,000 vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lord_export.measure.reference import split_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=4096, special_tokens=["<pad>", "<s>", "</s>"])
    tok.train_from_iterator((p.read_text(errors="replace") for p in split_texts("train")[:200]), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(
        directory
    )


def run_compress(
    model_dir: Path,
    out: Path,
    calib: list[str],
    device: str,
    calibration: str,
    param_ratio: float | None = None,
    extra: tuple[str, ...] = (),
) -> dict:
    size = ["--rank-reduction", "0.3"] if param_ratio is None else ["--param-ratio", f"{param_ratio:.6f}"]
    argv = [
        "compress", str(model_dir), str(out), "--calib", *calib, "--calib-samples", "16", "--calib-seqlen", "256",
        *size, "--device", device, "--calibration", calibration, "--max-shard-size", "1GB", "-q", *extra,
    ]  # fmt: skip
    # the CLI in a fresh process that reports its own peak RSS (what /usr/bin/time -v calls "maximum resident")
    code = (
        "import resource, sys; from lord_export.cli import main; rc = main(sys.argv[1:]); "
        "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); sys.exit(rc)"
    )
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"compress failed:\n{proc.stderr[-3000:]}")
    peak_kib = int(proc.stderr.rsplit("PEAK_KIB", 1)[1].split()[0])
    report = json.loads((out / "report.json").read_text())
    return {"seconds": seconds, "peak_rss_gib": peak_kib / 2**20, "report": report}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    p.add_argument("--device", default="cpu")
    p.add_argument("--calibration", default="independent")
    p.add_argument(
        "--shape", choices=sorted(SHAPES), default="llama-7b", help="the layers' shapes (default: Llama-2-7B)"
    )
    p.add_argument(
        "--refine",
        action="store_true",
        help="also compress each model with --refine block: refinement's time and peak memory in depth",
    )
    p.add_argument(
        "--with-budget",
        action="store_true",
        help="also compress each model with --param-ratio at the ratio uniform reached (the streamed survey's cost)",
    )
    p.add_argument("--work", default=None, help="scratch folder (default: a temporary one, removed afterwards)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    from lord_export.measure.reference import split_texts

    calib = [str(f) for f in split_texts("calib")[:40]]
    rows = []
    with tempfile.TemporaryDirectory(dir=args.work) as work:
        for n in sorted(args.layers):  # smallest first: RUSAGE_CHILDREN keeps the maximum over children
            d, out = Path(work) / f"dense-{n}", Path(work) / f"lord-{n}"
            d.mkdir()
            size = write_model(d, n, device=args.device, shape=args.shape)
            r = run_compress(d, out, calib, args.device, args.calibration)
            blocks = r["report"]["timings"]["blocks_s"]
            fixed = r["seconds"] - sum(blocks)
            rows.append(
                {
                    "layers": n,
                    "dense_gb": size / 1e9,
                    "peak_rss_gib": r["peak_rss_gib"],
                    "seconds": r["seconds"],
                    "blocks_s": blocks,
                    "fixed_s": fixed,
                    "params_before": r["report"]["params_before"],
                    "params_after": r["report"]["params_after"],
                    "cuda_peak_allocated_gib": r["report"].get("cuda_peak_allocated_gib"),
                }
            )
            print(
                f"{n} layers: dense {size / 1e9:.2f} GB, peak RSS {r['peak_rss_gib']:.2f} GiB, "
                f"peak GPU {r['report'].get('cuda_peak_allocated_gib') or 0:.2f} GiB, {r['seconds']:.0f} s "
                f"(blocks {', '.join(f'{b:.0f}' for b in blocks)} s)",
                flush=True,
            )
            import shutil

            shutil.rmtree(out)
            if args.refine:
                f = run_compress(d, out, calib, args.device, args.calibration, extra=("--refine", "block"))
                stages = f["report"]["timings"].get("stages", {})
                steps = [b.get("steps") for b in f["report"]["timings"].get("refinement", [])]
                rows[-1]["refined"] = {
                    "seconds": f["seconds"],
                    "peak_rss_gib": f["peak_rss_gib"],
                    "cuda_peak_allocated_gib": f["report"].get("cuda_peak_allocated_gib"),
                    "blocks_s": f["report"]["timings"]["blocks_s"],
                    "refine_s": stages.get("refine_s"),
                    "steps": steps,
                    "added": f["seconds"] / r["seconds"] - 1,
                }
                print(
                    f"  --refine block: {f['seconds']:.0f} s (refinement {stages.get('refine_s') or 0:.0f} s, steps "
                    f"{steps}; {f['seconds'] / r['seconds'] - 1:+.0%} over the closed form), peak RSS "
                    f"{f['peak_rss_gib']:.2f} GiB, peak GPU {f['report'].get('cuda_peak_allocated_gib') or 0:.2f} GiB",
                    flush=True,
                )
                shutil.rmtree(out)
            if args.with_budget:
                ratio = r["report"]["params_after"] / r["report"]["params_before"]
                b = run_compress(d, out, calib, args.device, args.calibration, param_ratio=ratio)
                budget = b["report"]["budget"]
                rows[-1]["budget"] = {
                    "param_ratio": ratio,
                    "params_after": b["report"]["params_after"],
                    "seconds": b["seconds"],
                    "peak_rss_gib": b["peak_rss_gib"],
                    "survey_s": budget["survey_s"],
                    "sensitivity_s": budget["sensitivity_s"],
                    "added": b["seconds"] / r["seconds"] - 1,
                }
                print(
                    f"  --param-ratio {ratio:.4f} (fisher): {b['seconds']:.0f} s (survey {budget['survey_s']:.0f} s, "
                    f"sensitivity {budget['sensitivity_s']:.0f} s; {b['seconds'] / r['seconds'] - 1:+.0%} over "
                    f"uniform), peak RSS {b['peak_rss_gib']:.2f} GiB",
                    flush=True,
                )
                shutil.rmtree(out)
            shutil.rmtree(d)
    per_block = sum(sum(r["blocks_s"]) for r in rows) / sum(r["layers"] for r in rows)
    fixed = min(r["fixed_s"] for r in rows)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.processor() or platform.machine(),
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "calibration": args.calibration,
        "shape": args.shape,
        "rows": rows,
        "peak_ratio_largest_over_smallest": rows[-1]["peak_rss_gib"] / rows[0]["peak_rss_gib"],
        "mean_block_s": per_block,
        "extrapolated_32_layers_s": fixed + 32 * per_block,
    }
    if args.refine:
        result["refined_peak_ratio_largest_over_smallest"] = (
            rows[-1]["refined"]["peak_rss_gib"] / rows[0]["refined"]["peak_rss_gib"]
        )
        print(f"with --refine block: peak RSS {result['refined_peak_ratio_largest_over_smallest']:.3f}x")
    print(
        f"peak RSS {rows[-1]['layers']} vs {rows[0]['layers']} layers: "
        f"{result['peak_ratio_largest_over_smallest']:.3f}x; "
        f"mean {per_block:.0f} s per block; 32 layers extrapolated: {result['extrapolated_32_layers_s'] / 60:.0f} min"
    )
    path = Path(args.json or ROOT / "benchmarks" / "results" / f"compress_scale_{args.device}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
