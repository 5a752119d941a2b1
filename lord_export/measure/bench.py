"""``lord-export bench``: latency of a dense model and its LoRD twin, side by side, on each backend.

For every backend (:mod:`.backends`): prefill latency at each token count (batch 1) and
token-by-token decode latency (per token, KV cache, after a prompt of ``decode_context`` tokens).
Dense and LoRD runs are interleaved after warm-up, on the same inputs, so machine noise hits both
alike; the median and the spread (max − min) are reported. The ideal speed-up is the FLOP ratio of
the two eager models (:mod:`.flops`), and measured/ideal is the figure of merit.
"""

from __future__ import annotations

import copy
import logging
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import UsageError
from .backends import Skip, make_runners, parse_backends
from .flops import decode_step_flops, forward_flops
from .timing import cpu_name, interleaved, median_ms, spread_ms

log = logging.getLogger(__name__)


@dataclass
class Row:
    backend: str
    mode: str  # "prefill" or "decode"
    tokens: int  # prefill: prompt tokens; decode: context length before the first decoded token
    dense_ms: float
    lord_ms: float
    dense_spread_ms: float
    lord_spread_ms: float
    ideal_speedup: float
    runs_on: str = ""  # device/provider and dtype of this backend's runs

    @property
    def speedup(self) -> float:
        return self.dense_ms / self.lord_ms

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["speedup"] = self.speedup
        d["measured_over_ideal"] = self.speedup / self.ideal_speedup
        return d


@dataclass
class BenchResult:
    rows: list[Row] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "info": self.info,
            "rows": [r.to_dict() for r in self.rows],
            "skipped": self.skipped,
            "failed": self.failed,
        }


def check_bench_args(
    dense_dir: str | Path,
    lord_dir: str | Path,
    *,
    tokens: Sequence[int],
    decode_tokens: int,
    decode_context: int,
    repeats: int,
    warmup: int,
) -> tuple[Path, Path]:
    """Everything checkable before loading a model; returns the two directories."""
    from ..persist.hf import check_model_dir, max_positions
    from ..persist.io import PLAN_FILE

    dense_dir, lord_dir = check_model_dir(dense_dir), check_model_dir(lord_dir)
    if not (lord_dir / PLAN_FILE).is_file():
        raise UsageError(f"{lord_dir} is not a LoRD directory (no {PLAN_FILE}); make one with 'lord-export compress'")
    if repeats < 1 or warmup < 0 or decode_tokens < 0 or not tokens or min(tokens) < 1:
        raise UsageError("repeats must be >= 1, warm-up >= 0, decode tokens >= 0 and token counts >= 1")
    limit = max_positions(dense_dir)
    if limit is not None and max(max(tokens), decode_context + decode_tokens) > limit:
        raise UsageError(
            f"prefill of {max(tokens)} tokens or decode context {decode_context} + {decode_tokens} decoded tokens "
            f"exceed the model's {limit} positions; ask for fewer tokens"
        )
    return dense_dir, lord_dir


def run_bench(
    dense_dir: str | Path,
    lord_dir: str | Path,
    backends: Sequence[str],
    *,
    tokens: Sequence[int] = (128, 512),
    decode_tokens: int = 32,
    decode_context: int = 128,
    repeats: int = 5,
    warmup: int = 2,
    device: str | None = None,
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    seed: int = 0,
    progress: Callable[[str], None] | None = None,
    trust_remote_code: bool = False,
) -> BenchResult:
    """Measure dense vs LoRD on each backend (see module docstring); unavailable backends are skipped."""
    from ..device import resolve_device
    from ..persist.hf import load_dense
    from ..persist.io import load

    say = progress or (lambda msg: None)
    backends = parse_backends(backends)
    dense_dir, lord_dir = check_bench_args(
        dense_dir,
        lord_dir,
        tokens=tokens,
        decode_tokens=decode_tokens,
        decode_context=decode_context,
        repeats=repeats,
        warmup=warmup,
    )
    device = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)

    say(f"loading {dense_dir} and {lord_dir}")
    dense = load_dense(dense_dir, dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    check_same_base(dense, lord_dir, dense_dir)
    lord = (
        load(lord_dir, trust_remote_code=trust_remote_code).to(torch.float32).eval()
    )  # FLOPs are counted in float32; runs use ``dtype``
    gen = torch.Generator().manual_seed(seed)
    vocab = int(dense.config.vocab_size)
    prefill_ids = {n: torch.randint(0, vocab, (1, n), generator=gen) for n in tokens}
    prompt = torch.randint(0, vocab, (1, decode_context), generator=gen)

    say("counting FLOPs")
    ideal = {n: forward_flops(dense, input_ids=i) / forward_flops(lord, input_ids=i) for n, i in prefill_ids.items()}
    ideal["decode"] = decode_step_flops(dense, prompt) / decode_step_flops(lord, prompt) if decode_tokens else 0.0
    dense, lord = dense.to(device, dtype), lord.to(device, dtype)

    result = BenchResult(info=_bench_info(dense_dir, lord_dir, device, dtype, dense, lord))
    result.info.update(
        tokens=list(tokens),
        decode_tokens=decode_tokens,
        decode_context=decode_context,
        repeats=repeats,
        warmup=warmup,
    )
    ctx = {
        "dense": dense,
        "lord": lord,
        "lord_dir": lord_dir,
        "device": device,
        "dtype": dtype,
        "threads": threads,
        "probe": prompt[:, : min(16, decode_context)],
        "workdir": Path(tempfile.mkdtemp(prefix="lord-bench-")),
    }
    try:
        for backend in backends:
            _run_backend(backend, ctx, result, prefill_ids, prompt, ideal, say)
    finally:
        shutil.rmtree(ctx["workdir"], ignore_errors=True)
    return result


def _bench_info(dense_dir, lord_dir, device: str, dtype: torch.dtype, dense, lord) -> dict[str, Any]:
    """Where and what a bench run measured (the machine, versions, model sizes)."""
    return {
        "dense_dir": str(dense_dir),
        "lord_dir": str(lord_dir),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "device": device,
        "cpu": cpu_name(),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "threads": torch.get_num_threads(),
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "params_dense": sum(p.numel() for p in dense.parameters()),
        "params_lord": sum(p.numel() for p in lord.parameters()),
    }


def _run_backend(backend, ctx, result, prefill_ids, prompt, ideal, say) -> None:
    """Measure one backend into ``result``; a skip or a failure is recorded, never raised."""
    say(f"{backend}: preparing")
    try:
        _measure_backend(backend, ctx, result, prefill_ids, prompt, ideal, say)
    except Skip as why:
        result.skipped[backend] = str(why)
        say(f"{backend}: skipped ({why})")
    except Exception as err:  # one broken backend must not lose the others' measurements
        log.debug("backend %s failed", backend, exc_info=True)
        result.failed[backend] = describe_failure(err)
        say(f"{backend}: FAILED ({result.failed[backend]})")


def _measure_backend(backend, ctx, result, prefill_ids, prompt, ideal, say) -> None:
    runners = make_runners(backend, ctx)
    info = result.info
    for n, ids in prefill_ids.items():
        say(f"{backend}: prefill {n} tokens")
        times = interleaved(
            {k: (lambda r=r, ids=ids: r.prefill(ids)) for k, r in runners.items()}, info["repeats"], info["warmup"]
        )
        result.rows.append(_row(backend, "prefill", n, times, ideal[n], runners["lord"].runs_on))
    steps = info["decode_tokens"]
    if not steps:
        return
    if any(r.decode is None for r in runners.values()):
        result.skipped[f"{backend} decode"] = next(r.decode_skip for r in runners.values() if r.decode is None)
        return
    say(f"{backend}: decode {steps} tokens after {prompt.shape[1]}")
    times = interleaved(
        {k: (lambda r=r: float(r.decode(prompt, steps))) for k, r in runners.items()}, info["repeats"], info["warmup"]
    )
    result.rows.append(_row(backend, "decode", prompt.shape[1], times, ideal["decode"], runners["lord"].runs_on))


def _row(backend: str, mode: str, n: int, times: dict[str, list[float]], ideal: float, runs_on: str) -> Row:
    med = {k: median_ms(v) for k, v in times.items()}
    spread = {k: spread_ms(v) for k, v in times.items()}
    return Row(backend, mode, n, med["dense"], med["lord"], spread["dense"], spread["lord"], ideal, runs_on)


def format_table(result: BenchResult) -> str:
    """The human-readable table of a bench run."""
    i = result.info
    machine = i["cpu"] + (f" + {i['gpu']}" if i.get("gpu") else "")
    lines = [
        f"dense {i['params_dense']:,} params vs LoRD {i['params_lord']:,} params on {machine} "
        f"({i['threads']} torch threads); median of {i['repeats']} after {i['warmup']} warm-up, spread = max - min",
        f"{'backend':9} {'mode':10} {'tokens':>6} {'dense ms':>10} {'lord ms':>10} {'spread d/l ms':>15} "
        f"{'speed-up':>8} {'ideal':>6} {'meas/ideal':>10}  runs on",
    ]
    for r in result.rows:
        label = "decode/tok" if r.mode == "decode" else r.mode
        lines.append(
            f"{r.backend:9} {label:10} {r.tokens:6d} {r.dense_ms:10.2f} {r.lord_ms:10.2f} "
            f"{r.dense_spread_ms:7.2f}/{r.lord_spread_ms:<7.2f} {r.speedup:8.2f} {r.ideal_speedup:6.2f} "
            f"{r.speedup / r.ideal_speedup:10.2f}  {r.runs_on}"
        )
    if i.get("decode_tokens"):
        lines.append(
            f"decode rows: ms per token over {i['decode_tokens']} tokens after a {i['decode_context']}-token prompt"
        )
    for name, why in result.skipped.items():
        lines.append(f"skipped {name}: {why}")
    for name, why in result.failed.items():
        lines.append(f"FAILED {name}: {why}")
    return "\n".join(lines)


def describe_failure(err: BaseException) -> str:
    """One line for a failed backend: the error, and the root cause with where it was raised.

    Wrappers such as dynamo's ``BackendCompilerFailed`` put only ``backend=... raised:`` on their
    first line; the cause is what a user needs to see."""
    root = err
    while (inner := root.__cause__ or getattr(root, "inner_exception", None)) is not None and inner is not root:
        root = inner
    line = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if root is not err:
        tb = root.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
        line += f" <- {type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''}{where}"
    return line


def check_same_base(dense: torch.nn.Module, lord_dir: str | Path, dense_dir: str | Path) -> None:
    """Refuse a LoRD directory that was not compressed from the dense model in ``dense_dir``.

    Compares the plan's fingerprint of its base model and every tensor the LoRD directory keeps
    unchanged (embeddings, norms, layers left dense).
    """
    from ..core.experts import fused_experts, unfuse_experts
    from ..core.fingerprint import fingerprint_mismatch
    from ..errors import PlanError
    from ..persist.checkpoint import CheckpointReader
    from ..persist.io import read_plan

    if next(fused_experts(dense), None) is not None:  # compressing unfused them: compare an unfused copy,
        dense = copy.deepcopy(dense)  # time the model as users run it (transformers' own experts kernels)
        unfuse_experts(dense)
    lord_dir = Path(lord_dir)
    plan = read_plan(lord_dir, with_tensors=False)
    where = f"{lord_dir} was not compressed from {dense_dir}"
    why = fingerprint_mismatch(plan.base_model, dense)
    if why:
        raise PlanError(f"{where}: {why}")
    state = dense.state_dict()
    reader = CheckpointReader(lord_dir)
    for key in reader.keys():
        if key in state:
            mine = reader.get(key)
            if tuple(mine.shape) == tuple(state[key].shape) and not torch.allclose(
                mine.to(torch.float32), state[key].to(torch.float32), rtol=1e-2, atol=1e-3
            ):
                raise PlanError(f"{where}: tensor {key} differs")
