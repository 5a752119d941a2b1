"""Quality of each stage of the compression recipe, per model and whole-model parameter ratio, run as
users run it: ``lord-export compress MODEL_DIR OUT --calib … --param-ratio P [flags]`` then
``lord-export eval OUT --eval HELD_OUT --eval-tokens N``, in subprocesses.

    python benchmarks/quality_recipes.py --model smollm2=$(bash ../shared/tools/get-smollm2.sh) \
        [--model reference] [--model stories260k] [--ratios 0.9,0.8,0.7] [--rows uniform,fisher,...] \
        [--calib-samples 64 --calib-seqlen 512] [--calib-sampling spread|sequential] [--eval-tokens 16384] \
        [--finetune-steps 50] [--json out.json]

Rows (each a set of ``compress`` flags; the parameter ratio and calibration are the same for all):

* ``uniform`` — one rank reduction for every group (shared bottlenecks), the closed form per matrix;
* ``fisher`` — the Fisher allocation, the closed form per matrix (lord_export 0.1's recipe);
* ``weighted`` — + output-Fisher weighting of each group's closed form;
* ``auto`` — ``weighted`` + adaptive grouping (a group keeps its shared bottleneck or is split per
  member, whichever the survey predicts loses less at the same size);
* ``compensating`` — ``auto`` + compensating calibration;
* ``refined`` — ``auto`` + block refinement;
* ``finetuned`` — ``auto`` + the end-to-end fine-tune stage (``--finetune-steps``);
* ``default`` — no flags: what ``lord-export compress … --param-ratio P`` does.

Models: ``smollm2=DIR`` (and any ``name=DIR`` on standard-library code), ``reference`` (the shipped
reference code model; both on the reference model's standard-library split: calibration files /
evaluation files), ``stories260k`` (../shared/data; TinyStories: the first stories to calibrate,
the last 1,000 to evaluate). Every compression holds out the default share of its calibration blocks
(the report's held-out stage perplexities); the table's perplexity is on the evaluation files.
Results are merged into ``--json`` by (model, row, ratio, calibration sampling), so rows can be measured
in several runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STORIES = ROOT.parent / "shared" / "data"

FIXED = ["--grouping", "shared", "--refine", "none"]
ROWS = {
    "uniform": ["--allocation", "uniform", "--output-weighting", "none", *FIXED],
    "fisher": ["--allocation", "fisher", "--output-weighting", "none", *FIXED],
    "weighted": ["--allocation", "fisher", "--output-weighting", "fisher", *FIXED],
    "auto": ["--allocation", "fisher", "--output-weighting", "fisher", "--grouping", "auto", "--refine", "none"],
    "compensating": ["--grouping", "auto", "--calibration", "compensating", "--refine", "none"],
    "refined": ["--grouping", "auto", "--refine", "block"],
    "finetuned": [],  # the default recipe (allocation, closed form, block refinement) + --finetune-steps
    "default": [],  # since refine=auto: the same as "refined"
}

#: What a row records of each refined block (report.json's ``timings.refinement``).
REFINEMENT_KEYS = (
    "block", "held_out_error_before", "held_out_error_after", "held_out_own_error", "steps", "lr", "rate_cuts",
    "improved",
)  # fmt: skip


def cli(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "lord_export.cli", *args, "-q"], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"lord-export {' '.join(args[:3])} … failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return time.perf_counter() - t0, proc


def model_data(name: str, value: str | None, tmp: Path) -> tuple[Path, list[str], list[str], list[str]]:
    """(model directory, calibration paths, evaluation paths, extra flags) of a ``--model`` entry."""
    from lord_export.measure.reference import reference_model_dir, split_texts

    if name == "stories260k":
        text = (STORIES / "text" / "tinystories_2MiB.txt").read_text(encoding="utf-8")
        stories = [s for s in text.split("<|endoftext|>") if s.strip()]
        calib, held = tmp / "stories-calib.txt", tmp / "stories-eval.txt"
        calib.write_text("<|endoftext|>".join(stories[:-1000]), encoding="utf-8")
        held.write_text("<|endoftext|>".join(stories[-1000:]), encoding="utf-8")
        return STORIES / "stories260K-hf", [str(calib)], [str(held)], ["--separator", "<|endoftext|>"]
    calib = [str(p) for p in split_texts("calib")]
    held = [str(p) for p in split_texts("eval")]
    return Path(value) if value else reference_model_dir(), calib, held, []


def run_row(model_dir, calib, held, extra, ratio, row, args, tmp) -> dict:
    tmp.mkdir(parents=True, exist_ok=True)
    out = tmp / f"{row}-{ratio}"
    flags = ["--param-ratio", str(ratio), "--calib", *calib, "--calib-samples", str(args.calib_samples)]
    flags += ["--calib-seqlen", str(args.calib_seqlen), "--calib-sampling", args.calib_sampling, *extra, *ROWS[row]]
    if row == "finetuned":
        flags += ["--finetune-steps", str(args.finetune_steps)]
    flags += args.extra.split()
    seconds, _ = cli("compress", str(model_dir), str(out), *flags, "--overwrite")
    report = json.loads((out / "report.json").read_text())
    ppl = evaluate(out, held, extra, args, tmp / f"{row}-{ratio}.json")
    timings = report.get("timings", {})
    return {
        "row": row,
        "lord_export_version": report.get("lord_export_version"),
        "param_ratio": ratio,
        "sampling": args.calib_sampling,
        "params_ratio": report["params_ratio"],
        "perplexity": ppl,
        "compress_seconds": round(seconds, 1),
        "stage_seconds": timings.get("stages", {}),
        "held_out_stages": report.get("stages"),
        # per refined block: held-out error before / after refinement, and its own error (dense inputs)
        "refinement": [{k: b.get(k) for k in REFINEMENT_KEYS} for b in timings.get("refinement", [])],
        "degenerate": (report.get("sanity") or {}).get("degenerate"),
        "flags": ROWS[row]
        + (["--finetune-steps", str(args.finetune_steps)] if row == "finetuned" else [])
        + args.extra.split(),
    }


def evaluate(model_dir, held, extra, args, json_path) -> float:
    cli("eval", str(model_dir), "--eval", *held, "--eval-tokens", str(args.eval_tokens), *extra,
        "--json", str(json_path))  # fmt: skip
    return json.loads(json_path.read_text())["perplexity"]


def sampling(row: dict) -> str:
    """How a row's calibration text was chosen (rows measured before ``--calib-sampling`` existed: sequential)."""
    return row.get("sampling", "sequential")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", required=True, help="reference, stories260k, or NAME=DIR")
    ap.add_argument("--ratios", default="0.9,0.8,0.7")
    ap.add_argument("--rows", default="uniform,fisher,weighted,auto,compensating,refined,finetuned,default")
    ap.add_argument("--calib-samples", type=int, default=64)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--calib-sampling", choices=("spread", "sequential"), default="spread")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--finetune-steps", type=int, default=50)
    ap.add_argument(
        "--extra", default="", help="flags added to every row's compress command, for experiments (use another --json)"
    )
    ap.add_argument("--json", default="benchmarks/results/quality_recipes.json")
    args = ap.parse_args()
    rows = args.rows.split(",")
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise SystemExit(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    ratios = [float(r) for r in args.ratios.split(",")]
    results: dict = {
        "command": " ".join([Path(sys.argv[0]).name, *(re.sub(r"=.*", "=DIR", a) for a in sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "date": time.strftime("%Y-%m-%d"),
        "models": {},
    }
    previous = json.loads(Path(args.json).read_text()) if Path(args.json).exists() else {}
    results["models"] = previous.get("models", {})  # rows measured before are kept unless measured again
    tmp = Path(tempfile.mkdtemp(prefix="quality-recipes-"))
    for entry in args.model:
        name, _, value = entry.partition("=")
        model_dir, calib, held, extra = model_data(name, value or None, tmp)
        dense = evaluate(model_dir, held, extra, args, tmp / f"{name}-dense.json")
        print(f"\n{name}: dense perplexity {dense:.4f} on {args.eval_tokens:,} held-out tokens", flush=True)
        print(f"{'ratio':>5} {'row':<13} {'params':>7} {'ppl':>9} {'increase':>9} {'seconds':>8}  stages", flush=True)
        table = [
            r
            for r in results["models"].get(name, {}).get("rows", [])
            if not (r["row"] in rows and r["param_ratio"] in ratios and sampling(r) == args.calib_sampling)
        ]
        for ratio in ratios:
            for row in rows:
                r = run_row(model_dir, calib, held, extra, ratio, row, args, tmp / name)
                r["increase"] = r["perplexity"] / dense - 1
                table.append(r)
                stages = ", ".join(f"{k} {v:.0f}s" for k, v in (r["stage_seconds"] or {}).items())
                print(f"{ratio:>5} {row:<13} {r['params_ratio']:>7.4f} {r['perplexity']:>9.4f} "
                      f"{100 * r['increase']:>+8.1f}% {r['compress_seconds']:>8.0f}  {stages}", flush=True)  # fmt: skip
                results["models"][name] = {
                    "model": name,
                    "dense_perplexity": dense,
                    "eval_tokens": args.eval_tokens,
                    "calibration": f"{args.calib_samples} x {args.calib_seqlen} tokens",
                    "rows": sorted(table, key=lambda r: (sampling(r), -r["param_ratio"], list(ROWS).index(r["row"]))),
                }
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
