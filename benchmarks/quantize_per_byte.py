"""Which is better per byte: dense vs LoRD, each in float32, int8 and int4 ONNX (ONNX Runtime CPU).

On the shipped reference code model (``lord_export.measure.reference.reference_model_dir()``): LoRD at rank
reduction 0.5, all targets, calibrated on the reference calibration split (128 blocks × 256
tokens, as ``sweep_reference.py``). Both models are exported by ``lord-export export``'s own path
(``export_onnx``), then quantized with ``quantize_onnx`` ("int8": ONNX Runtime dynamic int8;
"int4": MatMulNBits, ``--block-size`` per MatMul, see ``lord_export.export.onnx.int4_block_size``).
For each of the six ONNX files: bytes on disk, perplexity on evenly spaced 256-token windows of the
evaluation split computed THROUGH ONNX Runtime (one window per run, no padding; the float32 ones
are checked against PyTorch's perplexity), and batch-1 prefill latency at ``--tokens`` (all six
sessions timed interleaved after warm-up, median).

    python benchmarks/quantize_per_byte.py [--eval-tokens 16384] [--tokens 256] [--block-size 128]
        [--accuracy-level N] [--json benchmarks/results/quantize_per_byte_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

import lord_export as le
from lord_export.calibration.data import batches, document_windows, read_documents, subsample_windows, tokenize_blocks
from lord_export.export.onnx import export_onnx, make_session, quantize_onnx
from lord_export.measure.reference import reference_model_dir, split_texts
from lord_export.measure.timing import cpu_name
from lord_export.persist.hf import load_dense, load_tokenizer
from lord_export.pipeline.evaluate import perplexity


def ort_perplexity(session, windows) -> float:
    nll, count = 0.0, 0
    for w in windows:  # one window per run: no padding
        x = np.array([w], dtype=np.int64)
        feeds = {i.name: (np.ones_like(x) if "mask" in i.name else x) for i in session.get_inputs()}
        logits = session.run(None, feeds)[0][0].astype(np.float64)
        m = logits.max(-1, keepdims=True)
        logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll -= float(logp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    return float(np.exp(nll / count))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rank-reduction", type=float, default=0.5)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--tokens", type=int, default=256, help="prefill length for the latency column")
    ap.add_argument("--block-size", type=int, default=128)
    ap.add_argument("--accuracy-level", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--json", default="benchmarks/results/quantize_per_byte_cpu.json")
    args = ap.parse_args()
    t_start = time.perf_counter()
    model_dir = reference_model_dir()
    tok = load_tokenizer(model_dir)
    ids, mask = tokenize_blocks(tok, read_documents(split_texts("calib")), samples=128, seqlen=256)
    windows = subsample_windows(document_windows(tok, read_documents(split_texts("eval")), 256), args.eval_tokens)
    work = Path(tempfile.mkdtemp(prefix="lord-quant-per-byte-"))
    dense = load_dense(model_dir, dtype="float32")
    torch_ppl = {"dense": perplexity(dense, windows, batch_size=16, pad_id=tok.pad_token_id).perplexity}
    dense.save_pretrained(work / "dense")
    lord = load_dense(model_dir, dtype="float32")
    plan = le.compress(lord, batches(ids, mask, 16), rank_reduction=args.rank_reduction, targets="all")
    torch_ppl["lord"] = perplexity(lord, windows, batch_size=16, pad_id=tok.pad_token_id).perplexity
    le.save_compressed(lord, plan, work / "lord", source_dir=model_dir)
    files = {}
    for name in ("dense", "lord"):
        export_onnx(work / name, work / f"{name}-onnx")
        files[(name, "float32")] = work / f"{name}-onnx" / "model.onnx"
        for kind in ("int8", "int4"):
            q = quantize_onnx(
                work / f"{name}-onnx", kind, block_size=args.block_size, accuracy_level=args.accuracy_level
            )
            files[(name, kind)] = Path(q["path"])
            if kind == "int4":
                print(f"{name} int4 block sizes per MatMul: {q['matmuls_per_block_size']}", flush=True)
    sessions = {key: make_session(path, prefer_cuda=False) for key, path in files.items()}
    rows = {}
    for key, s in sessions.items():
        path = files[key]
        size = sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))
        rows[key] = {"model": key[0], "weights": key[1], "onnx_bytes": size, "perplexity": ort_perplexity(s, windows)}
        print(f"{key[0]:5s} {key[1]:7s} {size:>11,} bytes  perplexity {rows[key]['perplexity']:.4f}", flush=True)
    for name in ("dense", "lord"):  # the float32 ONNX must reproduce PyTorch's perplexity
        rows[(name, "float32")]["torch_perplexity"] = torch_ppl[name]
    x = np.random.default_rng(0).integers(3, tok.vocab_size - 1, size=(1, args.tokens)).astype(np.int64)
    feeds = {
        k: {i.name: (np.ones_like(x) if "mask" in i.name else x) for i in s.get_inputs()} for k, s in sessions.items()
    }
    times: dict = {k: [] for k in sessions}
    for r in range(args.warmup + args.repeats):
        for k, s in sessions.items():
            t = time.perf_counter()
            s.run(None, feeds[k])
            if r >= args.warmup:
                times[k].append(time.perf_counter() - t)
    base = rows[("dense", "float32")]
    print(f"\n| model | weights | ONNX bytes | vs dense fp32 | perplexity (ORT) | prefill {args.tokens} tok ms |")
    print("|---|---|---:|---:|---:|---:|")
    for k, row in rows.items():
        row["prefill_ms"] = statistics.median(times[k]) * 1e3
        row["prefill_ms_all"] = [t * 1e3 for t in times[k]]
        row["bytes_vs_dense_fp32"] = row["onnx_bytes"] / base["onnx_bytes"]
        print(
            f"| {row['model']} | {row['weights']} | {row['onnx_bytes']:,} | {row['bytes_vs_dense_fp32']:.3f} | "
            f"{row['perplexity']:.3f} | {row['prefill_ms']:.1f} |"
        )
    out = {
        "machine": cpu_name(),
        "model": str(model_dir),
        "rank_reduction": args.rank_reduction,
        "targets": "all",
        "lord_params": sum(p.numel() for p in lord.parameters()),
        "dense_params": sum(p.numel() for p in dense.parameters()),
        "eval_tokens": sum(len(w) - 1 for w in windows),
        "prefill_tokens": args.tokens,
        "int4_block_size": args.block_size,
        "int4_accuracy_level": args.accuracy_level,
        "perplexity_through": "onnxruntime CPUExecutionProvider, one window per run",
        "rows": list(rows.values()),
        "seconds": time.perf_counter() - t_start,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
