"""What the examples share: the model they run on, its calibration data, and a LoRD directory of it.

By default the examples use the reference code model shipped with lord_export (a 7M-parameter
Llama-architecture model trained on the Python standard library) and its calibration split; pass
a model directory and ``--calib`` paths to use your own.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import lord_export as le
from lord_export.calibration.data import CalibrationOptions


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("model_dir", nargs="?", help="a dense model directory (default: the shipped reference model)")
    p.add_argument("--calib", nargs="+", help="calibration text/code (default: the reference model's calib split)")
    p.add_argument("--rank-reduction", type=float, default=0.5, help="LoRD rank reduction (default 0.5)")
    p.add_argument("--prompt", default="def fibonacci(n):", help="the prompt to continue")
    return p


def model_and_data(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """The dense model directory and calibration paths the example runs on."""
    if args.model_dir is None:
        from lord_export.measure.reference import reference_model_dir, split_texts

        return reference_model_dir(), split_texts("calib")
    if not args.calib:
        raise SystemExit("pass --calib PATH... with your own model directory")
    return Path(args.model_dir), [Path(p) for p in args.calib]


def compress_into(model_dir: Path, out: Path, calib: list[Path], rank_reduction: float) -> Path:
    """``lord-export compress`` in Python: a LoRD directory of ``model_dir`` at ``out`` (small calibration)."""
    le.compress_model_dir(
        model_dir,
        out,
        calib,
        le.LordConfig(rank_reduction=rank_reduction),
        data=CalibrationOptions(samples=16, seqlen=128),
        device="cpu",
    )
    return out
