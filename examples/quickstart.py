"""Quickstart: compress a model directory with LoRD, reload it, and show what was done.

With no arguments it builds its embedded default — a small Llama-architecture model from a config
(random weights) with a byte-level BPE tokenizer trained on this interpreter's standard library —
calibrates on standard-library source code, compresses it and prints the per-group report.
Pass a model directory and calibration paths to run it on your own model:

    python examples/quickstart.py [MODEL_DIR --calib PATH ...] [--rank-reduction 0.3] [--out DIR]
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

import lord_export as le
from lord_export.calibration.data import CalibrationOptions


def stdlib_files(n: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py") if p.stat().st_size > 2000)
    return files[:n]


def build_default_model(directory: Path) -> None:
    """A Llama-style model (hidden 256, 4 layers) with a tokenizer trained on stdlib sources."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator((p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files(60)), trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>").save_pretrained(
        directory
    )
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    LlamaForCausalLM(config).save_pretrained(directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model_dir", nargs="?", help="a local model directory (default: the embedded small model)")
    ap.add_argument("--calib", nargs="+", help="calibration files/folders (default: standard-library sources)")
    ap.add_argument("--rank-reduction", type=float, default=0.4)
    ap.add_argument("--out", help="output directory (default: a temporary one)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="lord-quickstart-"))
    model_dir = Path(args.model_dir) if args.model_dir else work / "dense"
    if not args.model_dir:
        print(f"building the embedded default model in {model_dir} ...")
        build_default_model(model_dir)
    calib = args.calib or [str(p) for p in stdlib_files(120)[60:]]  # not the tokenizer's training files
    out = Path(args.out) if args.out else work / "lord"

    t0 = time.perf_counter()
    report = le.compress_model_dir(
        model_dir,
        out,
        calib,
        le.LordConfig(rank_reduction=args.rank_reduction),
        data=CalibrationOptions(samples=32, seqlen=256),
        bars=True,
    )
    seconds = time.perf_counter() - t0

    print(
        f"\nLoRD ({report['method']}), rank reduction {report['rank_reduction']}, "
        f"{report['calibration']['tokens']} calibration tokens, {seconds:.1f} s"
    )
    print(f"{'group':52} {'d_in':>5} {'d_out':>6} {'rank':>5} {'parity':>7}  {'rel.err':>8} {'bound':>8}")
    for g in report["groups"]:
        if g["factorized"]:
            errs = f"{g['relative_error']:8.4f} {g['optimal_relative_error']:8.4f}"
        else:
            errs = f"{'dense (below parity)':>17}"
        print(f"{g['name']:52} {g['d_in']:5d} {g['d_out']:6d} {g['rank']:5d} {g['parity_rank']:7.1f}  {errs}")
    before, after = report["params_before"], report["params_after"]
    print(f"parameters: {before:,} -> {after:,} ({100 * (1 - after / before):.1f}% fewer)")

    model = le.load(out)
    ids = torch.tensor([[1, 100, 200, 300]])
    text = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0)
    print(f"reloaded from {out} with lord_export.load; generate() gave {text.shape[1] - ids.shape[1]} new tokens")


if __name__ == "__main__":
    main()
