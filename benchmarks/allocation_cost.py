"""What rank allocation adds to compression time: uniform LoRD at R vs an allocation at its size.

    python benchmarks/allocation_cost.py reference [--rank-reduction 0.5] [--allocation fisher]
        [--calibrations independent,sequential] [--repeats 2]
    python benchmarks/allocation_cost.py smollm2 --model-dir "$(bash ../shared/tools/get-smollm2.sh)"
    python benchmarks/allocation_cost.py smollm2 --model-dir ... --streamed   # the model-directory path

Same models and calibration data as ``quality_sweeps.py``. For each calibration mode, interleaved
``--repeats`` times on fresh copies of the dense model: ``lord_export.pipeline.compress`` with
``rank_reduction=R`` (uniform), then with ``param_ratio`` = the ratio uniform reached and
``allocation`` (the survey — calibration of the dense model, one decomposition per group — and the
sensitivities included). Times are the reports' ``compress_s`` (everything from the call to the
swapped model); the survey's own split (``survey_s``, ``sensitivity_s``) comes from the budget
report. Prints a table and writes ``benchmarks/results/allocation_cost_<model>.json``.

``--streamed`` times what ``lord-export compress MODEL_DIR OUT`` runs instead: the model read block
by block from its directory (``compress_model_dir``), written to a temporary output; the budget's
survey is then a pass of its own (:func:`lord_export.pipeline.survey.streamed_survey`). Same calibration
files and sizes as the in-memory runs; times are the reports' ``compress_s`` (loading the dense
blocks, calibration, factorization and writing included).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from quality_sweeps import load_setting  # benchmarks/ is the script's directory

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", choices=["stories260k", "reference", "smollm2"])
    ap.add_argument("--model-dir", default=None)
    ap.add_argument("--rank-reduction", type=float, default=0.5)
    ap.add_argument("--allocation", default="fisher")
    ap.add_argument("--calibrations", default="independent,sequential")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--streamed", action="store_true", help="time compress_model_dir (the CLI's path)")
    ap.add_argument(
        "--calib-samples",
        type=int,
        default=None,
        help="calibration blocks from ALL calibration-split files instead of quality_sweeps' set "
        "(lord-export compress's default: 128 blocks of 512 tokens)",
    )
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    import lord_export as le
    from lord_export.persist.hf import load_dense

    torch.manual_seed(0)
    src, calib, _, _ = load_setting(args.model, args.model_dir, 1)
    options = None
    if args.calib_samples is not None:
        from lord_export.calibration.data import CalibrationOptions, calibration_set
        from lord_export.measure.reference import split_texts
        from lord_export.persist.hf import load_tokenizer

        options = CalibrationOptions(samples=args.calib_samples, seqlen=args.calib_seqlen)
        calib = calibration_set(load_tokenizer(src), split_texts("calib"), options).batches()
    calib = list(calib)
    if args.streamed:
        compress = streamed_compressor(args.model, src, options)
    else:
        dense = load_dense(src, dtype=torch.float32)

        def compress(**settings):
            return le.compress(copy.deepcopy(dense), calib, **settings).report

    rows = []
    for mode in [c.strip() for c in args.calibrations.split(",")]:
        uniform_s, alloc_s, survey_s, sensitivity_s, ratio = [], [], [], [], None
        for _ in range(args.repeats):
            report = compress(rank_reduction=args.rank_reduction, calibration=mode)
            uniform_s.append(report["timings"]["compress_s"])
            ratio = report["params_ratio"]
            report = compress(param_ratio=ratio, allocation=args.allocation, calibration=mode)
            alloc_s.append(report["timings"]["compress_s"])
            survey_s.append(report["budget"]["survey_s"])
            sensitivity_s.append(report["budget"]["sensitivity_s"])
        u, a = statistics.median(uniform_s), statistics.median(alloc_s)
        row = {
            "calibration": mode,
            "param_ratio": round(ratio, 4),
            "uniform_s": uniform_s,
            "allocation_s": alloc_s,
            "survey_s": survey_s,
            "sensitivity_s": sensitivity_s,
            "added": round(a / u - 1, 4),
        }
        rows.append(row)
        print(
            f"{mode:12} P={ratio:.4f}  uniform {u:7.1f} s   {args.allocation} {a:7.1f} s "
            f"(survey {statistics.median(survey_s):.1f} s, sensitivity {statistics.median(sensitivity_s):.1f} s)"
            f"   added {a / u - 1:+.1%}"
        )
    suffix = ("_streamed" if args.streamed else "") + (f"_{args.calib_samples}x{args.calib_seqlen}" if options else "")
    out = Path(args.json or ROOT / "benchmarks" / "results" / f"allocation_cost_{args.model}{suffix}.json")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "model": args.model,
        "rank_reduction": args.rank_reduction,
        "allocation": args.allocation,
        "calibration_batches": len(calib),
        "calibration_tokens": sum(int(b["attention_mask"].sum()) for b in calib),
        "path": "compress_model_dir (block by block from the directory)" if args.streamed else "compress (in memory)",
        "rows": rows,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def streamed_compressor(model: str, src: Path, options=None):
    """``compress(**settings) -> report``: ``compress_model_dir`` on ``src`` with the calibration files
    and sizes of :func:`quality_sweeps.load_setting` (or all calibration-split files with ``options``),
    into a temporary directory (float32 blocks)."""
    import tempfile

    from lord_export.calibration.data import CalibrationOptions
    from lord_export.config import LordConfig
    from lord_export.measure.reference import split_texts
    from lord_export.pipeline.model_dir import compress_model_dir

    if model == "stories260k":
        raise SystemExit("--streamed needs a model whose calibration is a list of files (reference, smollm2)")
    if options is None:
        files = split_texts("calib")[:20] if model == "smollm2" else split_texts("calib")
        samples, batch = (16, 4) if model == "smollm2" else (128, 16)
        options = CalibrationOptions(samples=samples, seqlen=256, batch_size=batch)
    else:
        files = split_texts("calib")

    def compress(**settings):
        with tempfile.TemporaryDirectory() as tmp:
            return compress_model_dir(
                src, Path(tmp) / "out", files, LordConfig(**settings), data=options, dtype=torch.float32, device="cpu"
            )

    return compress


if __name__ == "__main__":
    main()
