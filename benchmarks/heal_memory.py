"""Peak CPU memory of the same LoRA fine-tune on a dense model and on its LoRD version.

The LoRD paper's claim: LoRA on a LoRD model needs less memory than on the dense model (fewer
frozen weights to hold; the optimizer state is the adapters' either way). Both runs are the same
code in a FRESH subprocess each: PEFT LoRA (rank ``--lora-r``, alpha 2r, the same target names
q/k/v/o/gate/up/down_proj — on the LoRD model they are LordLinear members, see
lord_export.integrations.peft), AdamW, ``--steps`` steps on the same calibration-split batches, float32.
Memory is ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (peak resident set) read after the
imports, after loading the model, and after training; with ``--device cuda`` also the GPU's
``torch.cuda.max_memory_allocated`` after loading and after training (``--dtype bfloat16`` there),
and, with ``--qlora`` and bitsandbytes installed, a third run: QLoRA on the dense model (4-bit NF4
base weights through transformers' ``BitsAndBytesConfig``) — the memory a user would otherwise
reach for. The LoRD model is compressed (on ``--device``) and saved beforehand in a process of its
own, so compression does not count (and no worker inherits its peak: Linux keeps ``ru_maxrss``
across ``exec``).

    nice -n 10 python benchmarks/heal_memory.py [--model-dir DIR] [--rank-reduction 0.7] [--steps 20]
        [--device cuda --dtype bfloat16 --qlora]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def maxrss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def compress_worker(args: argparse.Namespace) -> None:
    """Compress the dense model (on ``--device``) and save it to ``--lord-dir``."""
    import torch

    import lord_export
    from lord_export.calibration.data import batches, read_documents, tokenize_blocks
    from lord_export.persist.hf import load_dense, load_tokenizer

    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.model_dir)
    files = [Path(p) for p in json.loads(args.files)]
    ids, mask = tokenize_blocks(tok, read_documents(files), samples=128, seqlen=args.seqlen)
    model = load_dense(args.model_dir, dtype="float32").to(args.device)
    calib = [{k: v.to(args.device) for k, v in b.items()} for b in batches(ids, mask, 16)]
    plan = lord_export.compress(model, calib, rank_reduction=args.rank_reduction)
    plan.tensors = {k: v.cpu() for k, v in plan.tensors.items()}
    lord_export.save_compressed(model.cpu(), plan, args.lord_dir)


def worker(args: argparse.Namespace) -> None:
    import torch

    after_imports = maxrss_mib()
    import itertools

    from peft import LoraConfig, get_peft_model

    import lord_export
    from lord_export.calibration.data import batches, read_documents, tokenize_blocks
    from lord_export.persist.hf import load_dense, load_tokenizer
    from lord_export.pipeline.heal import _lm_loss

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    tok = load_tokenizer(args.model_dir)
    files = [Path(p) for p in json.loads(args.files)]
    ids, mask = tokenize_blocks(tok, read_documents(files), samples=args.blocks, seqlen=args.seqlen)
    data = [{k: v.to(args.device) for k, v in b.items()} for b in batches(ids, mask, args.batch_size)]
    before_load = maxrss_mib()
    dtype = getattr(torch, args.dtype)
    if args.worker == "dense":
        model = load_dense(args.model_dir, dtype=args.dtype).to(args.device)
    elif args.worker == "dense-qlora":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        nf4 = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
        model = AutoModelForCausalLM.from_pretrained(
            args.model_dir, quantization_config=nf4, dtype=dtype, device_map={"": args.device}
        )
    else:
        model = lord_export.load(args.lord_dir, device=args.device, dtype=dtype)
    after_load = maxrss_mib()
    gpu_after_load = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
    model.config.use_cache = False
    peft_model = get_peft_model(model, LoraConfig(target_modules=TARGETS, r=args.lora_r, lora_alpha=2 * args.lora_r))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    peft_model.train()
    t0 = time.perf_counter()
    losses = []
    for batch in itertools.islice(itertools.cycle(data), args.steps):
        logits = peft_model(**batch).logits
        loss = _lm_loss(logits, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "model": args.worker,
                "params": sum(p.numel() for p in model.parameters()),
                "trainable_params": sum(p.numel() for p in params),
                "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20,
                "maxrss_mib_after_imports": round(after_imports, 1),
                "maxrss_mib_before_load": round(before_load, 1),
                "maxrss_mib_after_load": round(after_load, 1),
                "maxrss_mib_peak": round(maxrss_mib(), 1),
                "cuda_mib_after_load": round(gpu_after_load, 1) if cuda else None,
                "cuda_mib_peak": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                "train_seconds": round(seconds, 2),
                "first_loss": losses[0],
                "last_loss": losses[-1],
            }
        )
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", default=None, help="dense model directory (default: the shipped reference model)")
    ap.add_argument("--rank-reduction", type=float, default=0.7)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--qlora", action="store_true", help="also QLoRA (4-bit NF4) on the dense model (needs CUDA)")
    ap.add_argument("--out", default="benchmarks/results/heal_memory.json")
    ap.add_argument("--worker", choices=["compress", "dense", "lord", "dense-qlora"], help=argparse.SUPPRESS)
    ap.add_argument("--lord-dir", help=argparse.SUPPRESS)
    ap.add_argument("--files", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "compress":
        compress_worker(args)
        return
    if args.worker:
        worker(args)
        return
    import importlib.util

    if args.qlora and (not args.device.startswith("cuda") or importlib.util.find_spec("bitsandbytes") is None):
        ap.error("--qlora needs --device cuda and bitsandbytes installed")

    import torch

    from lord_export.measure.reference import reference_model_dir, split_texts

    model_dir = Path(args.model_dir) if args.model_dir else reference_model_dir()
    files = [str(p) for p in split_texts("calib")]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        lord_dir = Path(tmp) / "lord"
        # compression runs in its own process too: Linux keeps ru_maxrss across exec, so workers
        # started by a parent that held the model would all report at least the parent's peak
        compress_argv = [sys.executable, __file__, "--worker", "compress", "--model-dir", str(model_dir)]
        compress_argv += ["--lord-dir", str(lord_dir), "--files", json.dumps(files), "--seqlen", str(args.seqlen)]
        compress_argv += ["--rank-reduction", str(args.rank_reduction), "--threads", str(args.threads)]
        compress_argv += ["--device", args.device]
        proc = subprocess.run(compress_argv, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"compress worker failed:\n{proc.stderr[-3000:]}")
        common = ["--model-dir", str(model_dir), "--lord-dir", str(lord_dir), "--files", json.dumps(files)]
        common += ["--steps", str(args.steps), "--batch-size", str(args.batch_size), "--seqlen", str(args.seqlen)]
        common += ["--blocks", str(args.blocks), "--lora-r", str(args.lora_r), "--threads", str(args.threads)]
        common += ["--device", args.device, "--dtype", args.dtype]
        for which in ("dense", "lord", *(["dense-qlora"] if args.qlora else [])):
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", which, *common], capture_output=True, text=True, check=False
            )
            if proc.returncode != 0:
                raise SystemExit(f"{which} worker failed:\n{proc.stderr[-3000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results.append(row)
            print(
                f"{which:5}: {row['params']:,} params ({row['weights_mib']:.1f} MiB), "
                f"{row['trainable_params']:,} trainable; peak RSS {row['maxrss_mib_peak']:.1f} MiB "
                f"(after load {row['maxrss_mib_after_load']:.1f}, "
                f"after imports {row['maxrss_mib_after_imports']:.1f}); "
                f"{args.steps} steps in {row['train_seconds']:.1f} s"
                + (
                    f"; GPU peak {row['cuda_mib_peak']:.0f} MiB (after load {row['cuda_mib_after_load']:.0f})"
                    if row["cuda_mib_peak"] is not None
                    else ""
                ),
                flush=True,
            )
    dense, lord = results[:2]
    out = {
        "model": str(model_dir),
        "rank_reduction": args.rank_reduction,
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "targets": TARGETS},
        "steps": args.steps,
        "batch": f"{args.batch_size} x {args.seqlen}",
        "threads": args.threads,
        "dtype": args.dtype,
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
        "measure": "resource.getrusage(RUSAGE_SELF).ru_maxrss, fresh subprocess per model",
        "runs": results,
        "peak_rss_ratio_lord_over_dense": lord["maxrss_mib_peak"] / dense["maxrss_mib_peak"],
        "peak_rss_saved_mib": dense["maxrss_mib_peak"] - lord["maxrss_mib_peak"],
    }
    if dense["cuda_mib_peak"] is not None:
        out["cuda_peak_ratio_lord_over_dense"] = lord["cuda_mib_peak"] / dense["cuda_mib_peak"]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(
        f"LoRD / dense peak RSS: {out['peak_rss_ratio_lord_over_dense']:.3f} ({out['peak_rss_saved_mib']:.1f} MiB less)"
    )


if __name__ == "__main__":
    main()
