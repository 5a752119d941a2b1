"""``lord-export demo``: the whole mission on one model, in a few minutes on a laptop CPU.

Takes the shipped reference code model (or a model directory and data you name), calibrates it
once on its calibration split, compresses it with LoRD at a few rank reductions, evaluates held-out
perplexity, exports dense and every LoRD setting to ONNX (validated against PyTorch in ONNX
Runtime), and measures ONNX Runtime prefill latency of each against the dense model, interleaved on
the same inputs. Every number is computed on the run; nothing is stored.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from ..pipeline.evaluate import perplexity

DEFAULT_RANK_REDUCTIONS = (0.3, 0.5)  # "all": the best targets per parameter in the reference sweep
DEFAULT_TARGETS = ("all",)
DEFAULT_OUT = "lord-demo"
DEMO_SEQLEN = 256  # calibration/evaluation window of the demo (the reference model was trained on 256)
MARKER = "demo.json"


@dataclass
class DemoRow:
    setting: str
    rank_reduction: float
    params: int
    perplexity: float
    onnx_bytes: int
    bottleneck_matmuls: int
    ort_ms: float
    ort_spread_ms: float
    speedup: float
    ideal_speedup: float


@dataclass
class DemoSetup:
    """The demo's checked inputs."""

    out: Path
    src: Path
    reference: bool
    calib_paths: list
    eval_paths: list
    seqlen: int


def check_demo_inputs(
    out: str | Path,
    model_dir: str | Path | None,
    calib: Sequence[str | Path] | None,
    eval_data: Sequence[str | Path] | None,
    rank_reductions: Sequence[float],
    seqlen: int | None,
    latency_tokens: int,
    overwrite: bool,
) -> DemoSetup:
    """Everything checkable before loading a model; UsageError with what to change."""
    from ..calibration.data import resolve_seqlen
    from ..config import check_rank_reduction
    from ..persist.hf import check_model_dir, max_positions
    from .reference import reference_model_dir, split_texts

    if not rank_reductions:
        raise UsageError("give at least one rank reduction")
    for r in rank_reductions:
        check_rank_reduction(r)
    out = Path(out)
    if out.exists() and not overwrite and not (out / MARKER).is_file():
        raise UsageError(f"{out} exists and is not an earlier demo output (overwrite it, or choose another output)")
    if not out.absolute().parent.is_dir():
        raise UsageError(f"the parent directory of the demo output {str(out)!r} does not exist")
    reference = model_dir is None
    src = reference_model_dir() if reference else check_model_dir(model_dir)
    if not reference and (not calib or not eval_data):
        raise UsageError("with your own model directory, give calibration and evaluation data too")
    limit = max_positions(src)
    seqlen = resolve_seqlen(seqlen, limit, DEMO_SEQLEN)
    resolve_seqlen(latency_tokens, limit)
    calib_paths = list(calib) if calib else split_texts("calib")
    eval_paths = list(eval_data) if eval_data else split_texts("eval")
    return DemoSetup(out, src, reference, calib_paths, eval_paths, seqlen)


def run_demo(
    out: str | Path = DEFAULT_OUT,
    *,
    model_dir: str | Path | None = None,
    calib: Sequence[str | Path] | None = None,
    eval_data: Sequence[str | Path] | None = None,
    rank_reductions: Sequence[float] = DEFAULT_RANK_REDUCTIONS,
    targets: Sequence[str] = DEFAULT_TARGETS,
    calib_samples: int = 128,
    seqlen: int | None = None,
    eval_tokens: int = 65536,
    latency_tokens: int = 512,
    repeats: int = 10,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the demo (see module docstring); returns what it wrote to ``out``/demo.json.

    ``progress`` receives one line per step (and turns on progress bars); None keeps it quiet."""
    from ..calibration.data import CalibrationOptions, calibration_set, evaluation_windows, text_files
    from ..persist.hf import load_dense, load_tokenizer, pad_token_id
    from ..persist.io import atomic_output_dir, write_json

    setup = check_demo_inputs(out, model_dir, calib, eval_data, rank_reductions, seqlen, latency_tokens, overwrite)
    say = progress or (lambda msg: None)
    t_start = time.perf_counter()
    say(f"model {setup.src}")
    _warn_python_version(setup, eval_data, say)
    tokenizer = load_tokenizer(setup.src)
    dense = load_dense(setup.src, dtype=torch.float32)
    calib_set = calibration_set(
        tokenizer, setup.calib_paths, CalibrationOptions(samples=calib_samples, seqlen=setup.seqlen)
    )
    windows = evaluation_windows(tokenizer, setup.eval_paths, setup.seqlen, max_tokens=eval_tokens)
    models = _compress_settings(dense, calib_set, rank_reductions, targets, say, bars=progress is not None)
    ppl = {}
    for name, (_, model, _) in models.items():
        say(f"perplexity of {name} on {sum(len(w) - 1 for w in windows):,} held-out tokens")
        ppl[name] = perplexity(model, windows, batch_size=8, pad_id=pad_token_id(tokenizer)).perplexity

    with atomic_output_dir(setup.out, overwrite=True) as tmp:
        timed = _export_and_time(models, tmp, latency_tokens, repeats, say)
        rows = _rows(models, ppl, timed)
        result = {
            "model": str(setup.src),
            "reference_model": setup.reference,
            "calib_files": len(text_files(setup.calib_paths)),
            "calib_tokens": calib_set.tokens,
            "eval_files": len(text_files(setup.eval_paths)),
            "eval_tokens": sum(len(w) - 1 for w in windows),
            "targets": list(targets),
            "latency_tokens": latency_tokens,
            "repeats": repeats,
            "provider": timed["provider"],
            "machine": _machine(timed["provider"]),
            "threads": torch.get_num_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "seconds": round(time.perf_counter() - t_start, 1),
            "rows": [asdict(r) for r in rows],
        }
        write_json(tmp / MARKER, result)
        plotted = _plot(tmp / "demo.png", rows)
        result["plot"] = str(setup.out / "demo.png") if plotted else None
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    return result


def _warn_python_version(setup: DemoSetup, eval_data: Any, say: Callable[[str], None]) -> None:
    from .reference import trained_python

    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if setup.reference and not eval_data and trained_python() not in (None, here):
        say(
            f"warning: the reference model was trained on Python {trained_python()}'s standard library; on {here} "
            "files that moved may fall in another split, so some evaluation files may be familiar to it"
        )


def _compress_settings(dense, calib_set, rank_reductions, targets, say, *, bars: bool) -> dict[str, tuple]:
    """{setting name: (rank reduction, model, factorized groups)}, dense first."""
    from ..config import LordConfig
    from ..pipeline.compress import compress_settings

    say(f"calibrating and compressing on {calib_set.tokens:,} tokens")
    models: dict[str, tuple] = {"dense": (0.0, dense, 0)}
    configs = [LordConfig(rank_reduction=rr, targets=tuple(targets)) for rr in rank_reductions]
    for config, work, plan in compress_settings(dense, calib_set.batches(), configs, progress=bars):
        say(f"compressed at rank reduction {config.rank_reduction} ({config.calibration} calibration)")
        models[f"lord {config.rank_reduction:g}"] = (config.rank_reduction, work, len(plan.factorized_groups))
    return models


def _export_and_time(models: dict, tmp: Path, latency_tokens: int, repeats: int, say) -> dict[str, Any]:
    """Export every model to ONNX (validated), then time ORT prefill of all, interleaved."""
    from ..export.onnx import export_model_onnx, make_session
    from .flops import forward_flops
    from .runners import ort_runner
    from .timing import interleaved

    reports = {}
    for name, (_, model, groups) in models.items():
        say(f"exporting {name} to ONNX and validating it in ONNX Runtime")
        d = tmp / "onnx" / name.replace(" ", "-")
        d.mkdir(parents=True)
        reports[name] = export_model_onnx(copy.deepcopy(model), d, factorized_groups=groups, validate=True)
    say(f"ONNX Runtime latency, prefill of {latency_tokens} tokens, {repeats} interleaved runs")
    sessions = {name: make_session(r.path, prefer_cuda=True) for name, r in reports.items()}
    runners = {name: ort_runner(session) for name, session in sessions.items()}
    vocab = int(models["dense"][1].config.vocab_size)
    prompt = torch.randint(0, vocab, (1, latency_tokens), generator=torch.Generator().manual_seed(0))
    times = interleaved({k: (lambda r=r: r.prefill(prompt)) for k, r in runners.items()}, repeats, 2)
    flops = {name: forward_flops(m, input_ids=prompt) for name, (_, m, _) in models.items()}
    return {"reports": reports, "times": times, "flops": flops, "provider": sessions["dense"].get_providers()[0]}


def _rows(models: dict, ppl: dict[str, float], timed: dict[str, Any]) -> list[DemoRow]:
    from ..core.fingerprint import count_parameters
    from .timing import median_ms, spread_ms

    times, flops, reports = timed["times"], timed["flops"], timed["reports"]
    med = {k: median_ms(v) for k, v in times.items()}
    return [
        DemoRow(
            setting=name,
            rank_reduction=rr,
            params=count_parameters(model),
            perplexity=ppl[name],
            onnx_bytes=_size(Path(reports[name].path).parent),
            bottleneck_matmuls=reports[name].bottleneck_matmuls,
            ort_ms=med[name],
            ort_spread_ms=spread_ms(times[name]),
            speedup=med["dense"] / med[name],
            ideal_speedup=flops["dense"] / flops[name],
        )
        for name, (rr, model, _) in models.items()
    ]


def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.iterdir() if p.is_file())


def _machine(provider: str) -> str:
    from .timing import cpu_name

    return torch.cuda.get_device_name() if provider.startswith("CUDA") and torch.cuda.is_available() else cpu_name()


def _plot(path: Path, rows: list[DemoRow]) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r.params / 1e6 for r in rows], [r.perplexity for r in rows], "o-")
    for r in rows:
        a.annotate(r.setting, (r.params / 1e6, r.perplexity), textcoords="offset points", xytext=(5, 5))
    a.set_xlabel("parameters (M)")
    a.set_ylabel("held-out perplexity")
    a.set_title("quality vs size")
    names = [r.setting for r in rows]
    b.bar(names, [r.ort_ms for r in rows], color=["gray"] + ["tab:blue"] * (len(rows) - 1))
    b.set_ylabel("ONNX Runtime prefill latency (ms)")
    b.set_title("latency (median)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def format_demo(result: dict[str, Any]) -> str:
    """The table the demo prints."""
    lines = [
        f"{'setting':10} {'params':>10} {'fewer':>6} {'perplexity':>10} {'ONNX MB':>8} "
        f"{'ORT ms':>8} {'speed-up':>8} {'ideal':>6}",
    ]
    dense = result["rows"][0]["params"]
    for r in result["rows"]:
        lines.append(
            f"{r['setting']:10} {r['params']:10,d} {1 - r['params'] / dense:6.1%} {r['perplexity']:10.3f} "
            f"{r['onnx_bytes'] / 1e6:8.1f} {r['ort_ms']:8.2f} {r['speedup']:8.2f} {r['ideal_speedup']:6.2f}"
        )
    lines.append(
        f"perplexity on {result['eval_tokens']:,} held-out tokens ({result['eval_files']} files); calibration "
        f"{result['calib_tokens']:,} tokens; ORT {result['provider']} on {result['machine']}, prefill of "
        f"{result['latency_tokens']} tokens, median of {result['repeats']} interleaved runs; ideal = FLOP ratio"
    )
    return "\n".join(lines)
