"""Compute dtype on the CPU: each path timed from a bfloat16 directory (computing in bfloat16 as stored,
and in the dtype lord_export chooses) against the same command on a float32 copy, side by side in one
run; plus the survey's stage times.

    python benchmarks/cpu_paths.py --model-dir $(bash ../shared/tools/get-smollm2.sh) \
        [--isa avx2] [--calib-samples 16 --calib-seqlen 256] [--eval-tokens 16384] [--json out.json]

Every path runs as users run it (``lord-export compress`` / ``eval`` in a subprocess, ``-q``). ``--isa
avx2`` caps oneDNN at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) so a CPU with AMX/AVX512-BF16 behaves like
one without bfloat16 units (where "auto" picks float32); without it the machine's own units decide.
Calibration and evaluation files: the standard-library split of the reference model (calib / eval).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def lord_export_cli(*args: str, env: dict) -> tuple[float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "lord_export.cli", *args, "-q"], capture_output=True, text=True, env=env
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"lord-export {args[0]} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return seconds, proc.stdout


def float32_copy(src: Path, dst: Path) -> Path:
    """``src`` with every floating-point tensor stored as float32 (config and tokenizer copied)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.is_file():
            shutil.copy(f, dst / f.name)
    for f in src.glob("*.safetensors"):
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(f).items()}
        save_file(state, dst / f.name, metadata={"format": "pt"})
    config = json.loads((dst / "config.json").read_text())
    config["torch_dtype"] = "float32"
    config.pop("dtype", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="a bfloat16 model directory (e.g. SmolLM2-135M)")
    ap.add_argument("--isa", choices=["native", "avx2"], default="native")
    ap.add_argument("--param-ratio", default="0.9")
    ap.add_argument("--calib-samples", default="16")
    ap.add_argument("--calib-seqlen", default="256")
    ap.add_argument("--eval-tokens", default="16384")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from lord_export.measure.reference import split_texts

    env = dict(os.environ)
    if args.isa == "avx2":
        env["ONEDNN_MAX_CPU_ISA"] = "AVX2"
    calib = [str(p) for p in split_texts("calib")][:40]
    held_out = [str(p) for p in split_texts("eval")][:40]
    src = Path(args.model_dir)
    tmp = Path(tempfile.mkdtemp(prefix="cpu-paths-"))
    f32 = float32_copy(src, tmp / "float32-copy")
    compress = ["--param-ratio", args.param_ratio, "--calib-samples", args.calib_samples, "--calib-seqlen",
                args.calib_seqlen, "--calib", *calib]  # fmt: skip
    runs = {  # name: (directory, --compute-dtype)
        "bf16 dir, computing in bfloat16 (as stored)": (src, "bfloat16"),
        "bf16 dir, auto compute dtype": (src, "auto"),
        "float32 copy": (f32, "auto"),
    }
    rows = []
    for name, (directory, compute) in runs.items():
        out = tmp / f"out-{len(rows)}"
        seconds, _ = lord_export_cli("compress", str(directory), str(out), *compress, "--compute-dtype", compute,
                                     env=env)  # fmt: skip
        report = json.loads((out / "report.json").read_text())
        eval_s, eval_out = lord_export_cli("eval", str(directory), "--eval", *held_out, "--eval-tokens",
                                           args.eval_tokens, "--compute-dtype", compute, env=env)  # fmt: skip
        rows.append(
            {
                "run": name,
                "compute_dtype": report["dtype"]["compute_dtype"],
                "reason": report["dtype"]["reason"],
                "compress_s": round(seconds, 1),
                "survey_s": report["budget"].get("survey_s"),
                "sensitivity_s": report["budget"].get("sensitivity_s"),
                "stages": {k: v for k, v in report["budget"].items() if k.startswith("survey_")},
                "eval_s": round(eval_s, 1),
                "perplexity": float(eval_out.split()[1]),
                "out": str(out),
            }
        )
        print(f"{name}: compress {seconds:.1f} s, eval {eval_s:.1f} s", file=sys.stderr, flush=True)
    base = rows[-1]
    head = f"{'run':46} {'compute':>9} {'compress s':>11} {'x f32':>6} {'survey s':>9} {'sens. s':>8}"
    print(head + f" {'eval s':>7} {'x f32':>6}")
    for r in rows:
        print(
            f"{r['run']:46} {r['compute_dtype']:>9} {r['compress_s']:11.1f} {r['compress_s'] / base['compress_s']:6.2f}"
            f" {r['survey_s']:9.1f} {r['sensitivity_s']:8.1f} {r['eval_s']:7.1f} {r['eval_s'] / base['eval_s']:6.2f}"
        )
    # the factors of the auto run against the float32 copy's: equal within bfloat16 rounding
    from lord_export.persist.checkpoint import CheckpointReader

    auto, ref = CheckpointReader(rows[1]["out"]), CheckpointReader(rows[2]["out"])
    worst = 0.0
    for name in ref.keys():
        if "lord_bottlenecks" in name or name in auto:
            a, b = auto.get(name).float(), ref.get(name).float()
            if a.shape == b.shape and a.numel():
                worst = max(worst, float((a - b).norm() / b.norm().clamp_min(1e-30)))
    print(f"stage times (auto run): {rows[1]['stages']}")
    print(f"largest relative difference of a stored tensor, auto run vs float32 copy: {worst:.2e} "
          f"(bfloat16 rounding is ~{torch.finfo(torch.bfloat16).eps:.1e} per element)")  # fmt: skip
    result = {
        "command": " ".join(sys.argv),
        "isa": args.isa,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "rows": [{k: v for k, v in r.items() if k != "out"} for r in rows],  # no temporary paths
        "max_relative_difference_auto_vs_float32": worst,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
