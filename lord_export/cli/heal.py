"""``lord-export heal``: a short fine-tune of a LoRD model directory, merged and saved as a LoRD directory."""

from __future__ import annotations

import argparse
import sys

from .args import add_calibration_args, add_device_args, positive_int

HEAL_REPORT_FILE = "heal_report.json"
DEFAULT_LR = {"lora": 1e-4, "factors": 1e-5}  # larger rates raised held-out perplexity (heal_notes.md)


def positive_float(text: str) -> float:
    """argparse type: a float > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_parser(sub: argparse._SubParsersAction, parents: list[argparse.ArgumentParser]) -> None:
    h = sub.add_parser(
        "heal",
        help="fine-tune a LoRD model directory briefly (LoRA merged back, or the factors) and save it",
        description="Heal LORD_DIR (a lord-export compress output): a short fine-tune on --data (read like "
        "calibration data: blocks of --calib-seqlen tokens, --calib-samples of them, cycled), either LoRA on "
        "every LoRD layer merged back into the factors (--mode lora) or the factors themselves (--mode factors); "
        "ranks and structure do not change. Writes OUTPUT_DIR in the usual LoRD format plus heal_report.json "
        "(loss curve, time, peak memory, held-out perplexity before/after with --eval). The plan's per-group "
        "error numbers were measured before healing: they are cleared and the plan says it was healed.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        parents=parents,
    )
    h.add_argument("lord_dir", metavar="LORD_DIR", help="a LoRD model directory (lord-export compress output)")
    h.add_argument("output_dir", metavar="OUTPUT_DIR", help="where to write the healed model (must not exist)")
    add_calibration_args(h, prefix="data")
    t = h.add_argument_group("training")
    t.add_argument("--steps", type=positive_int, default=100, metavar="N", help="optimizer steps (AdamW)")
    t.add_argument(
        "--lr",
        type=positive_float,
        default=None,
        help=f"learning rate (default: {DEFAULT_LR['lora']:g} for lora, {DEFAULT_LR['factors']:g} for factors)",
    )
    t.add_argument(
        "--warmup-steps",
        type=int,
        default=None,
        metavar="N",
        help="linear learning-rate warmup steps (default: a tenth of --steps)",
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
        help="with --distill: also match every block's output hidden states (relative squared error, "
        "mean over blocks) with this weight; 0 (default) distills the logits only",
    )
    e = h.add_argument_group("held-out evaluation")
    e.add_argument("--eval", nargs="+", default=None, metavar="PATH", help="perplexity before/after on these files")
    e.add_argument(
        "--eval-window",
        type=positive_int,
        default=None,
        metavar="L",
        help="tokens per evaluation window (default: 512 or the model's maximum positions, whichever is smaller)",
    )
    h.add_argument(
        "--dtype",
        choices=["auto", "float32", "bfloat16", "float16"],
        default="auto",
        help="dtype the healed model is saved in (auto: LORD_DIR's); training and evaluation run in float32",
    )
    add_device_args(h)
    h.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists")
    h.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from the model directory (off by default)"
    )
    h.set_defaults(func=run)


def mark_healed(plan, note: str) -> None:
    """The plan's per-group errors describe the factors before healing: clear them and say so."""
    for g in plan.groups:
        if g.factorized:
            g.relative_error = None
            g.dense_output_error = None
    plan.warnings.append(note)


def check_heal_args(args: argparse.Namespace) -> tuple:
    """Everything cheap, checked before anything heavy is loaded: (LoRD dir, output, device, lr)."""
    from pathlib import Path

    from ..data import text_files
    from ..device import resolve_device
    from ..errors import OutputExistsError, UsageError
    from ..hf import check_model_dir
    from ..io import is_lord_dir

    src = check_model_dir(args.lord_dir)
    if not is_lord_dir(src):
        raise UsageError(
            f"{args.lord_dir!r} is a dense model directory, not a LoRD one (no lord_plan.json); "
            "compress it first with 'lord-export compress'"
        )
    out = Path(args.output_dir)
    if out.exists() and not args.overwrite:
        raise OutputExistsError(args.output_dir)
    if out.absolute() == src.absolute():
        raise UsageError("the output directory must differ from LORD_DIR")
    if args.distill is not None:
        check_model_dir(args.distill)
    if args.distill_hidden < 0 or (args.distill_hidden > 0 and args.distill is None):
        raise UsageError(f"--distill-hidden needs --distill and a weight >= 0 (got {args.distill_hidden})")
    for flag, paths in (("--data", args.calib), ("--eval", args.eval)):
        if paths is None:
            continue
        try:
            text_files(paths)
        except UsageError as err:
            raise UsageError(f"{flag}: {err}") from None
    device = resolve_device(args.device)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.mode]
    if args.warmup_steps is not None and not 0 <= args.warmup_steps < args.steps:
        raise UsageError(f"--warmup-steps must be in [0, --steps) (got {args.warmup_steps}, --steps {args.steps})")
    if args.mode == "lora":
        try:
            import peft  # noqa: F401
        except ImportError:
            raise UsageError("--mode lora needs the 'peft' package; install it or use --mode factors") from None
    return src, out, device, lr


def run(args: argparse.Namespace) -> int:
    """Load, evaluate, train, evaluate, save — one sequence kept in one function on purpose (each step
    uses the previous one's objects; splitting it only moves the locals into arguments)."""
    import json
    import time

    import torch

    from ..data import calibration_set, evaluation_windows, resolve_seqlen
    from ..heal import heal
    from ..hf import load_tokenizer, max_positions, pad_token_id
    from ..io import REPORT_FILE, atomic_output_dir, load, load_model_dir, read_plan, write_into, write_json
    from ..measure.evaluate import perplexity
    from .args import calibration_options

    src, out, device, lr = check_heal_args(args)
    say = (lambda msg: None) if args.quiet else (lambda msg: print(f"heal: {msg}", file=sys.stderr, flush=True))

    tokenizer = load_tokenizer(src, trust_remote_code=args.trust_remote_code)
    positions = max_positions(src)
    train = calibration_set(tokenizer, args.calib, calibration_options(args), max_positions=positions)
    windows, window = None, None
    if args.eval:
        window = args.eval_window or resolve_seqlen(None, positions, 512)
        windows = evaluation_windows(tokenizer, args.eval, window, max_positions=positions)
    plan = read_plan(src, with_tensors=False)
    model = load(src, trust_remote_code=args.trust_remote_code)
    stored = next(p.dtype for p in model.parameters() if p.is_floating_point())
    out_dtype = stored if args.dtype == "auto" else getattr(torch, args.dtype)
    model = model.to(device=device, dtype=torch.float32)  # AdamW on half-precision weights would lose the updates
    pad = pad_token_id(tokenizer)

    def evaluate(tag: str) -> dict | None:
        if windows is None:
            return None
        say(f"held-out perplexity {tag} healing ({len(windows)} windows)")
        result = perplexity(model, windows, batch_size=args.batch_size, pad_id=pad, progress=not args.quiet).to_dict()
        say(f"perplexity {tag}: {result['perplexity']:.4f}")
        return result

    before = evaluate("before")
    teacher = None
    if args.distill is not None:
        teacher = load_model_dir(args.distill, dtype=torch.float32, trust_remote_code=args.trust_remote_code)
    blocks = train.input_ids.shape[0]
    say(f"training {args.steps} step(s) on {train.tokens:,} tokens ({blocks} blocks), mode {args.mode}")
    t0 = time.perf_counter()
    training = heal(
        model,
        train.batches(),
        steps=args.steps,
        lr=lr,
        lora_r=args.lora_r,
        mode=args.mode,
        distill_model=teacher,
        distill_weight=args.distill_weight,
        lm_weight=args.lm_weight,
        hidden_weight=args.distill_hidden,
        warmup_steps=args.warmup_steps,
        schedule=args.schedule,
        device=device,
        progress=not args.quiet,
    )
    del teacher
    after = evaluate("after")
    heal_report = {
        "source": str(src),
        "data": train.describe(),
        "distill_from": args.distill,
        "train_dtype": "float32",
        "saved_dtype": str(out_dtype).removeprefix("torch."),
        **training,
        "total_seconds": round(time.perf_counter() - t0, 3),
        "eval": None
        if windows is None
        else {
            "paths": list(args.eval),
            "window": window,
            "windows": len(windows),
            "before": before,
            "after": after,
        },
    }
    note = (
        f"healed: fine-tuned after factorization ({args.mode}, {args.steps} steps, lr {lr:g}"
        + (f", distilled from {args.distill}" if args.distill else "")
        + "); per-group relative_error and dense_output_error were measured before healing and are cleared"
    )
    mark_healed(plan, note)
    source_report = src / REPORT_FILE
    report = json.loads(source_report.read_text()) if source_report.is_file() else {}
    report["groups"] = [g.to_dict() for g in plan.groups]
    report["warnings"] = [*report.get("warnings", []), note]
    report["healed"] = {k: heal_report[k] for k in ("mode", "steps", "lr", "lora_r", "distill", "seconds")}
    model.to(device="cpu", dtype=out_dtype)
    with atomic_output_dir(out, overwrite=args.overwrite) as tmp:
        write_into(tmp, model, plan, source_dir=src, report=report)
        write_json(tmp / HEAL_REPORT_FILE, heal_report)
    line = f"wrote {args.output_dir}: {args.steps} step(s) in {training['seconds']:.1f} s, "
    line += f"loss {training['first_loss']:.4f} -> {training['last_loss']:.4f}"
    if before is not None:
        line += f"; held-out perplexity {before['perplexity']:.4f} -> {after['perplexity']:.4f}"
    print(line)
    return 0
