"""``lord-export heal``: a short fine-tune of a LoRD model directory, merged and saved as a LoRD directory."""

from __future__ import annotations

import argparse
import sys

from .args import (
    HelpFormatter,
    add_alias,
    add_calibration_args,
    add_device_args,
    add_eval_args,
    add_loading_args,
    add_output_args,
    calibration_options,
    dtype_arg,
    overwrite_mode,
    positive_float,
    positive_int,
)


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    from ..pipeline.heal import DEFAULT_LR

    h = sub.add_parser(
        "heal",
        help="fine-tune a LoRD model directory briefly (LoRA merged back, or the factors) and save it",
        description="Heal LORD_DIR (a lord-export compress output): a short fine-tune on --calib (read like "
        "calibration data: blocks of --calib-seqlen tokens, --calib-samples of them, cycled), either LoRA on "
        "every LoRD layer merged back into the factors (--mode lora) or the factors themselves (--mode factors); "
        "ranks and structure do not change. Writes OUTPUT_DIR in the usual LoRD format plus heal_report.json "
        "(loss curve, time, peak memory, held-out perplexity before/after with --eval). The plan's per-group "
        "error numbers were measured before healing: they are cleared and the plan says it was healed.",
        formatter_class=HelpFormatter,
        parents=parents,
    )
    h.add_argument("lord_dir", metavar="LORD_DIR", help="a LoRD model directory (lord-export compress output)")
    h.add_argument("output_dir", metavar="OUTPUT_DIR", help="where to write the healed model")
    add_calibration_args(h, required=False)  # required, checked in run(): --data is its old spelling
    add_alias(h, "--data", "--calib", "calib", nargs="+")
    t = h.add_argument_group("training")
    t.add_argument("--steps", type=positive_int, default=100, metavar="N", help="optimizer steps (AdamW)")
    t.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"learning rate (default: {DEFAULT_LR['lora']:g} for lora, {DEFAULT_LR['factors']:g} for factors)",
    )
    t.add_argument(
        "--warmup-steps", type=int, default=None, metavar="N", help="linear warmup steps (default: a tenth of --steps)"
    )
    t.add_argument(
        "--schedule",
        choices=["cosine", "constant"],
        default="cosine",
        help="learning rate after the warmup: cosine decay to zero, or constant",
    )
    t.add_argument("--mode", choices=["lora", "factors"], default="lora", help="what is trained")
    t.add_argument("--lora-r", type=positive_int, default=8, metavar="R", help="LoRA rank (--mode lora)")
    t.add_argument(
        "--distill",
        default=None,
        metavar="DENSE_DIR",
        help="also distill from this model (e.g. the dense model LORD_DIR came from): KL of the logits",
    )
    t.add_argument("--distill-weight", type=float, default=1.0, metavar="W", help="weight of the KL term")
    t.add_argument("--lm-weight", type=float, default=1.0, metavar="W", help="weight of the LM loss (0: pure KL)")
    t.add_argument(
        "--distill-hidden",
        type=float,
        default=0.0,
        metavar="W",
        help="with --distill: also match every block's output hidden states (relative squared error, mean over "
        "blocks) with this weight; 0 distills the logits only",
    )
    add_eval_args(h, window=None)
    h.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype the healed model is saved in (default auto: LORD_DIR's); training and evaluation run in float32",
    )
    add_device_args(h)
    add_output_args(h)
    add_loading_args(h)
    h.set_defaults(func=run)


#: HealConfig field → the flag that sets it (library messages name fields; the CLI names flags)
FLAGS = {
    "warmup_steps": "--warmup-steps",
    "hidden_weight": "--distill-hidden",
    "distill_weight": "--distill-weight",
    "lm_weight": "--lm-weight",
    "lora_r": "--lora-r",
    "steps": "--steps",
}


def flags_in(message: str) -> str:
    """``message`` with HealConfig's field names replaced by the flags that set them."""
    import re

    return re.sub(r"\b(" + "|".join(FLAGS) + r")\b", lambda m: FLAGS[m.group(1)], message)


def run(args: argparse.Namespace) -> int:
    from ..errors import UsageError
    from ..pipeline.heal import HealConfig, heal_model_dir

    if not args.calib:
        raise UsageError("heal needs training text/code: pass --calib PATH... (formerly --data)")
    try:
        config = HealConfig(
            steps=args.steps,
            lr=args.lr,
            mode=args.mode,
            lora_r=args.lora_r,
            distill_weight=args.distill_weight,
            lm_weight=args.lm_weight,
            hidden_weight=args.distill_hidden,
            warmup_steps=args.warmup_steps,
            schedule=args.schedule,
        )
    except UsageError as e:
        raise UsageError(flags_in(str(e))) from None
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"heal: {msg}", file=sys.stderr, flush=True))
    report = heal_model_dir(
        args.lord_dir,
        args.output_dir,
        args.calib,
        config,
        data=calibration_options(args),
        eval_data=args.eval_data,
        eval_window=args.eval_window,
        eval_tokens=args.eval_tokens,
        distill_dir=args.distill,
        dtype=dtype_arg(args.dtype),
        device=args.device,
        overwrite=overwrite_mode(args),
        trust_remote_code=args.trust_remote_code,
        progress=say,
        bars=not args.quiet,
    )
    line = f"wrote {args.output_dir}: {report['steps']} step(s) in {report['seconds']:.1f} s, "
    line += f"loss {report['first_loss']:.4f} -> {report['last_loss']:.4f}"
    if report["eval"] is not None:
        before, after = report["eval"]["before"], report["eval"]["after"]
        line += f"; held-out perplexity {before['perplexity']:.4f} -> {after['perplexity']:.4f}"
    print(line)
    return 0
