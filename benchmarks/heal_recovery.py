"""How much of the perplexity lost to compression a short heal wins back (reference model, SmolLM2-135M).

Protocol (as benchmarks/sweep_reference.py): compress with the calibration split of the standard
library (128 blocks of 256 tokens) at ``--rank-reduction`` (all targets), evaluate on evenly spaced
256-token windows of the evaluation split (about ``--eval-tokens`` predicted tokens, files neither
the model nor the healing ever saw). Heal on the CALIBRATION split only (``--train-blocks`` blocks of
256 tokens, cycled, batches of ``--batch-size``) for ``--steps`` steps per setting, in float32, with
``torch.set_num_threads(--threads)``. Recovered = (compressed − healed) / (compressed − dense).

    nice -n 10 python benchmarks/heal_recovery.py [--rank-reduction 0.7] [--steps 150] \
        [--settings lora factors lora+distill factors+distill]

``--model smollm2 --model-dir "$(bash ../shared/tools/get-smollm2.sh)"`` uses the SmolLM2 protocol
of ``quality_sweeps.py`` instead (compress on 16 × 256 tokens of 20 calibration files, evaluate on
512-token windows of 12 evaluation files, ``--eval-tokens`` predicted tokens); ``--param-ratio P``
compresses at a parameter budget with the fisher allocation instead of a uniform rank reduction.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch

import lord_export
from lord_export.calibration.data import batches, document_windows, read_documents, subsample_windows, tokenize_blocks
from lord_export.measure.reference import reference_model_dir, split_texts
from lord_export.persist.hf import load_dense, load_tokenizer
from lord_export.pipeline.evaluate import perplexity
from lord_export.pipeline.heal import heal

LR = {"lora": 1e-3, "factors": 1e-4}


def utf8_files(paths: list[Path]) -> list[Path]:
    """The files that decode as UTF-8 (the train split holds a few Latin-1 test modules)."""
    keep = []
    for f in paths:
        try:
            f.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        keep.append(f)
    return keep


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def setting_name(args: argparse.Namespace) -> str:
    return f"rr {args.rank_reduction}" if args.param_ratio is None else f"param ratio {args.param_ratio}, fisher"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["reference", "smollm2"], default="reference")
    ap.add_argument("--model-dir", default=None, help="the model directory (needed for smollm2)")
    ap.add_argument("--rank-reduction", type=float, default=0.7)
    ap.add_argument("--param-ratio", type=float, default=None, help="compress at this parameter budget (fisher)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument(
        "--heal-split",
        choices=["calib", "train"],
        default="calib",
        help="stdlib split the heal trains on: the calibration files, or the files the model was trained on "
        "(both disjoint from the evaluation files)",
    )
    ap.add_argument("--train-blocks", type=int, default=512, help="256-token blocks of the calibration split")
    ap.add_argument("--lora-r", type=int, default=8)
    ap.add_argument("--lr-lora", type=float, default=LR["lora"])
    ap.add_argument("--lr-factors", type=float, default=LR["factors"])
    ap.add_argument("--settings", nargs="+", default=["lora", "factors", "lora+distill", "factors+distill"])
    ap.add_argument("--warmup-steps", type=int, default=None, help="default: a tenth of --steps")
    ap.add_argument("--schedule", choices=["cosine", "constant"], default="cosine")
    ap.add_argument("--lm-weight", type=float, default=1.0, help="weight of the LM loss with distillation (0: pure KL)")
    ap.add_argument(
        "--hidden-weight", type=float, default=0.0, help="weight of per-block hidden-state distillation (with distill)"
    )
    ap.add_argument("--eval-tokens", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/heal_recovery.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    if args.model == "smollm2" and not args.model_dir:
        raise SystemExit("--model smollm2 needs --model-dir (bash ../shared/tools/get-smollm2.sh prints it)")
    model_dir = Path(args.model_dir) if args.model_dir else reference_model_dir()
    tok = load_tokenizer(model_dir)
    calib_docs = list(read_documents(split_texts("calib")))
    if args.model == "reference":
        ids, mask = tokenize_blocks(tok, calib_docs, samples=128, seqlen=256)
        calib = batches(ids, mask, 16)
        windows = subsample_windows(document_windows(tok, read_documents(split_texts("eval")), 256), args.eval_tokens)
        pad = tok.pad_token_id
        compress_protocol = "calibration split, 128 x 256 tokens, all targets, method lord"
        eval_window = 256
    else:
        from quality_sweeps import load_setting  # benchmarks/ is the script's directory

        _, calib, windows, pad = load_setting("smollm2", str(model_dir), args.eval_tokens)
        compress_protocol = "20 calibration-split files, 16 x 256 tokens, all targets, method lord"
        eval_window = 512
    heal_docs = calib_docs if args.heal_split == "calib" else list(read_documents(utf8_files(split_texts("train"))))
    tr_ids, tr_mask = tokenize_blocks(tok, heal_docs, samples=args.train_blocks, seqlen=256)
    train = batches(tr_ids, tr_mask, args.batch_size)

    def ppl(model: torch.nn.Module) -> float:
        return perplexity(model, windows, batch_size=16, pad_id=pad).perplexity

    dense = load_dense(model_dir, dtype="float32")
    t0 = time.perf_counter()
    p_dense = ppl(dense)
    eval_seconds = time.perf_counter() - t0
    lord = copy.deepcopy(dense)
    if args.param_ratio is not None:
        plan = lord_export.compress(lord, calib, param_ratio=args.param_ratio, allocation="fisher")
    else:
        plan = lord_export.compress(lord, calib, rank_reduction=args.rank_reduction)
    p_lord = ppl(lord)
    print(
        f"dense {p_dense:.4f}  compressed ({setting_name(args)}) {p_lord:.4f} "
        f"(+{100 * (p_lord / p_dense - 1):.1f}%), {len(plan.factorized_groups)} groups; eval {eval_seconds:.0f} s",
        flush=True,
    )
    result = {
        "model": "reference-code-llama (shipped)" if args.model == "reference" else "SmolLM2-135M",
        "protocol": {
            "compress": compress_protocol,
            "heal_data": f"{args.heal_split} split, {int(tr_mask.sum())} tokens in {tr_ids.shape[0]} blocks of 256",
            "eval": f"evaluation split, {sum(len(w) - 1 for w in windows)} predicted tokens, "
            f"{eval_window}-token windows",
            "threads": args.threads,
            "dtype": "float32",
        },
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "rank_reduction": args.rank_reduction if args.param_ratio is None else None,
        "param_ratio": args.param_ratio,
        "params": {"dense": n_params(dense), "lord": n_params(lord)},
        "perplexity": {"dense": p_dense, "compressed": p_lord},
        "settings": [],
    }
    out = Path(args.out)
    for setting in args.settings:
        mode, _, extra = setting.partition("+")
        model = copy.deepcopy(lord)
        lr = args.lr_lora if mode == "lora" else args.lr_factors
        rep = heal(
            model,
            train,
            steps=args.steps,
            lr=lr,
            lora_r=args.lora_r,
            mode=mode,
            distill_model=dense if extra == "distill" else None,
            lm_weight=args.lm_weight if extra == "distill" else 1.0,
            hidden_weight=args.hidden_weight if extra == "distill" else 0.0,
            warmup_steps=args.warmup_steps,
            schedule=args.schedule,
        )
        p = ppl(model)
        recovered = (p_lord - p) / (p_lord - p_dense)
        row = {
            "setting": setting,
            "mode": mode,
            "distill": extra == "distill",
            "steps": args.steps,
            "lr": lr,
            "schedule": rep["schedule"],
            "warmup_steps": rep["warmup_steps"],
            "lm_weight": args.lm_weight if extra == "distill" else 1.0,
            "hidden_weight": args.hidden_weight if extra == "distill" else 0.0,
            "lora_r": args.lora_r if mode == "lora" else None,
            "batch": f"{args.batch_size} x 256",
            "trainable_params": rep["trainable_params"],
            "seconds": rep["seconds"],
            "first_loss": rep["first_loss"],
            "last_loss": rep["last_loss"],
            "loss_every_10": rep["loss"][::10],
            "perplexity": p,
            "recovered": recovered,
        }
        result["settings"].append(row)
        print(
            f"{setting:16} {args.steps} steps in {rep['seconds']:.0f} s: loss {rep['first_loss']:.3f} -> "
            f"{rep['last_loss']:.3f}; perplexity {p:.4f}, recovered {100 * recovered:.0f}%",
            flush=True,
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
