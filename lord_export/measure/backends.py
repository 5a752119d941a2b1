"""Backend adapters for ``lord-export bench``: each turns the dense and LoRD models into runners.

Backends: ``eager`` (PyTorch), ``compile`` (inductor for dense; ``backend="lord"`` with the plan for
LoRD, i.e. the graph pass then inductor), ``ort-cpu`` / ``ort-cuda`` (ONNX Runtime on lord_export's
ONNX exports), ``tensorrt`` (``torch.compile(backend="torch_tensorrt")``, prefill only). A backend
this machine cannot run raises :class:`Skip` with the reason.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch

from ..errors import UsageError
from .runners import Runner, ort_runner, torch_runner

BACKENDS = ("eager", "compile", "ort-cpu", "ort-cuda", "tensorrt")


class Skip(Exception):
    """A backend (or one mode of it) cannot run on this machine; the message says why."""


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


def _backend_eager(ctx: dict) -> dict[str, Runner]:
    return {name: torch_runner(ctx[name], ctx["device"], ctx["dtype"]) for name in ("dense", "lord")}


#: dynamo cache entries allowed per frame in the compile backend (see _backend_compile)
RECOMPILE_LIMIT = 64


def _backend_compile(ctx: dict) -> dict[str, Runner]:
    from ..export.dynamo import make_backend

    # dense and LoRD are one model class, so their compiled frames share dynamo's cache of that
    # class's forward; prefill, the first cached step (the cache holds views) and later steps take
    # about four entries per model, and past dynamo's default limit of 8 a frame silently runs
    # EAGER: the second model's decode would be timed uncompiled
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    dense = torch.compile(copy.deepcopy(ctx["dense"]), backend="inductor", dynamic=True)
    from ..persist.io import read_plan

    plan = read_plan(ctx["lord_dir"])  # factors in the benchmark's dtype, like the dense weights
    plan.tensors = {k: v.to(ctx["dtype"]) for k, v in plan.tensors.items()}
    # the same function as backend="lord", bound directly: a checkout that is not pip-installed has
    # no torch_dynamo_backends entry point, and the measurement must not depend on one
    lord = torch.compile(copy.deepcopy(ctx["dense"]), backend=make_backend(plan=plan), dynamic=True)
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
    from ..export.onnx import export_model_onnx, export_with_past_optimum, make_session

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
    from ..errors import LordError
    from ..export.tensorrt import require_tensorrt

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
