"""Latency of a dense model and its LoRD twin, side by side in one run, on each backend present.

Backends: ``eager`` (PyTorch), ``compile`` (inductor for dense; ``backend="lord"`` with the plan for
LoRD, i.e. the graph pass then inductor), ``ort-cpu`` / ``ort-cuda`` (ONNX Runtime on lord_export's
ONNX exports), ``tensorrt`` (``torch.compile(backend="torch_tensorrt")``, prefill only). For every
backend: prefill latency at each token count (batch 1) and token-by-token decode latency (per
token, KV cache, after a prompt of ``decode_context`` tokens). Dense and LoRD runs are interleaved
after warm-up, on the same inputs, so machine noise hits both alike; the median and the spread
(max − min) are reported. The ideal speed-up is the FLOP ratio of the two eager models (eager
attention so that attention counts), and measured/ideal is the figure of merit.
"""

from __future__ import annotations

import copy
import logging
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from .errors import UsageError

log = logging.getLogger(__name__)

BACKENDS = ("eager", "compile", "ort-cpu", "ort-cuda", "tensorrt")


class Skip(Exception):
    """A backend (or one mode of it) cannot run on this machine; the message says why."""


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


def parse_backends(names: Sequence[str]) -> list[str]:
    """Validate backend names (``all`` = every backend); a clear error for unknown ones."""
    out: list[str] = []
    for name in names:
        for part in name.split(","):
            part = part.strip()
            if not part:
                continue
            if part == "all":
                out.extend(BACKENDS)
            elif part in BACKENDS:
                out.append(part)
            else:
                raise UsageError(f"unknown backend {part!r}; choose from {', '.join(BACKENDS)} or 'all'")
    if not out:
        raise UsageError("no backend given")
    return list(dict.fromkeys(out))


def check_same_base(dense: nn.Module, lord_dir: Path, dense_dir: Path) -> None:
    """Refuse a LoRD directory that was not compressed from the dense model in ``dense_dir``.

    Compares the plan's fingerprint of its base model (class, linear shapes, parameter count) and
    every tensor the LoRD directory keeps unchanged (embeddings, norms, layers left dense).
    """
    from .io import WEIGHTS_FILE, read_plan
    from .plan import describe_model

    plan = read_plan(lord_dir, with_tensors=False)
    base, here = plan.base_model, describe_model(dense)
    where = f"{lord_dir} was not compressed from {dense_dir}"
    for key in ("class", "num_parameters"):
        if base.get(key) is not None and base.get(key) != here[key]:
            raise UsageError(f"{where}: its base model has {key} {base[key]!r}, {dense_dir} has {here[key]!r}")
    for name, shape in (base.get("linears") or {}).items():
        if here["linears"].get(name) != list(shape):
            raise UsageError(
                f"{where}: its base linear {name} is {shape}, in {dense_dir} it is {here['linears'].get(name)}"
            )
    state = dense.state_dict()
    with safe_open(str(lord_dir / WEIGHTS_FILE), framework="pt") as f:
        for key in f.keys():
            if key in state and tuple(f.get_slice(key).get_shape()) == tuple(state[key].shape):
                mine = f.get_tensor(key).to(torch.float32)
                if not torch.allclose(mine, state[key].to(torch.float32), rtol=1e-2, atol=1e-3):
                    raise UsageError(f"{where}: tensor {key} differs")


def forward_flops(model: nn.Module, **kwargs: Any) -> int:
    """FLOPs of one forward, attention included: counted with eager attention (bmm), because
    FlopCounterMode does not see the fused flash-attention kernels that sdpa uses."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model.config
    saved = cfg._attn_implementation
    cfg._attn_implementation = "eager"
    try:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            model(**kwargs)
    finally:
        cfg._attn_implementation = saved
    return counter.get_total_flops()


def decode_step_flops(model: nn.Module, prompt: torch.Tensor) -> int:
    """FLOPs of one decode step after ``prompt`` (KV cache of the prompt's length)."""
    with torch.no_grad():
        past = model(input_ids=prompt, use_cache=True).past_key_values
    return forward_flops(model, input_ids=prompt[:, -1:], past_key_values=past, use_cache=True)


# --- runners: (prefill(ids) -> None, decode(prompt, steps) -> seconds per token) -----------------------------------


@dataclass
class Runner:
    prefill: Callable[[torch.Tensor], Any]
    decode: Callable[[torch.Tensor, int], float] | None
    decode_skip: str = ""
    runs_on: str = ""


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def torch_runner(model: Callable, device: str, dtype: torch.dtype) -> Runner:
    """A transformers causal LM (eager or compiled) on ``device``, running in ``dtype``."""
    label = str(dtype).replace("torch.", "")

    def prefill(ids: torch.Tensor) -> None:
        with torch.no_grad():
            model(input_ids=ids.to(device), use_cache=False)
        _sync(device)

    def decode(prompt: torch.Tensor, steps: int) -> float:
        with torch.no_grad():
            out = model(input_ids=prompt.to(device), use_cache=True)
            past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                out = model(input_ids=nxt, past_key_values=past, use_cache=True)
                past, nxt = out.past_key_values, out.logits[:, -1:].argmax(-1)
            _sync(device)
        return (time.perf_counter() - t) / steps

    return Runner(prefill, decode, runs_on=f"torch {device} {label}")


def ort_runner(session: Any) -> Runner:
    """An ONNX Runtime session of a causal LM; with KV-cache inputs (optimum's layout) it also decodes.

    Inputs and outputs go through numpy (host memory), also on the CUDA provider: each decode step
    copies the KV cache out and back in, the same for dense and LoRD, which pulls CUDA decode
    speed-ups toward 1 (I/O binding would keep it on the device)."""
    import numpy as np

    inputs = {i.name: i for i in session.get_inputs()}
    past_names = [n for n in inputs if n.startswith("past_key_values.")]
    outputs = [o.name for o in session.get_outputs()]

    def empty_past() -> dict[str, Any]:
        feeds = {}
        for name in past_names:
            shape = [d if isinstance(d, int) else 1 for d in inputs[name].shape]
            shape[2] = 0  # (batch, kv heads, past length, head dim)
            dtype = np.float16 if inputs[name].type == "tensor(float16)" else np.float32
            feeds[name] = np.zeros(shape, dtype=dtype)
        return feeds

    def run(ids: Any, past: dict[str, Any], past_len: int) -> tuple[Any, dict[str, Any]]:
        n = ids.shape[1]
        feeds = {"input_ids": ids}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = np.ones((1, past_len + n), dtype=np.int64)
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(past_len, past_len + n, dtype=np.int64)[None]
        feeds.update(past)
        result = dict(zip(outputs, session.run(None, feeds), strict=True))
        present = {
            n.replace("present.", "past_key_values.", 1): v for n, v in result.items() if n.startswith("present.")
        }
        return result[outputs[0]], present

    def prefill(ids: torch.Tensor) -> None:
        run(ids.numpy(), empty_past(), 0)

    def decode(prompt: torch.Tensor, steps: int) -> float:
        logits, past = run(prompt.numpy(), empty_past(), 0)
        length = prompt.shape[1]
        t = time.perf_counter()
        for _ in range(steps):
            nxt = logits[:, -1:].argmax(-1).astype(np.int64)
            logits, past = run(nxt, past, length)
            length += 1
        return (time.perf_counter() - t) / steps

    runs_on = f"ORT {session.get_providers()[0].replace('ExecutionProvider', '')} float32"
    if not past_names:
        return Runner(
            prefill, None, "this ONNX has no KV-cache inputs (install lord_export[optimum] for them)", runs_on
        )
    return Runner(prefill, decode, runs_on=runs_on)


# --- backends: each returns {"dense": Runner, "lord": Runner} or raises Skip ---------------------------------------


def _backend_eager(ctx: dict) -> dict[str, Runner]:
    return {name: torch_runner(ctx[name], ctx["device"], ctx["dtype"]) for name in ("dense", "lord")}


def _backend_compile(ctx: dict) -> dict[str, Runner]:
    from .dynamo import lord_backend  # noqa: F401  (fails early if the pass cannot import)

    dense = torch.compile(copy.deepcopy(ctx["dense"]), backend="inductor", dynamic=True)
    from .io import read_plan

    plan = read_plan(ctx["lord_dir"])  # factors in the benchmark's dtype, like the dense weights
    plan.tensors = {k: v.to(ctx["dtype"]) for k, v in plan.tensors.items()}
    lord = torch.compile(copy.deepcopy(ctx["dense"]), backend="lord", options={"plan": plan}, dynamic=True)
    # the compiled model must compute what the eager LoRD model computes, not the dense model
    ids = ctx["probe"].to(ctx["device"])
    with torch.no_grad():
        got, want = lord(input_ids=ids, use_cache=False).logits, ctx["lord"](input_ids=ids, use_cache=False).logits
        dense_out = ctx["dense"](input_ids=ids, use_cache=False).logits
    tol = 1e-3 if ctx["dtype"] == torch.float32 else 5e-2
    err = ((got - want).norm() / want.norm()).item()
    if err > tol or torch.equal(got, dense_out):
        raise RuntimeError(
            f"torch.compile(backend='lord') does not reproduce the LoRD model (relative error {err:.3g})"
        )
    runners = {
        "dense": torch_runner(dense, ctx["device"], ctx["dtype"]),
        "lord": torch_runner(lord, ctx["device"], ctx["dtype"]),
    }
    for r in runners.values():
        r.runs_on = r.runs_on.replace("torch ", "inductor ")
    return runners


def _backend_ort(ctx: dict, provider: str) -> dict[str, Runner]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise Skip("onnxruntime is not installed (pip install lord_export[onnx])") from None
    if provider == "cuda":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise Skip(f"this onnxruntime has no CUDAExecutionProvider ({', '.join(ort.get_available_providers())})")
        if not torch.cuda.is_available():
            raise Skip("no CUDA device is visible")
    from .onnx_export import export_model_onnx, export_with_past_optimum, make_session

    exported = ctx.setdefault("onnx", {})
    if not exported:
        work = ctx["workdir"]
        try:
            import optimum.exporters.onnx  # noqa: F401

            with_past = True
        except ImportError:
            with_past = False
        for name in ("dense", "lord"):
            (work / name).mkdir()
            model = copy.deepcopy(ctx[name]).to("cpu", torch.float32)
            if with_past:
                export_with_past_optimum(model, work / name, opset=18, validate=False)
            else:
                export_model_onnx(model, work / name, validate=False)
            exported[name] = work / name / "model.onnx"
    runners = {}
    for name, path in exported.items():
        session = make_session(path, prefer_cuda=provider == "cuda", threads=ctx.get("threads"))
        actual = session.get_providers()[0]
        if provider == "cuda" and not actual.startswith("CUDA"):
            raise Skip(f"ONNX Runtime fell back to {actual}")
        runners[name] = ort_runner(session)
    return runners


def _backend_tensorrt(ctx: dict) -> dict[str, Runner]:
    from .errors import LordError
    from .tensorrt_export import require_tensorrt

    try:
        require_tensorrt("torch_tensorrt")
    except LordError as err:
        raise Skip(str(err)) from None
    if not ctx["device"].startswith("cuda"):
        raise Skip("TensorRT needs a CUDA device (--device cuda)")
    reason = "token-by-token decode under TensorRT needs a static KV-cache engine; not measured"
    runners = {}
    for name in ("dense", "lord"):
        compiled = torch.compile(copy.deepcopy(ctx[name]), backend="torch_tensorrt", dynamic=False)
        runners[name] = Runner(
            torch_runner(compiled, ctx["device"], ctx["dtype"]).prefill, None, reason, f"TensorRT {ctx['device']}"
        )
    return runners


def make_runners(backend: str, ctx: dict) -> dict[str, Runner]:
    if backend == "eager":
        return _backend_eager(ctx)
    if backend == "compile":
        return _backend_compile(ctx)
    if backend == "ort-cpu":
        return _backend_ort(ctx, "cpu")
    if backend == "ort-cuda":
        return _backend_ort(ctx, "cuda")
    if backend == "tensorrt":
        return _backend_tensorrt(ctx)
    raise UsageError(f"unknown backend {backend!r}")


def _interleaved(fns: dict[str, Callable[[], float | None]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Run each fn ``warmup`` times, then ``repeats`` times interleaved; a fn returning a number
    reports its own time (seconds), otherwise it is timed around the call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            own = fn()
            times[name].append(own if isinstance(own, float) else time.perf_counter() - t)
    return times


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
) -> BenchResult:
    """Measure dense vs LoRD on each backend (see module docstring); unavailable backends are skipped."""
    from .hf import check_model_dir, load_dense, max_positions
    from .io import PLAN_FILE, load

    say = progress or (lambda msg: None)
    backends = parse_backends(backends)
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
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise UsageError(f"--device {device!r} is not usable here: {str(err).splitlines()[0]}") from None
    if threads:
        torch.set_num_threads(threads)

    say(f"loading {dense_dir} and {lord_dir}")
    dense = load_dense(dense_dir, dtype=torch.float32)
    check_same_base(dense, lord_dir, dense_dir)
    lord = load(lord_dir).to(torch.float32)  # FLOPs are counted in float32; runs use ``dtype``
    vocab = int(dense.config.vocab_size)
    gen = torch.Generator().manual_seed(seed)
    prefill_ids = {n: torch.randint(0, vocab, (1, n), generator=gen) for n in tokens}
    prompt = torch.randint(0, vocab, (1, decode_context), generator=gen)

    say("counting FLOPs")
    cpu_dense, cpu_lord = dense.eval(), lord.eval()
    ideal = {
        n: forward_flops(cpu_dense, input_ids=i) / forward_flops(cpu_lord, input_ids=i) for n, i in prefill_ids.items()
    }
    ideal_decode = decode_step_flops(cpu_dense, prompt) / decode_step_flops(cpu_lord, prompt) if decode_tokens else 0.0
    dense, lord = cpu_dense.to(device, dtype), cpu_lord.to(device, dtype)

    result = BenchResult()
    result.info = {
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
        "tokens": list(tokens),
        "decode_tokens": decode_tokens,
        "decode_context": decode_context,
        "repeats": repeats,
        "warmup": warmup,
    }
    workdir = Path(tempfile.mkdtemp(prefix="lord-bench-"))
    ctx = {
        "dense": dense,
        "lord": lord,
        "lord_dir": lord_dir,
        "device": device,
        "dtype": dtype,
        "threads": threads,
        "probe": prompt[:, : min(16, decode_context)],
        "workdir": workdir,
    }
    try:
        for backend in backends:
            say(f"{backend}: preparing")
            try:
                _measure_backend(backend, ctx, result, prefill_ids, prompt, ideal, ideal_decode, say)
            except Skip as why:
                result.skipped[backend] = str(why)
                say(f"{backend}: skipped ({why})")
            except Exception as err:  # one broken backend must not lose the others' measurements
                log.debug("backend %s failed", backend, exc_info=True)
                result.failed[backend] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
                say(f"{backend}: FAILED ({result.failed[backend]})")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return result


def _measure_backend(backend, ctx, result, prefill_ids, prompt, ideal, ideal_decode, say) -> None:
    runners = make_runners(backend, ctx)
    info = result.info
    for n, ids in prefill_ids.items():
        say(f"{backend}: prefill {n} tokens")
        times = _interleaved(
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
    times = _interleaved(
        {k: (lambda r=r: float(r.decode(prompt, steps))) for k, r in runners.items()}, info["repeats"], info["warmup"]
    )
    result.rows.append(_row(backend, "decode", prompt.shape[1], times, ideal_decode, runners["lord"].runs_on))


def _row(backend: str, mode: str, n: int, times: dict[str, list[float]], ideal: float, runs_on: str) -> Row:
    med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    spread = {k: 1e3 * (max(v) - min(v)) for k, v in times.items()}
    return Row(backend, mode, n, med["dense"], med["lord"], spread["dense"], spread["lord"], ideal, runs_on)


def cpu_name() -> str:
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


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
