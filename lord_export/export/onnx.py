"""ONNX export of LoRD models, validated in ONNX Runtime.

Pipeline: the compressed eager model is exported with ``torch.export`` (non-strict), repeated
bottleneck GEMMs are merged by the graph pass, and ``torch.onnx.export(..., dynamo=True)`` turns
the program into ONNX (opset ``DEFAULT_OPSET``) with dynamic batch and sequence axes. Every
export is checked with ``onnx.checker`` (full check), its MatMul census is taken (one bottleneck
MatMul per factorized group plus the members' up-projections) and it is run in ONNX Runtime on
fresh random inputs of another shape than the export example; an error above the tolerance fails
the export and the ONNX is kept aside for inspection, never reported as success.

onnx, onnxscript and onnxruntime are imported lazily (extra ``lord_export[onnx]``).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import LordError, UsageError

log = logging.getLogger(__name__)

DEFAULT_OPSET = 18
ONNX_FILE = "model.onnx"
REPORT_FILE = "export_report.json"
#: Relative tolerance (max |ort − torch| / max |torch|) of the ONNX Runtime check, per dtype.
TOLERANCE = {"float32": 1e-4, "float16": 2e-2}
#: Above this many parameter bytes the weights go to an external data file.
EXTERNAL_DATA_BYTES = 1 << 30


class ValidationError(LordError):
    """The exported model disagrees with PyTorch beyond the tolerance."""


def require(module: str, extra: str = "onnx") -> Any:
    """Import an optional dependency or raise a UsageError that says how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise UsageError(
            f"{module} is not installed; install it with: pip install 'lord_export[{extra}]' ({e})"
        ) from None


@dataclass
class OnnxReport:
    path: str
    opset: int
    dtype: str
    inputs: list[str]
    outputs: list[str]
    external_data: bool
    census: dict[str, int] = field(default_factory=dict)
    bottleneck_matmuls: int = 0
    up_projection_matmuls: int = 0
    factorized_groups: int = 0
    validation: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def session_providers(prefer_cuda: bool = True) -> list[str]:
    """CUDA when this onnxruntime build has it AND a CUDA device is visible, else CPU."""
    ort = require("onnxruntime")
    available = ort.get_available_providers()
    if prefer_cuda and "CUDAExecutionProvider" in available and torch.cuda.is_available():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def make_session(path: str | Path, prefer_cuda: bool = True, threads: int | None = None) -> Any:
    """An InferenceSession on the best available provider (``session.get_providers()[0]`` says which)."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=session_providers(prefer_cuda))


def example_inputs(model: nn.Module, batch: int, seq: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """input_ids (+ attention_mask with some right padding) for a transformers model."""
    g = torch.Generator().manual_seed(seed)
    vocab = int(getattr(model.config, "vocab_size", 100))
    ids = torch.randint(3, max(vocab, 4), (batch, seq), generator=g)
    mask = torch.ones_like(ids)
    if batch > 1 and seq > 2:
        mask[-1, -(seq // 3) :] = 0
    return {"input_ids": ids, "attention_mask": mask}


def matmul_census(model_proto: Any) -> tuple[dict[str, int], int, int]:
    """(op-type counts, low-rank bottleneck MatMuls, their up-projection MatMuls).

    Exporters rename and pre-transpose weights, so factors are recognized by structure: a
    bottleneck is a MatMul/Gemm with a constant weight whose output feeds, as the activation
    input, one or more MatMul/Gemm with constant weights (its group's up-projections).
    """
    graph = model_proto.graph
    constants = {i.name for i in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    counts: dict[str, int] = {}
    consumers: dict[str, list[Any]] = {}
    for node in _all_nodes(graph):
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def gemm_with_weight(n: Any) -> bool:
        return n.op_type in ("MatMul", "Gemm") and len(n.input) >= 2 and n.input[1] in constants

    bottlenecks = ups = 0
    for node in graph.node:
        if not gemm_with_weight(node):
            continue
        up = [c for c in consumers.get(node.output[0], []) if gemm_with_weight(c) and c.input[0] == node.output[0]]
        if up:
            bottlenecks += 1
            ups += len(up)
    return counts, bottlenecks, ups


def _all_nodes(graph: Any):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.g is not None and len(attr.g.node):
                yield from _all_nodes(attr.g)


def export_model_onnx(
    model: nn.Module,
    directory: Path,
    *,
    opset: int = DEFAULT_OPSET,
    dtype: str = "float32",
    factorized_groups: int = 0,
    validate: bool = True,
    external_data: bool | None = None,
) -> OnnxReport:
    """Export ``model`` (a transformers model, eager LoRD or dense) into ``directory``/model.onnx."""
    onnx = require("onnx")
    require("onnxscript")
    # torch.onnx warns about every torchvision op it cannot register; irrelevant to language models
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    from ..passes.share_bottlenecks import share_bottlenecks
    from .graph import export_friendly_masks

    if getattr(model.config, "use_cache", False):
        model.config.use_cache = False
    model = model.eval().to(getattr(torch, dtype))
    kwargs = example_inputs(model, 2, 16)
    names = list(kwargs)
    dims = {
        k: {0: torch.export.Dim("batch", min=1, max=1024), 1: torch.export.Dim("sequence", min=2, max=_max_pos(model))}
        for k in names
    }
    with torch.no_grad(), export_friendly_masks():
        ep = torch.export.export(model, (), kwargs, dynamic_shapes=dims, strict=False)
    if share_bottlenecks(ep.graph):
        ep.graph_module.recompile()
    nbytes = sum(t.numel() * t.element_size() for t in ep.state_dict.values())
    if external_data is None:
        external_data = nbytes > EXTERNAL_DATA_BYTES
    with warnings.catch_warnings():  # torch-internal deprecation noise, not actionable by users
        warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
        program = torch.onnx.export(
            ep,
            dynamo=True,
            opset_version=opset,
            input_names=names,
            output_names=[_output_name(model)],
            optimize=True,
            verbose=False,
        )
    path = directory / ONNX_FILE
    program.save(str(path), external_data=external_data)
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path), load_external_data=False)
    census, bottlenecks, ups = matmul_census(proto)
    report = OnnxReport(
        path=str(path),
        opset=opset,
        dtype=dtype,
        inputs=names,
        outputs=[_output_name(model)],
        external_data=bool(external_data),
        census=census,
        bottleneck_matmuls=bottlenecks,
        up_projection_matmuls=ups,
        factorized_groups=factorized_groups,
    )
    if validate:
        report.validation = validate_onnx(model, path, dtype)
    return report


def _output_name(model: nn.Module) -> str:
    return "logits" if hasattr(model, "lm_head") or "CausalLM" in type(model).__name__ else "last_hidden_state"


def _max_pos(model: nn.Module) -> int:
    cfg = model.config
    for key in ("max_position_embeddings", "n_positions", "n_ctx"):
        if isinstance(getattr(cfg, key, None), int):
            return int(getattr(cfg, key))
    return 4096


def validate_onnx(model: nn.Module, path: Path, dtype: str = "float32", *, seed: int = 1) -> dict[str, Any]:
    """Run ONNX Runtime and PyTorch on fresh inputs (batch 3, sequence 23); raise ValidationError
    when max |ort − torch| / max |torch| exceeds ``TOLERANCE[dtype]``."""
    session = make_session(path)
    kwargs = example_inputs(model, 3, min(23, _max_pos(model)), seed=seed)
    with torch.no_grad():
        out = model(**kwargs)
    ref = (out.logits if hasattr(out, "logits") else out.last_hidden_state).float().numpy()
    feeds = {i.name: kwargs[i.name].numpy() for i in session.get_inputs()}
    got = session.run(None, feeds)[0].astype(np.float32)
    if got.shape != ref.shape:
        raise ValidationError(f"ONNX output shape {got.shape} differs from PyTorch's {ref.shape}")
    max_abs = float(np.abs(got - ref).max())
    rel = max_abs / max(float(np.abs(ref).max()), 1e-12)
    result = {
        "provider": session.get_providers()[0],
        "inputs": {k: list(v.shape) for k, v in feeds.items()},
        "max_abs_error": max_abs,
        "max_rel_error": rel,
        "tolerance": TOLERANCE[dtype],
        "passed": rel <= TOLERANCE[dtype],
    }
    if not result["passed"]:
        raise ValidationError(
            f"ONNX Runtime ({result['provider']}) disagrees with PyTorch: max abs error {max_abs:.3g}, "
            f"relative {rel:.3g} > tolerance {TOLERANCE[dtype]:g}"
        )
    return result


def export_with_past_optimum(model: nn.Module, directory: Path, *, opset: int, validate: bool) -> OnnxReport:
    """Causal LM with KV-cache inputs/outputs, in optimum's decoder-with-past layout (loads with
    ``optimum.onnxruntime.ORTModelForCausalLM``; greedy generation token by token). optimum runs its
    own validation against the LoRD model; the census is taken here."""
    require("optimum.exporters.onnx", extra="optimum")
    onnx = require("onnx")
    from optimum.exporters.onnx import onnx_export_from_model

    model.config.use_cache = True
    onnx_export_from_model(model, directory, opset=opset, task="text-generation-with-past", do_validation=validate)
    path = directory / ONNX_FILE
    proto = onnx.load(str(path), load_external_data=False)
    census, bottlenecks, ups = matmul_census(proto)
    return OnnxReport(
        path=str(path),
        opset=opset,
        dtype="float32",
        inputs=[i.name for i in proto.graph.input],
        outputs=[o.name for o in proto.graph.output],
        external_data=any(directory.glob("*.onnx_data")),
        census=census,
        bottleneck_matmuls=bottlenecks,
        up_projection_matmuls=ups,
        validation={"by": "optimum", "passed": True} if validate else {},
    )


def export_onnx(
    model_dir: str | Path,
    output_dir: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    dtype: str = "float32",
    validate: bool = True,
    overwrite: bool | str = False,
    external_data: bool | None = None,
    with_past: bool = False,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Export a model directory (LoRD output of ``lord-export compress``, or a dense one) to ONNX.

    Writes ``output_dir`` atomically: model.onnx (+ external data), config/tokenizer files and
    export_report.json. A model that fails validation is left in ``<output_dir>.failed`` and a
    ValidationError is raised. ``with_past`` exports a causal LM with KV-cache inputs/outputs in
    optimum's layout (needs the optimum extra).
    """
    from ..persist.hf import TOKENIZER_FILES, check_model_dir, load_dense
    from ..persist.io import PLAN_FILE, atomic_output_dir, check_output, load, read_plan

    src = check_model_dir(model_dir)
    if dtype not in TOLERANCE:
        raise UsageError(f"unknown dtype {dtype!r}; choose one of {', '.join(TOLERANCE)}")
    out = Path(output_dir)
    check_output(out, overwrite)
    is_lord = (src / PLAN_FILE).is_file()
    model = (
        load(src, trust_remote_code=trust_remote_code)
        if is_lord
        else load_dense(src, trust_remote_code=trust_remote_code)
    )
    groups = len(read_plan(src, with_tensors=False).factorized_groups) if is_lord else 0
    failed = Path(str(out) + ".failed")
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        try:
            if with_past:
                if dtype != "float32":
                    raise UsageError("the KV-cache (with past) export is float32 only (optimum's layout)")
                report = export_with_past_optimum(model, tmp, opset=opset, validate=validate)
                report.factorized_groups = groups
            else:
                report = export_model_onnx(
                    model,
                    tmp,
                    opset=opset,
                    dtype=dtype,
                    factorized_groups=groups,
                    validate=validate,
                    external_data=external_data,
                )
        except ValidationError:
            if failed.exists():
                shutil.rmtree(failed)
            shutil.copytree(tmp, failed)
            raise
        for name in (*TOKENIZER_FILES, "config.json", PLAN_FILE):
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
        result = {"source": str(src), "lord": is_lord, **report.to_dict()}
        result["path"] = str(out / ONNX_FILE)
        result["onnx_bytes"] = sum(f.stat().st_size for f in tmp.iterdir() if f.name.startswith(ONNX_FILE))
        (tmp / REPORT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    return result


__all__ = [
    "DEFAULT_OPSET",
    "OnnxReport",
    "ValidationError",
    "export_model_onnx",
    "export_onnx",
    "make_session",
    "matmul_census",
    "session_providers",
    "validate_onnx",
]


QUANT_FILES = {"int8": "model.int8.onnx", "int4": "model.int4.onnx"}
INT4_BLOCK_SIZE = 128


def quantize_int8(onnx_dir: str | Path, *, seed: int = 2) -> dict[str, Any]:
    """Dynamic int8 quantization (ONNX Runtime's ``quantize_dynamic``, int8 weights) of
    ``onnx_dir``/model.onnx into model.int8.onnx; returns sizes and the output change against the
    float model on the same random inputs (max relative error, top-1 agreement of the last axis)."""
    return quantize_onnx(onnx_dir, "int8", seed=seed)


def quantize_int4(
    onnx_dir: str | Path,
    *,
    block_size: int = INT4_BLOCK_SIZE,
    is_symmetric: bool = False,
    accuracy_level: int | None = None,
    seed: int = 2,
) -> dict[str, Any]:
    """4-bit weight-only quantization (ONNX Runtime's ``MatMulNBitsQuantizer``: every MatMul with a
    constant weight becomes a ``MatMulNBits``, one scale (and zero point unless ``is_symmetric``) per
    ``block_size`` consecutive weights along the input dimension K) of ``onnx_dir``/model.onnx into
    model.int4.onnx. K is the factor's input dimension: d_in for a bottleneck, the rank for an
    up-projection. ONNX Runtime zero-pads K to a multiple of ``block_size`` (a rank of 192 with
    blocks of 128 is stored as 256 rows: the padding costs bytes, not accuracy), so any rank works;
    ``block_size`` must be a power of two >= 16 (the kernel's constraint). ``accuracy_level`` 4
    lets the CPU kernel quantize activations to int8 (faster, slightly less accurate)."""
    return quantize_onnx(
        onnx_dir, "int4", seed=seed, block_size=block_size, is_symmetric=is_symmetric, accuracy_level=accuracy_level
    )


def quantize_onnx(
    onnx_dir: str | Path,
    kind: str,
    *,
    seed: int = 2,
    block_size: int = INT4_BLOCK_SIZE,
    is_symmetric: bool = False,
    accuracy_level: int | None = None,
) -> dict[str, Any]:
    """Quantize ``onnx_dir``/model.onnx (``kind`` "int8" or "int4", see :func:`quantize_int8` and
    :func:`quantize_int4`); returns the path, sizes and the output change against the float model."""
    require("onnxruntime")
    if kind not in QUANT_FILES:
        raise UsageError(f"quantization must be one of {sorted(QUANT_FILES)}, got {kind!r}")
    src = Path(onnx_dir) / ONNX_FILE
    dst = Path(onnx_dir) / QUANT_FILES[kind]
    if kind == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8)
    else:
        if block_size < 16 or block_size & (block_size - 1):
            raise UsageError(f"int4 block size must be a power of two >= 16, got {block_size}")
        blocks = _quantize_int4(src, dst, block_size, is_symmetric, accuracy_level)
    fp32, quant = make_session(src, prefer_cuda=False), make_session(dst, prefer_cuda=False)
    g = np.random.default_rng(seed)
    feeds = {}
    for i in fp32.get_inputs():
        ids = g.integers(3, 100, size=(2, 24)).astype(np.int64)
        feeds[i.name] = np.ones_like(ids) if "mask" in i.name else ids
    a = fp32.run(None, feeds)[0]
    b = quant.run(None, feeds)[0]
    report = {
        "path": str(dst),
        "kind": kind,
        "bytes_float": _onnx_bytes(src),
        f"bytes_{kind}": _onnx_bytes(dst),
        "bytes_quantized": _onnx_bytes(dst),
        "max_rel_error_vs_float": float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12)),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
    }
    if kind == "int4":
        report.update(
            block_size=block_size,
            is_symmetric=is_symmetric,
            accuracy_level=accuracy_level,
            matmuls_per_block_size={str(k): v for k, v in sorted(blocks.items())},
        )
    return report


def int4_block_size(k: int, block_size: int) -> int:
    """The block size one MatMul with input dimension ``k`` is quantized with: ``block_size`` when it
    divides k, else the largest power of two >= 16 that divides k and is below ``block_size`` (a
    rank of 192 with blocks of 128 gets blocks of 64), else ``block_size`` (ONNX Runtime zero-pads k)."""
    if k % block_size == 0:
        return block_size
    b = block_size // 2
    while b >= 16:
        if k % b == 0:
            return b
        b //= 2
    return block_size


def _quantize_int4(src: Path, dst: Path, block_size: int, is_symmetric: bool, accuracy_level: int | None) -> dict:
    """MatMulNBitsQuantizer over ``src``, one pass per block size (see :func:`int4_block_size`);
    returns {block size: number of MatMuls quantized with it}."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(src))
    inits = {t.name: t for t in model.graph.initializer}
    chosen: dict[int, list[str]] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in inits:
            dims = list(inits[node.input[1]].dims)
            if len(dims) == 2:
                chosen.setdefault(int4_block_size(dims[0], block_size), []).append(node.name)
    quiet = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        for bs, names in sorted(chosen.items()):
            q = MatMulNBitsQuantizer(
                model,
                bits=4,
                block_size=bs,
                is_symmetric=is_symmetric,
                accuracy_level=accuracy_level,
                nodes_to_include=names,
            )
            q.process()
            model = q.model.model
    finally:
        quiet.setLevel(level)
    large = sum(t.ByteSize() for t in model.graph.initializer) > EXTERNAL_DATA_BYTES
    onnx.save_model(model, str(dst), save_as_external_data=large, location=dst.name + ".data" if large else None)
    return {bs: len(v) for bs, v in chosen.items()}


def _onnx_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))
